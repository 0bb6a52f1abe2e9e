// Autograd for fastgpt::transformer_block: one autograd node per block. The forward runs
// transformer_block_train (which returns the activations the backward needs) and the backward
// runs transformer_block_backward; both are ops with fake kernels, so torch.compile's
// AOTAutograd traces this node like any other (see embedding_autograd.cpp for why autograd is
// registered in C++). Without grad mode or a tensor that needs a gradient, the plain forward
// runs and nothing is saved.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "transformer_block.h"

namespace fastgpt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

#define BLOCK_TYPES                                                                        \
  const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,               \
      const OptTensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,            \
      const OptTensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,            \
      const OptTensor&, int64_t, double

constexpr size_t kInputs = 13;  // x and the 12 weight slots (absent biases saved undefined)
constexpr size_t kSaved = 13;   // what transformer_block_train returns: activations, seed

c10::OperatorHandle find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

at::Tensor call_forward(BLOCK_PARAMS) {
  static const auto op = find_op("fastgpt::transformer_block").typed<at::Tensor(BLOCK_TYPES)>();
  return op.call(BLOCK_ARGS);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> call_train(BLOCK_PARAMS) {
  static const auto op = find_op("fastgpt::transformer_block_train")
                             .typed<std::tuple<at::Tensor, std::vector<at::Tensor>>(BLOCK_TYPES)>();
  return op.call(BLOCK_ARGS);
}

std::vector<at::Tensor> call_backward(const at::Tensor& grad_out, at::TensorList saved,
                                      BLOCK_PARAMS) {
  static const auto op =
      find_op("fastgpt::transformer_block_backward")
          .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, BLOCK_TYPES)>();
  return op.call(grad_out, saved, BLOCK_ARGS);
}

OptTensor optional(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class BlockFunction : public torch::autograd::Function<BlockFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, BLOCK_PARAMS) {
    at::Tensor out;
    std::vector<at::Tensor> saved;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, saved) = call_train(BLOCK_ARGS);
    }
    const auto or_undefined = [](const OptTensor& t) { return has(t) ? *t : at::Tensor(); };
    variable_list to_save{x,
                          ln_1_weight, or_undefined(ln_1_bias),
                          c_attn_weight, or_undefined(c_attn_bias),
                          attn_c_proj_weight, or_undefined(attn_c_proj_bias),
                          ln_2_weight, or_undefined(ln_2_bias),
                          c_fc_weight, or_undefined(c_fc_bias),
                          mlp_c_proj_weight, or_undefined(mlp_c_proj_bias)};
    to_save.insert(to_save.end(), saved.begin(), saved.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["n_head"] = n_head;
    ctx->saved_data["dropout_p"] = dropout_p;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list s = ctx->get_saved_variables();
    TORCH_INTERNAL_ASSERT(s.size() == kInputs + kSaved);
    const std::vector<at::Tensor> grads = call_backward(
        grad_outputs[0], at::TensorList(s.data() + kInputs, kSaved), s[0], s[1],
        optional(s[2]), s[3], optional(s[4]), s[5], optional(s[6]), s[7], optional(s[8]), s[9],
        optional(s[10]), s[11], optional(s[12]), ctx->saved_data["n_head"].toInt(),
        ctx->saved_data["dropout_p"].toDouble());
    variable_list result(kInputs + 2);  // + n_head and dropout_p, which have no gradient
    size_t next = 0;
    for (size_t i = 0; i < kInputs; ++i) {
      if (s[i].defined()) result[i] = grads.at(next++);
    }
    return result;
  }
};

bool any_needs_grad(BLOCK_PARAMS) {
  for (const at::Tensor* t : {&x, &ln_1_weight, &c_attn_weight, &attn_c_proj_weight,
                              &ln_2_weight, &c_fc_weight, &mlp_c_proj_weight}) {
    if (t->requires_grad()) return true;
  }
  for (const OptTensor* t : {&ln_1_bias, &c_attn_bias, &attn_c_proj_bias, &ln_2_bias,
                             &c_fc_bias, &mlp_c_proj_bias}) {
    if (has(*t) && (*t)->requires_grad()) return true;
  }
  return false;
}

at::Tensor transformer_block_autograd(BLOCK_PARAMS) {
  if (!at::GradMode::is_enabled() || !any_needs_grad(BLOCK_ARGS)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward(BLOCK_ARGS);
  }
  return BlockFunction::apply(BLOCK_ARGS);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, Autograd, m) {
  m.impl("transformer_block", &transformer_block_autograd);
}

}  // namespace fastgpt

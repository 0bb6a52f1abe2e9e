// Autograd for fastgpt::embedding_forward: its gradient is fastgpt::embedding_backward
// (deterministic) applied to the incoming gradient; indices and padding_idx get none.
//
// Registered in C++ at the Autograd key rather than with torch.library.register_autograd in
// Python: the Python autograd wrapper cost ~30 us per call on the CPU this was measured on,
// two to three times what the whole lookup of 768 tokens takes. torch.compile traces through
// this kernel like any other (the ops' fake kernels come from Python, register_fake).
// The backward op itself has no autograd (no double backward through embeddings).

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastgpt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& weight, const at::Tensor& indices, int64_t padding_idx) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastgpt::embedding_forward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(weight, indices, padding_idx);
}

at::Tensor call_backward(const at::Tensor& grad_out, const at::Tensor& indices,
                         c10::SymInt num_weights, int64_t padding_idx, bool deterministic) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastgpt::embedding_backward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, int64_t, bool)>();
  return op.call(grad_out, indices, std::move(num_weights), padding_idx, deterministic);
}

class EmbeddingFunction : public torch::autograd::Function<EmbeddingFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight,
                            const at::Tensor& indices, int64_t padding_idx) {
    ctx->save_for_backward({indices});
    ctx->saved_data["num_weights"] = weight.sym_size(0);
    ctx->saved_data["padding_idx"] = padding_idx;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward(weight, indices, padding_idx);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor indices = ctx->get_saved_variables()[0];
    at::Tensor grad_weight =
        call_backward(grad_outputs[0], indices, ctx->saved_data["num_weights"].toSymInt(),
                      ctx->saved_data["padding_idx"].toInt(), /*deterministic=*/true);
    return {grad_weight, at::Tensor(), at::Tensor()};
  }
};

at::Tensor embedding_forward_autograd(const at::Tensor& weight, const at::Tensor& indices,
                                      int64_t padding_idx) {
  return EmbeddingFunction::apply(weight, indices, padding_idx);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, Autograd, m) {
  m.impl("embedding_forward", &embedding_forward_autograd);
}

}  // namespace fastgpt

// Autograd for fastgpt::causal_attention: the forward runs causal_attention_train (which also
// returns what the backward needs) and the backward runs causal_attention_backward; both are ops
// with fake kernels, so torch.compile traces this node like any other. Registered in C++ for
// the per-call cost (see embedding_autograd.cpp). Without grad mode, or when no input needs a
// gradient, the plain forward runs and nothing is saved.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastgpt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using QKV = const at::Tensor&;

c10::OperatorHandle find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

at::Tensor call_forward(QKV q, QKV k, QKV v, double scale) {
  static const auto op =
      find_op("fastgpt::causal_attention").typed<at::Tensor(QKV, QKV, QKV, double)>();
  return op.call(q, k, v, scale);
}

std::tuple<at::Tensor, at::Tensor> call_train(QKV q, QKV k, QKV v, double scale) {
  static const auto op = find_op("fastgpt::causal_attention_train")
                             .typed<std::tuple<at::Tensor, at::Tensor>(QKV, QKV, QKV, double)>();
  return op.call(q, k, v, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(QKV grad_out, QKV q, QKV k, QKV v,
                                                             QKV saved, double scale) {
  static const auto op =
      find_op("fastgpt::causal_attention_backward")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(QKV, QKV, QKV, QKV, QKV,
                                                                double)>();
  return op.call(grad_out, q, k, v, saved, scale);
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, QKV q, QKV k, QKV v, double scale) {
    at::Tensor out, saved;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, saved) = call_train(q, k, v, scale);
    }
    ctx->save_for_backward({q, k, v, saved});
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list s = ctx->get_saved_variables();
    auto [dq, dk, dv] =
        call_backward(grad_outputs[0], s[0], s[1], s[2], s[3], ctx->saved_data["scale"].toDouble());
    return {dq, dk, dv, at::Tensor()};
  }
};

at::Tensor causal_attention_autograd(QKV q, QKV k, QKV v, double scale) {
  if (!at::GradMode::is_enabled() ||
      !(q.requires_grad() || k.requires_grad() || v.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward(q, k, v, scale);
  }
  return AttentionFunction::apply(q, k, v, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, Autograd, m) {
  m.impl("causal_attention", &causal_attention_autograd);
}

}  // namespace fastgpt

// Autograd for fastgpt::embedding_forward: its gradient is fastgpt::embedding_backward
// (deterministic) applied to the incoming gradient; indices and padding_idx get none.
//
// Registered in C++ at the Autograd key rather than with torch.library.register_autograd in
// Python: the Python autograd wrapper cost ~30 us per call on the CPU this was measured on,
// two to three times what the whole lookup of 768 tokens takes. torch.compile traces through
// this kernel like any other (the ops' fake kernels come from Python, register_fake).
// Forward-mode AD (torch.func.jvp, forward_ad) is supported: the tangent is the same lookup.
// The backward op itself has no autograd (no double backward through embeddings).

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

namespace fastgpt {
namespace {

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

// A plain autograd Node, as ATen's generated code uses, rather than torch::autograd::Function<>:
// Function's context (a string-keyed map of IValues for the two integers) and its bookkeeping
// cost ~0.9 us per call, more than a quarter of a lookup of 8 tokens (measured 3.7 -> 2.8 us).
struct EmbeddingBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable indices;
  c10::SymInt num_weights;
  int64_t padding_idx = -1;

  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined() || !should_compute_output(0)) return {at::Tensor()};
    return {call_backward(grads[0], indices.unpack(), num_weights, padding_idx,
                          /*deterministic=*/true)};
  }
  std::string name() const override { return "fastgpt::EmbeddingBackward"; }
  void release_variables() override { indices.reset_data(); }
};

at::Tensor embedding_forward_autograd(const at::Tensor& weight, const at::Tensor& indices,
                                      int64_t padding_idx) {
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = call_forward(weight, indices, padding_idx);
  }
  if (torch::autograd::compute_requires_grad(weight)) {
    auto node = c10::make_intrusive<EmbeddingBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(weight));
    node->indices = torch::autograd::SavedVariable(indices, /*is_output=*/false);
    node->num_weights = weight.sym_size(0);
    node->padding_idx = padding_idx;
    torch::autograd::set_history(out, node);
  }
  // forward-mode AD: the lookup is linear in weight, so the output's tangent is the same lookup
  // of weight's tangent
  const at::Tensor& weight_tangent = weight._fw_grad(/*level=*/0);
  if (weight_tangent.defined()) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out._set_fw_grad(call_forward(weight_tangent, indices, padding_idx), /*level=*/0,
                     /*is_inplace_op=*/false);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, Autograd, m) {
  m.impl("embedding_forward", &embedding_forward_autograd);
}

}  // namespace fastgpt

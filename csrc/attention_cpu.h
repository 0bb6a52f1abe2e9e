// Causal self-attention on the CPU, forward and backward, for one batch of heads; used by the
// fastgpt::causal_attention ops and by the transformer block (transformer_block_cpu.cpp).
//
// q, k, v, out, grad_out, dq, dk, dv are (B, H, T, D) tensors whose D dimension has stride 1;
// their other strides are free, so a caller can pass views into one (B*T, 3*C) qkv matrix
// and write the output straight into (B*T, C) rows, with no transposing copies.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastgpt {

// Writes softmax(scale * q k^T + causal mask) v into `out`. With save=true it returns the state
// causal_attention_backward needs (the probabilities; its layout is private to this file pair),
// otherwise an undefined tensor.
at::Tensor causal_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    double scale, const at::Tensor& out, bool save);

// Writes the gradients of q, k and v into dq, dk, dv, given what the forward saved.
void causal_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& saved, double scale, const at::Tensor& dq,
                               const at::Tensor& dk, const at::Tensor& dv);

// A meta tensor with the shape and dtype of what causal_attention_forward saves for q.
at::Tensor causal_attention_saved_like(const at::Tensor& q);

}  // namespace fastgpt

// Causal self-attention on the CPU, forward and backward, for one batch of heads; used by the
// fastgpt::causal_attention ops and by the transformer block (transformer_block_cpu.cpp).
//
// q, k, v, out, grad_out, dq, dk, dv are (B, H, T, D) tensors whose D dimension has stride 1;
// their other strides are free, so a caller can pass views into one (B*T, 3*C) qkv matrix
// and write the output straight into (B*T, C) rows, with no transposing copies.
#pragma once

#include <ATen/core/Tensor.h>

#include "dropout_cpu.h"

namespace fastgpt {

// Writes dropout(softmax(scale * q k^T + causal mask)) v into `out`. With save=true it returns
// the state causal_attention_backward needs (the probabilities before dropout; its layout is
// private to this file pair), otherwise an undefined tensor. `drop` (or none): the dropout of
// the probabilities, element (b, h, i, j) being (row (b * H + h) * T + i, column j) of the mask
// (dropout_cpu.h).
at::Tensor causal_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    double scale, const at::Tensor& out, bool save,
                                    const dropout::Params* drop = nullptr);

// Writes the gradients of q, k and v into dq, dk, dv, given what the forward saved and the
// forward's `drop`.
void causal_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& saved, double scale, const at::Tensor& dq,
                               const at::Tensor& dk, const at::Tensor& dv,
                               const dropout::Params* drop = nullptr);

// A meta tensor with the shape and dtype of what causal_attention_forward saves for q.
at::Tensor causal_attention_saved_like(const at::Tensor& q);

}  // namespace fastgpt

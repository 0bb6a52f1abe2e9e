// LayerNorm over the last dimension for the CPU transformer block (transformer_block_cpu.cpp).
//
// Why: aten's bfloat16 layer_norm and its backward take 50-70 us each on the block's
// (768 x 128) activations, about ten times what reading and writing them costs; the block runs
// two of each per layer and step. These are one vectorised pass per row (forward) and one per
// row plus a per-thread column sum (backward).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fastgpt {

// (y, mean, rstd) for x of shape (N, C): y = (x - mean) * rstd * weight + bias, mean and rstd
// of shape (N, 1) in fp32 (float32/bfloat16 x) or x's dtype (other dtypes: aten's kernel).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    double eps);

// (dx, dweight, dbias) given what the forward saved; dbias is undefined when `with_bias` is
// false.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias);

}  // namespace fastgpt

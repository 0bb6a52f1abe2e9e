// Exact (erf) GELU for the CPU transformer block: one pass that writes gelu(h) and gelu'(h).
//
// Why: aten's bf16 gelu_backward re-evaluates erf and exp for every element (about twice the
// forward's time at the baby preset's MLP size). Computing the derivative while the forward
// has erf and exp at hand leaves the backward one multiply: dh = dg * gelu'(h).
// Algorithm, with u = h / sqrt(2) and E = exp(-u^2):
//   erf(u) = sign(u) * (1 - P(t) * E), t = 1 / (1 + p|u|)   (Abramowitz & Stegun 7.1.26)
//   gelu(h) = h * (1 + erf(u)) / 2,   gelu'(h) = (1 + erf(u)) / 2 + h * E / sqrt(2 pi)
// exp is range-reduced (2^n * e^r, |r| <= ln2/2) with a degree-6 polynomial, so the loop is
// branch-free and GCC vectorises it; target_clones builds AVX-512, AVX2 and baseline versions
// and picks one at load time.
// Precision: erf's absolute error is below 1.5e-7 and exp's relative error about 2e-7, all in
// fp32, so gelu and gelu' are within a few fp32 ulps of exact; bf16 outputs round once.
// Limits: float32 and bfloat16 (other dtypes use aten's kernels, see transformer_block_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

namespace fastgpt {

// (gelu(h), gelu'(h) in fp32) for contiguous float32 / bfloat16 h
std::pair<at::Tensor, at::Tensor> gelu_with_derivative(const at::Tensor& h);

// grad * deriv, rounded once to grad's dtype (float32 / bfloat16, contiguous)
at::Tensor scale_by_derivative(const at::Tensor& grad, const at::Tensor& deriv);

}  // namespace fastgpt

// Exact (erf) GELU with its derivative in one pass; see gelu_cpu.h.

#include "gelu_cpu.h"
#include "simd16.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <type_traits>

namespace fastgpt {
namespace gelu_detail {

using namespace simd16;

// e^x for x <= 0 (here x = -u^2), range-reduced: 2^n * e^r with |r| <= ln2 / 2; below -87 the
// result flushes to 0. round(x / ln2) uses the 1.5 * 2^23 trick (plain arithmetic).
template <typename F, typename U, typename I>
__attribute__((always_inline)) inline F exp_nonpositive(F x) {
  x = x < -87.0f ? F{} - 87.0f : x;
  const F n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const F r = x - n * 0.693359375f + n * 2.12194440e-4f;   // x - n ln2, in two parts
  F p = F{} + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  I ni;
  if constexpr (std::is_same_v<F, float>) {
    ni = static_cast<I>(n);
  } else {
    ni = __builtin_convertvector(n, I);
  }
  return p * from_bits<F>(as_bits<U>(ni + 127) << 23);   // * 2^n
}

// gelu(x) and gelu'(x)
template <typename F, typename U, typename I>
__attribute__((always_inline)) inline void gelu_math(F x, F& g, F& d) {
  constexpr float kInvSqrt2 = 0.70710678118654752f, kInvSqrt2Pi = 0.39894228040143268f;
  const F u = x * kInvSqrt2;
  const U sign = as_bits<U>(u) & 0x80000000u;
  const F a = from_bits<F>(as_bits<U>(u) & 0x7FFFFFFFu);   // |u|
  const F t = 1.0f / (1.0f + 0.3275911f * a);
  const F poly =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                                                                        t * 1.061405429f))));
  const F e = exp_nonpositive<F, U, I>(-u * u);
  const F erf_u = from_bits<F>(as_bits<U>(1.0f - poly * e) | sign);   // erf(|u|) >= 0
  const F cdf = 0.5f * (1.0f + erf_u);
  g = x * cdf;
  d = cdf + x * e * kInvSqrt2Pi;
}

template <typename scalar_t>
__attribute__((always_inline)) inline void gelu_with_derivative_body(
    const scalar_t* h, scalar_t* out, float* deriv, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    vfloat g, d;
    gelu_math<vfloat, vuint, vint>(load16(h + i), g, d);
    store16(out + i, g);
    store16(deriv + i, d);
  }
  for (; i < end; ++i) {
    float g, d;
    gelu_math<float, uint32_t, int32_t>(load(h, i), g, d);
    store(out, i, g);
    deriv[i] = d;
  }
}

template <typename scalar_t>
__attribute__((always_inline)) inline void scale_by_derivative_body(
    const scalar_t* grad, const float* deriv, scalar_t* out, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) store16(out + i, load16(grad + i) * load16(deriv + i));
  for (; i < end; ++i) store(out, i, load(grad, i) * deriv[i]);
}

// One multiversioned copy per dtype (GCC does not clone templates): each inlines the body
// above, so it is vectorised for the ISA of its clone.
#define FASTGPT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
FASTGPT_CLONES void gelu_with_derivative_range(const float* h, float* out, float* deriv,
                                               int64_t begin, int64_t end) {
  gelu_with_derivative_body(h, out, deriv, begin, end);
}
FASTGPT_CLONES void gelu_with_derivative_range(const uint16_t* h, uint16_t* out,
                                               float* deriv, int64_t begin, int64_t end) {
  gelu_with_derivative_body(h, out, deriv, begin, end);
}
FASTGPT_CLONES void scale_by_derivative_range(const float* grad, const float* deriv, float* out,
                                              int64_t begin, int64_t end) {
  scale_by_derivative_body(grad, deriv, out, begin, end);
}
FASTGPT_CLONES void scale_by_derivative_range(const uint16_t* grad, const float* deriv,
                                              uint16_t* out, int64_t begin, int64_t end) {
  scale_by_derivative_body(grad, deriv, out, begin, end);
}
#undef FASTGPT_CLONES

}  // namespace gelu_detail

template <typename scalar_t, typename raw_t>
void gelu_with_derivative_typed(const at::Tensor& h, at::Tensor& out, at::Tensor& deriv) {
  const raw_t* hp = reinterpret_cast<const raw_t*>(h.const_data_ptr<scalar_t>());
  raw_t* op = reinterpret_cast<raw_t*>(out.mutable_data_ptr<scalar_t>());
  float* dp = deriv.mutable_data_ptr<float>();
  at::parallel_for(0, h.numel(), at::internal::GRAIN_SIZE, [&](int64_t b, int64_t e) {
    gelu_detail::gelu_with_derivative_range(hp, op, dp, b, e);
  });
}

template <typename scalar_t, typename raw_t>
void scale_by_derivative_typed(const at::Tensor& grad, const at::Tensor& deriv, at::Tensor& out) {
  const raw_t* gp = reinterpret_cast<const raw_t*>(grad.const_data_ptr<scalar_t>());
  const float* dp = deriv.const_data_ptr<float>();
  raw_t* op = reinterpret_cast<raw_t*>(out.mutable_data_ptr<scalar_t>());
  at::parallel_for(0, grad.numel(), at::internal::GRAIN_SIZE, [&](int64_t b, int64_t e) {
    gelu_detail::scale_by_derivative_range(gp, dp, op, b, e);
  });
}

std::pair<at::Tensor, at::Tensor> gelu_with_derivative(const at::Tensor& h) {
  TORCH_INTERNAL_ASSERT(h.is_contiguous());
  at::Tensor out = at::empty_like(h);
  at::Tensor deriv = at::empty(h.sizes(), h.options().dtype(at::kFloat));
  if (h.scalar_type() == at::kFloat) {
    gelu_with_derivative_typed<float, float>(h, out, deriv);
  } else {
    TORCH_INTERNAL_ASSERT(h.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
    gelu_with_derivative_typed<at::BFloat16, uint16_t>(h, out, deriv);
  }
  return {out, deriv};
}

at::Tensor scale_by_derivative(const at::Tensor& grad, const at::Tensor& deriv) {
  TORCH_INTERNAL_ASSERT(grad.is_contiguous() && deriv.is_contiguous() &&
                        deriv.scalar_type() == at::kFloat && grad.numel() == deriv.numel());
  at::Tensor out = at::empty_like(grad);
  if (grad.scalar_type() == at::kFloat) {
    scale_by_derivative_typed<float, float>(grad, deriv, out);
  } else {
    TORCH_INTERNAL_ASSERT(grad.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
    scale_by_derivative_typed<at::BFloat16, uint16_t>(grad, deriv, out);
  }
  return out;
}

}  // namespace fastgpt

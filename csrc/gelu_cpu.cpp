// Exact (erf) GELU with its derivative in one pass; see gelu_cpu.h.

#include "gelu_cpu.h"
#include "cpu_isa.h"
#include "vec_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

namespace fastgpt {
namespace gelu_detail {
using namespace vec;

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

// V: the instruction set's own width (NativeVec), not 16 lanes: GCC lowers a comparison of
// 16-lane vectors (exp_nonpositive's clamp) to 16 scalar compares on AVX2, and moves them
// through the stack
template <class V, typename scalar_t>
__attribute__((always_inline)) inline void gelu_with_derivative_body(
    const scalar_t* h, scalar_t* out, float* deriv, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + V::lanes <= end; i += V::lanes) {
    typename V::f g, d;
    gelu_math<typename V::f, typename V::u, typename V::i>(loadv<V>(h + i), g, d);
    storev<V>(out + i, g);
    storev<V>(deriv + i, d);
  }
  for (; i < end; ++i) {
    float g, d;
    gelu_math<float, uint32_t, int32_t>(load(h, i), g, d);
    store(out, i, g);
    deriv[i] = d;
  }
}

template <class V, typename scalar_t>
__attribute__((always_inline)) inline void scale_by_derivative_body(
    const scalar_t* grad, const float* deriv, scalar_t* out, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + V::lanes <= end; i += V::lanes)
    storev<V>(out + i, loadv<V>(grad + i) * loadv<V>(deriv + i));
  for (; i < end; ++i) store(out, i, load(grad, i) * deriv[i]);
}

// One copy per instruction set (cpu_isa.h) inlines the bodies above, so the vectors are
// lowered to AVX-512, AVX2 + FMA or SSE2 registers.
template <typename raw_t>
void gelu_with_derivative_range(const raw_t* h, raw_t* out, float* deriv, int64_t begin,
                                int64_t end) {
  dispatch([&]<Isa I>() __attribute__((always_inline)) {
    gelu_with_derivative_body<NativeVec<I>>(h, out, deriv, begin, end);
  });
}
template <typename raw_t>
void scale_by_derivative_range(const raw_t* grad, const float* deriv, raw_t* out, int64_t begin,
                               int64_t end) {
  dispatch([&]<Isa I>() __attribute__((always_inline)) {
    scale_by_derivative_body<NativeVec<I>>(grad, deriv, out, begin, end);
  });
}

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

// Vector helpers for the CPU kernels (gelu, attention, layer_norm, adamw).
//
// Kernels are written over GCC vector extensions, Vec<L>: L floats, which each instruction
// set's copy (cpu_isa.h) lowers to its registers. Kernels use NativeVec<I>, one register of the
// copy's set (16 lanes on AVX-512, 8 on AVX2, 4 on SSE2): GCC 12 lowers wider vectors well only
// for plain arithmetic; their comparisons and selects become one scalar instruction per lane,
// and they often go via the stack (measured on AVX2, 16 lanes against 8: GELU ~3x slower,
// AdamW's step, with its FMAs issued lane by lane, 4.4x). bfloat16 data is passed as its raw 16
// bits (at::BFloat16 is a class, which GCC's vectoriser will not load or store).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu_isa.h"

namespace fastgpt {
namespace vec {

// Math helpers are written once over a "float" type F that is either float or vfloat, with U
// the matching unsigned type and I the signed integer type.
typedef float vfloat __attribute__((vector_size(64)));
typedef uint32_t vuint __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

template <typename U, typename F>
__attribute__((always_inline)) inline U as_bits(F x) {
  U u;
  std::memcpy(&u, &x, sizeof(F));
  return u;
}

template <typename F, typename U>
__attribute__((always_inline)) inline F from_bits(U u) {
  F x;
  std::memcpy(&x, &u, sizeof(F));
  return x;
}

// the bfloat16 bits of v (in the low 16 bits of U): round to nearest even; NaN stays a quiet NaN
template <typename U, typename F>
__attribute__((always_inline)) inline U bfloat16_bits(F v) {
  const U u = as_bits<U>(v);
  const U rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return v != v ? U{} + 0x7FC0u : rounded;
}

__attribute__((always_inline)) inline float load(const float* p, int64_t i) { return p[i]; }
__attribute__((always_inline)) inline float load(const uint16_t* p, int64_t i) {
  return from_bits<float>(uint32_t(p[i]) << 16);
}
__attribute__((always_inline)) inline void store(float* p, int64_t i, float v) { p[i] = v; }
__attribute__((always_inline)) inline void store(uint16_t* p, int64_t i, float v) {
  p[i] = static_cast<uint16_t>(bfloat16_bits<uint32_t>(v));
}

// e^x for x <= 0 (GELU's exp(-u^2), softmax's exp(s - max)), range-reduced: 2^n * e^r with
// |r| <= ln2 / 2 and a degree-6 polynomial (relative error about 2e-7); x is clamped at
// -87, so anything below gives e^-87 (~1.6e-38), not 0. round(x / ln2) uses the 1.5 * 2^23
// trick (plain arithmetic).
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

// L lanes of fp32 and the matching integer and bf16 vectors, for kernels whose register tiles
// are sized per instruction set (cpu_isa.h): Vec<16> for AVX-512, Vec<8> for AVX2, Vec<4> for
// SSE2, so that a tile of accumulators fits the register file instead of spilling.
template <int L>
struct Vec {
  static constexpr int64_t lanes = L;
  typedef float f __attribute__((vector_size(4 * L)));
  typedef uint32_t u __attribute__((vector_size(4 * L)));
  typedef int32_t i __attribute__((vector_size(4 * L)));
  typedef uint16_t h __attribute__((vector_size(2 * L)));
};

template <class V>
__attribute__((always_inline)) inline typename V::f loadv(const float* p) {
  typename V::f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V>
__attribute__((always_inline)) inline typename V::f loadv(const uint16_t* p) {
  typename V::h h;
  std::memcpy(&h, p, sizeof h);
  return from_bits<typename V::f>(__builtin_convertvector(h, typename V::u) << 16);
}
template <class V>
__attribute__((always_inline)) inline void storev(float* p, typename V::f v) {
  std::memcpy(p, &v, sizeof v);
}
template <class V>
__attribute__((always_inline)) inline void storev(uint16_t* p, typename V::f v) {
  const typename V::h h =
      __builtin_convertvector(bfloat16_bits<typename V::u>(v), typename V::h);
  std::memcpy(p, &h, sizeof h);
}
// op over the lanes of an L-lane vector, as a tree: halves combined until 2 lanes are left.
// Why: without -ffast-math GCC keeps a lane-by-lane loop as written, one dependent scalar op per
// lane (16 in a row, ~64 cycles, on AVX-512), once per row in softmax and LayerNorm.
template <int L, typename Op>
__attribute__((always_inline)) inline float reduce_lanes(typename Vec<L>::f v, Op op) {
  if constexpr (L == 2) {
    return op(v[0], v[1]);
  } else {
    typename Vec<L / 2>::f lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return reduce_lanes<L / 2>(op(lo, hi), op);
  }
}

template <class V>
__attribute__((always_inline)) inline float hsum(typename V::f v) {
  return reduce_lanes<V::lanes>(v, [](auto a, auto b) { return a + b; });
}

template <class V>
__attribute__((always_inline)) inline float hmax(typename V::f v) {
  return reduce_lanes<V::lanes>(v, [](auto a, auto b) { return a > b ? a : b; });
}

// the constant vector 0, 1, ..., lanes - 1 (written as a loop over constants, which GCC folds;
// a loop over a variable start becomes one insert instruction per lane)
template <class V>
__attribute__((always_inline)) inline typename V::i lane_numbers() {
  typename V::i lanes;
  for (int l = 0; l < V::lanes; ++l) lanes[l] = l;
  return lanes;
}

// one register of instruction set I (cpu_isa.h). Kernels that compare or select lanes use it:
// GCC lowers a comparison of wider vectors lane by lane (16 scalar compares for 16 lanes on
// AVX2), while arithmetic on them splits into whole registers.
template <Isa I>
using NativeVec = Vec<kIsaLanes<I>>;

// 16 lanes (Vec<16>) on every instruction set: AdamW's sum of squares, whose double
// accumulators are laid out for it
using V16 = Vec<kLanes>;
__attribute__((always_inline)) inline vfloat load16(const float* p) { return loadv<V16>(p); }
__attribute__((always_inline)) inline vfloat load16(const uint16_t* p) { return loadv<V16>(p); }
__attribute__((always_inline)) inline void store16(float* p, vfloat v) { storev<V16>(p, v); }
__attribute__((always_inline)) inline void store16(uint16_t* p, vfloat v) { storev<V16>(p, v); }

}  // namespace vec
}  // namespace fastgpt

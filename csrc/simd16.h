// 16-lane float vectors (GCC vector extensions) and bfloat16 bit helpers for the CPU kernels.
//
// Kernels write their math once over a "float" type F that is either float or vfloat; each
// target_clones copy of a kernel lowers vfloat to AVX-512, AVX2 or SSE2. bfloat16 data is
// passed as its raw 16 bits (at::BFloat16 is a class, which GCC's vectoriser will not load or
// store). Rounding to bfloat16 is round-to-nearest-even with NaN kept a quiet NaN, bit for bit
// what torch's .to(torch.bfloat16) does.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastgpt {
namespace simd16 {

typedef float vfloat __attribute__((vector_size(64)));
typedef uint32_t vuint __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
typedef uint16_t vhalf __attribute__((vector_size(32)));
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

__attribute__((always_inline)) inline vfloat load16(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
__attribute__((always_inline)) inline vfloat load16(const uint16_t* p) {
  vhalf h;
  std::memcpy(&h, p, sizeof h);
  return from_bits<vfloat>(__builtin_convertvector(h, vuint) << 16);
}
__attribute__((always_inline)) inline void store16(float* p, vfloat v) {
  std::memcpy(p, &v, sizeof v);
}
__attribute__((always_inline)) inline void store16(uint16_t* p, vfloat v) {
  const vhalf h = __builtin_convertvector(bfloat16_bits<vuint>(v), vhalf);
  std::memcpy(p, &h, sizeof h);
}

}  // namespace simd16
}  // namespace fastgpt

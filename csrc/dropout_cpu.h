// Dropout for the CPU transformer block (transformer_block_cpu.cpp) and its attention
// (attention_cpu.cpp), with masks that are a pure function of (seed, row, column).
//
// Why: torch's dropout draws a Bernoulli mask per call (aten::bernoulli_, about 16% of a
// shakespeare-char step on an AVX2 CPU) and stores it for the backward. Here whether an element
// is kept is a hash of its position, computed in registers where the element is used; the
// backward recomputes it instead of reading a stored mask, and one 64-bit seed per block call
// is all that is saved.
// Algorithm: key = splitmix64(seed + (row + 1) * golden ratio) >> 32 once per row; for column j,
// bits = lowbias32(key + j * 0x9E3779B9) >> 8 (24 bits; lowbias32 is C. Wellons' 32-bit
// integer hash: xorshift-multiply twice); the element is kept iff bits >= round(p * 2^24), and
// a kept element is multiplied by 1 / (1 - p), as torch.nn.functional.dropout does. So an
// element is dropped with probability p to within 2^-25.
// Limits: rows < 2^64, columns < 2^32. The stream differs from torch's generator (fastgpt train
// --exact keeps torch's dropout); the seed itself is drawn from torch's default CPU generator,
// so torch.manual_seed makes runs repeatable.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>

#include "vec_cpu.h"

namespace fastgpt {
namespace dropout {

// The drop probability as the kernels use it.
struct Params {
  uint64_t seed;
  double p;           // the drop probability, in [0, 1)
  int32_t threshold;  // keep iff the 24 random bits are >= threshold
  float scale;        // 1 / (1 - p)
  static Params make(uint64_t seed, double p) {
    return {seed, p, int32_t(std::lround(p * double(1 << 24))), float(1.0 / (1.0 - p))};
  }
  static Params none() { return make(0, 0.0); }   // keeps everything: add_dropped_ adds
};

inline uint32_t row_key(uint64_t seed, uint64_t row) {
  uint64_t z = seed + (row + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return uint32_t((z ^ (z >> 31)) >> 32);
}

// 24 random bits for column(s) j of the row with this key; U is uint32_t or a vector of them
template <typename U>
__attribute__((always_inline)) inline U column_bits(uint32_t key, U j) {
  U x = key + j * 0x9E3779B9u;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x >> 8;
}

inline bool keeps(const Params& d, uint32_t key, uint32_t j) {
  return int32_t(column_bits(key, j)) >= d.threshold;
}

// keeps() for columns first, first + 1, ..., one per lane of V (a vec_cpu.h Vec): -1 in a
// kept lane, 0 in a dropped one, as a vector comparison gives it
template <class V>
__attribute__((always_inline)) inline typename V::i kept_lanes(uint32_t key, uint32_t first,
                                                                const Params& d) {
  const typename V::u lanes = (typename V::u)vec::lane_numbers<V>();
  return (typename V::i)column_bits(key, lanes + first) >= d.threshold;
}

// The seed of one of a block's dropout sites (0: attention probabilities, 1: after the
// attention projection, 2: after the MLP) from the block call's seed.
inline uint64_t site_seed(uint64_t seed, int site) {
  return seed ^ (uint64_t(site) * 0xD1B54A32D192ED03ull);
}

// A clear error unless 0 <= p < 1, naming the op.
inline void check_probability(const char* op, double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1); got ", p);
}

// A fresh seed from torch's default CPU generator.
uint64_t draw_seed();

// keep[r, c] for r < rows, c < cols, as a (rows, cols) bool tensor (tests, and the kernels'
// batched-matmul fallbacks for dtypes without a vectorised kernel)
at::Tensor keep_mask(uint64_t seed, int64_t rows, int64_t cols, double p);

// y = residual + dropout(y) in place, y and residual contiguous (N, C) of one dtype
void add_dropped_(at::Tensor& y, const at::Tensor& residual, const Params& d);

// grad * keep * scale as a new tensor: dropout's backward (grad contiguous (N, C))
at::Tensor scale_kept(const at::Tensor& grad, const Params& d);

}  // namespace dropout
}  // namespace fastgpt

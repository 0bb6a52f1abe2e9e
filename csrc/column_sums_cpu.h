// Column sums of a (N, C) gradient for the CPU transformer block: its bias gradients.
//
// Why: aten's bfloat16 sum over dim 0 took ~24 us on the block's (768 x 128..512) gradients
// (two threads, Xeon with AMX), four per layer and step, several times what reading them costs.
// Algorithm: rows in blocks of 64; each block's column sums in fp32 (vectors of the CPU's width,
// cpu_isa.h), blocks spread over threads; the block sums are then added in block order, so the
// result does not depend on the thread count.
// Precision: fp32 accumulation (bfloat16 input widened exactly), rounded once to the dtype.
// Limits: float32 and bfloat16, contiguous; other dtypes go to aten's sum.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "vec_cpu.h"

namespace fastgpt {

// t.sum(0) for a 2-D t, in t's dtype
at::Tensor column_sums(const at::Tensor& t);

// out[c] = the sum over blocks of parts[blk * C + c], added in block order (so the result does
// not depend on which thread summed which block), rounded once to raw_t (float or bf16 bits);
// also the LayerNorm backward's weight and bias gradients from its per-block partial sums
template <typename raw_t>
void sum_block_parts(const float* parts, int64_t blocks, int64_t C, raw_t* out) {
  for (int64_t c = 0; c < C; ++c) {
    float s = 0.0f;
    for (int64_t blk = 0; blk < blocks; ++blk) s += parts[blk * C + c];
    vec::store(out, c, s);
  }
}

}  // namespace fastgpt

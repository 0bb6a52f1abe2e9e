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

namespace fastgpt {

// t.sum(0) for a 2-D t, in t's dtype
at::Tensor column_sums(const at::Tensor& t);

}  // namespace fastgpt

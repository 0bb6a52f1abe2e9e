// Column sums of a (N, C) tensor in row blocks; see column_sums_cpu.h.

#include "column_sums_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu_isa.h"
#include "vec_cpu.h"

namespace fastgpt {
namespace column_sums_detail {
using namespace vec;

constexpr int64_t kRowBlock = 64;

// part[c] = sum of rows [begin, end) of column c
template <class V, typename raw_t>
__attribute__((always_inline)) inline void block_sums(const raw_t* t, int64_t C, int64_t begin,
                                                      int64_t end, float* part) {
  constexpr int64_t L = V::lanes;
  const int64_t Cv = C / L * L;
  std::fill(part, part + C, 0.0f);
  for (int64_t r = begin; r < end; ++r) {
    const raw_t* row = t + r * C;
    for (int64_t c = 0; c < Cv; c += L) storev<V>(part + c, loadv<V>(part + c) + loadv<V>(row + c));
    for (int64_t c = Cv; c < C; ++c) part[c] += load(row, c);
  }
}

template <typename raw_t>
void block_sums_range(const raw_t* t, int64_t N, int64_t C, float* parts, int64_t first,
                      int64_t last) {
  dispatch([&]<Isa I>() __attribute__((always_inline)) {
    for (int64_t blk = first; blk < last; ++blk)
      block_sums<NativeVec<I>>(t, C, blk * kRowBlock, std::min(N, (blk + 1) * kRowBlock),
                               parts + blk * C);
  });
}

template <typename raw_t>
void column_sums_typed(const at::Tensor& t, const at::Tensor& out) {
  const int64_t N = t.size(0), C = t.size(1), blocks = (N + kRowBlock - 1) / kRowBlock;
  const raw_t* tp = static_cast<const raw_t*>(t.const_data_ptr());
  at::Tensor parts = at::empty({blocks, C}, t.options().dtype(at::kFloat));
  float* pp = parts.mutable_data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    block_sums_range(tp, N, C, pp, first, last);
  });
  sum_block_parts(pp, blocks, C, static_cast<raw_t*>(out.mutable_data_ptr()));
}

}  // namespace column_sums_detail

at::Tensor column_sums(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 2);
  if (!t.is_contiguous() ||
      (t.scalar_type() != at::kFloat && t.scalar_type() != at::kBFloat16)) {
    return t.sum(0);
  }
  at::Tensor out = at::empty({t.size(1)}, t.options());
  if (t.scalar_type() == at::kFloat) {
    column_sums_detail::column_sums_typed<float>(t, out);
  } else {
    column_sums_detail::column_sums_typed<uint16_t>(t, out);
  }
  return out;
}

}  // namespace fastgpt

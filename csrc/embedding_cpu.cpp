// CPU kernels of fastgpt::embedding_forward / embedding_backward.
//
// Forward: at::parallel_for over output rows; each row is one memcpy of C elements (libc's
//   memcpy picks the widest vector loads the CPU has). Indices are checked in the same pass;
//   a bad one is reported after the loop, naming the first offending value.
// Backward (always deterministic on CPU): a counting sort groups token positions by row in
//   token order (one serial O(N + V) pass, which also bounds-checks); then the (row, column
//   block) work items are split among threads by their token counts, and each item sums its
//   tokens' gradient rows in token order into an fp32 accumulator. The result does not depend
//   on the thread count: every output element is the same sequence of fp32 additions.
// Precision: forward is an exact copy; backward accumulates in fp32 and rounds once to the
//   gradient's dtype (fp16/bf16 gradients are more accurate than aten's, which adds in fp16/bf16).
// Parallelism: at::parallel_for runs on torch's OpenMP pool only if this file is compiled with
//   -fopenmp (setup.py does); otherwise the pragma in ATen's header is ignored and it runs serially.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "checks.h"

namespace fastgpt {
namespace {

constexpr int64_t kColumnBlock = 256;  // fp32 accumulator of one work item: 1 KiB, stays in L1

template <typename index_t>
[[noreturn]] void throw_first_bad_index(const index_t* idx, int64_t n, int64_t num_weights) {
#define OP_NAME "fastgpt::embedding_forward"
  for (int64_t i = 0; i < n; ++i) CHECK_INDEX_VALUE(static_cast<int64_t>(idx[i]), num_weights);
#undef OP_NAME
  TORCH_INTERNAL_ASSERT(false, "an index was out of range but the rescan found none");
}

template <typename index_t>
void gather_rows(const char* weight, const index_t* idx, char* out, int64_t n,
                 int64_t num_weights, int64_t row_bytes, int64_t row_elems) {
  std::atomic<bool> bad{false};
  // ~32k elements per task, torch's own grain for memory-bound loops
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, row_elems));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    bool local_bad = false;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t k = static_cast<int64_t>(idx[i]);
      if (k < 0 || k >= num_weights) {  // never read outside the table
        local_bad = true;
        std::memset(out + i * row_bytes, 0, row_bytes);
        continue;
      }
      std::memcpy(out + i * row_bytes, weight + k * row_bytes, row_bytes);
    }
    if (local_bad) bad.store(true, std::memory_order_relaxed);
  });
  if (bad.load()) throw_first_bad_index(idx, n, num_weights);
}

at::Tensor embedding_forward_cpu(const at::Tensor& weight_, const at::Tensor& indices_,
                                 int64_t padding_idx) {
  check_forward_inputs(weight_, indices_, padding_idx);
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor indices = indices_.contiguous();
  std::vector<int64_t> out_sizes = indices.sizes().vec();
  out_sizes.push_back(weight.size(1));
  at::Tensor out = at::empty(out_sizes, weight.options());  // (*indices.shape, C)

  const int64_t n = indices.numel(), V = weight.size(0), C = weight.size(1);
  const int64_t row_bytes = C * static_cast<int64_t>(weight.element_size());
  const auto* w = static_cast<const char*>(weight.const_data_ptr());
  auto* o = static_cast<char*>(out.mutable_data_ptr());
  if (indices.scalar_type() == at::kLong)
    gather_rows(w, indices.const_data_ptr<int64_t>(), o, n, V, row_bytes, C);
  else
    gather_rows(w, indices.const_data_ptr<int32_t>(), o, n, V, row_bytes, C);
  return out;
}

// Token positions grouped by row: positions of row v are order[start[v] .. start[v + 1]),
// in increasing token order. Also the bounds check of the backward.
template <typename index_t>
void group_by_row(const index_t* idx, int64_t n, int64_t V, std::vector<int64_t>& start,
                  std::vector<int64_t>& order) {
  start.assign(V + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = static_cast<int64_t>(idx[i]);
#define OP_NAME "fastgpt::embedding_backward"
    CHECK_INDEX_VALUE(k, V);
#undef OP_NAME
    ++start[k + 1];
  }
  for (int64_t v = 0; v < V; ++v) start[v + 1] += start[v];
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  order.resize(n);
  for (int64_t i = 0; i < n; ++i) order[next[static_cast<int64_t>(idx[i])]++] = i;
}

template <typename scalar_t>
void reduce_rows(const scalar_t* grad, scalar_t* out, const std::vector<int64_t>& start,
                 const std::vector<int64_t>& order, int64_t V, int64_t C, int64_t padding_idx) {
  const int64_t blocks = (C + kColumnBlock - 1) / kColumnBlock;
  const int64_t items = V * blocks;  // item = (row v, column block b), row-major
  if (items == 0) return;
  // Split items into one contiguous range per thread with about equal work, so a few very
  // frequent rows (spaces in a character vocabulary) do not leave the other threads idle.
  // Work before item `it`: every token of the earlier rows once per column block, plus one per
  // item for zeroing and writing. Monotonic in `it`, so each boundary is a binary search.
  auto work_before = [&](int64_t it) {
    const int64_t v = it / blocks, b = it % blocks;
    const int64_t row_work = v < V ? start[v + 1] - start[v] + 1 : 0;
    return (start[v] + v) * blocks + b * row_work;
  };
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(items, at::get_num_threads()));
  const int64_t total = work_before(items);
  std::vector<int64_t> bounds(parts + 1, items);
  bounds[0] = 0;
  for (int64_t p = 1; p < parts; ++p) {
    int64_t lo = bounds[p - 1], hi = items;  // first item whose preceding work reaches p/parts
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (work_before(mid) * parts >= total * p) hi = mid; else lo = mid + 1;
    }
    bounds[p] = lo;
  }
  at::parallel_for(0, parts, 1, [&](int64_t pbegin, int64_t pend) {
    float local[kColumnBlock];
    for (int64_t it = bounds[pbegin]; it < bounds[pend]; ++it) {
      const int64_t v = it / blocks, c0 = (it % blocks) * kColumnBlock;
      const int64_t width = std::min(kColumnBlock, C - c0);
      scalar_t* dst = out + v * C + c0;
      // fp32 gradients accumulate in place; fp16/bf16 ones in a local fp32 block
      float* acc;
      if constexpr (std::is_same_v<scalar_t, float>) acc = dst; else acc = local;
      std::fill(acc, acc + width, 0.0f);
      if (v != padding_idx) {
        for (int64_t j = start[v]; j < start[v + 1]; ++j) {
          const scalar_t* __restrict__ g = grad + order[j] * C + c0;
          float* __restrict__ a = acc;
          for (int64_t c = 0; c < width; ++c) a[c] += static_cast<float>(g[c]);
        }
      }
      if constexpr (!std::is_same_v<scalar_t, float>)
        for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

at::Tensor embedding_backward_cpu(const at::Tensor& grad_out_, const at::Tensor& indices_,
                                  c10::SymInt num_weights_, int64_t padding_idx,
                                  bool deterministic) {
  (void)deterministic;  // the CPU algorithm is deterministic and as fast as a racy one would be
  const int64_t V = num_weights_.guard_int(__FILE__, __LINE__);
  check_backward_inputs(grad_out_, indices_, V, padding_idx);
  const at::Tensor indices = indices_.contiguous();
  const int64_t n = indices.numel(), C = grad_out_.size(-1);
  const at::Tensor grad = grad_out_.contiguous();
  at::Tensor out = at::empty({V, C}, grad.options());

  std::vector<int64_t> start, order;
  if (indices.scalar_type() == at::kLong)
    group_by_row(indices.const_data_ptr<int64_t>(), n, V, start, order);
  else
    group_by_row(indices.const_data_ptr<int32_t>(), n, V, start, order);

  switch (grad.scalar_type()) {
    case at::kFloat:
      reduce_rows(grad.const_data_ptr<float>(), out.mutable_data_ptr<float>(), start, order, V, C,
                  padding_idx);
      break;
    case at::kHalf:
      reduce_rows(grad.const_data_ptr<at::Half>(), out.mutable_data_ptr<at::Half>(), start, order,
                  V, C, padding_idx);
      break;
    default:  // kBFloat16; check_backward_inputs allowed nothing else
      reduce_rows(grad.const_data_ptr<at::BFloat16>(), out.mutable_data_ptr<at::BFloat16>(),
                  start, order, V, C, padding_idx);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("embedding_forward", &embedding_forward_cpu);
  m.impl("embedding_backward", &embedding_backward_cpu);
}

}  // namespace fastgpt

// CPU kernels of fastgpt::embedding_forward / embedding_backward.
//
// Forward: at::parallel_for over output rows, each row copied in 64-byte blocks (AVX-512,
//   AVX2 or SSE clones). Indices are checked in the same pass; a bad one is reported after the
//   loop, naming the first offending value.
// Memory: outputs of 32 MiB or more are advised as transparent huge pages (huge_pages.h).
// Backward (always deterministic on CPU), every output element summed over its tokens in token
//   order in fp32, so the result does not depend on the thread count or on which of two
//   algorithms ran (they give the same bits):
//   - small tables (V x C fp32 <= 2 MiB, e.g. a character vocabulary): each thread owns a
//     column slice of all rows and streams through the tokens in order (scan_tokens);
//   - large tables: token positions are grouped by row (group_by_row: a stable sort when there
//     are few tokens per row, else a counting sort), the (row, column block) work items and
//     the runs of rows without tokens between them are split among threads by their cost, and
//     each item sums its tokens' rows, each run is one memset (reduce_groups).
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
#include "cpu_isa.h"
#include "huge_pages.h"

namespace fastgpt {
namespace {

constexpr int64_t kColumnBlock = 256;  // fp32 accumulator of one work item: 1 KiB, stays in L1

// Raises op's IndexError for the first index outside [0, num_weights), in token order.
template <typename index_t>
void check_every_index(const char* op, const index_t* idx, int64_t n, int64_t num_weights) {
#define OP_NAME op
  for (int64_t i = 0; i < n; ++i) CHECK_INDEX_VALUE(static_cast<int64_t>(idx[i]), num_weights);
#undef OP_NAME
}

// Copies rows [begin, end) of the output; returns false if an index was out of range (that row
// is zeroed, nothing outside the table is read). Rows are copied in 64-byte blocks inline: a
// memcpy call per row costs about as much as copying a 512-byte row itself.
template <typename index_t>
__attribute__((always_inline)) inline bool gather_range(const char* weight, const index_t* idx,
                                                       char* out, int64_t begin, int64_t end,
                                                       int64_t num_weights, int64_t row_bytes) {
  constexpr int64_t kBlock = 64;
  const int64_t blocks = row_bytes / kBlock, tail = row_bytes % kBlock;
  bool ok = true;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t k = static_cast<int64_t>(idx[i]);
    char* dst = out + i * row_bytes;
    if (k < 0 || k >= num_weights) {  // never read outside the table
      ok = false;
      std::memset(dst, 0, row_bytes);
      continue;
    }
    const char* src = weight + k * row_bytes;
    for (int64_t b = 0; b < blocks; ++b) __builtin_memcpy(dst + b * kBlock, src + b * kBlock, kBlock);
    if (tail) std::memcpy(dst + blocks * kBlock, src + blocks * kBlock, tail);
  }
  return ok;
}

// one copy per instruction set (cpu_isa.h): the fixed-size row copies use its widest moves
template <typename index_t>
bool gather_range_isa(const char* weight, const index_t* idx, char* out, int64_t begin,
                      int64_t end, int64_t num_weights, int64_t row_bytes) {
  bool ok = true;
  dispatch([&]<Isa>() __attribute__((always_inline)) {
    ok = gather_range(weight, idx, out, begin, end, num_weights, row_bytes);
  });
  return ok;
}

template <typename index_t>
void gather_rows(const char* weight, const index_t* idx, char* out, int64_t n,
                 int64_t num_weights, int64_t row_bytes, int64_t row_elems) {
  std::atomic<bool> bad{false};
  // ~32k elements per task, torch's own grain for memory-bound loops
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, row_elems));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    if (!gather_range_isa(weight, idx, out, begin, end, num_weights, row_bytes)) bad.store(true, std::memory_order_relaxed);
  });
  if (bad.load()) {  // name the first bad index, as the backward does
    check_every_index("fastgpt::embedding_forward", idx, n, num_weights);
    TORCH_INTERNAL_ASSERT(false, "an index was out of range but the rescan found none");
  }
}

at::Tensor embedding_forward_cpu(const at::Tensor& weight_, const at::Tensor& indices_,
                                 int64_t padding_idx) {
  check_forward_inputs(weight_, indices_, padding_idx);
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor indices = indices_.contiguous();
  std::vector<int64_t> out_sizes = indices.sizes().vec();
  out_sizes.push_back(weight.size(1));
  at::Tensor out = at::empty(out_sizes, weight.options());  // (*indices.shape, C)
  advise_huge_pages(out);

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

// The rows that get a gradient and their tokens: row rows[r] sums the gradient rows at positions
// order[first[r] .. first[r + 1]), in increasing token order. rows ascend; padding tokens are
// left out (that row is zeroed like any row without tokens). Indices are in [0, V).
struct RowGroups {
  std::vector<int64_t> rows, first, order;
};

template <typename index_t>
RowGroups group_by_row(const index_t* idx, int64_t n, int64_t V, int64_t padding_idx) {
  RowGroups g;
  g.order.reserve(n);
  if (n < V / 8) {
    // few tokens, many rows: sort the positions by row, O(n log n) with no pass over all V rows
    for (int64_t i = 0; i < n; ++i)
      if (idx[i] != padding_idx) g.order.push_back(i);
    std::stable_sort(g.order.begin(), g.order.end(),
                     [idx](int64_t a, int64_t b) { return idx[a] < idx[b]; });
    for (size_t j = 0; j < g.order.size(); ++j) {
      const int64_t k = static_cast<int64_t>(idx[g.order[j]]);
      if (g.rows.empty() || g.rows.back() != k) {
        g.rows.push_back(k);
        g.first.push_back(static_cast<int64_t>(j));
      }
    }
  } else {
    // counting sort, O(n + V)
    std::vector<int64_t> next(V, 0);  // tokens per row, then where the row's next position goes
    for (int64_t i = 0; i < n; ++i) ++next[static_cast<int64_t>(idx[i])];
    if (padding_idx >= 0) next[padding_idx] = 0;
    int64_t total = 0;
    for (int64_t v = 0; v < V; ++v) {
      const int64_t count = next[v];
      if (count > 0) {
        g.rows.push_back(v);
        g.first.push_back(total);
      }
      next[v] = total;
      total += count;
    }
    g.order.resize(total);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t k = static_cast<int64_t>(idx[i]);
      if (k != padding_idx) g.order[next[k]++] = i;
    }
  }
  g.first.push_back(static_cast<int64_t>(g.order.size()));
  return g;
}

// Writes all V rows: the groups' sums and zeros for every other row. Work items are (group r,
// column block b), row-major, with one extra group r = R standing for the rows after the last
// group; item (r, 0) also zeroes the rows between group r - 1 and group r ("gap r").
template <typename scalar_t>
void reduce_groups(const scalar_t* grad, scalar_t* out, const RowGroups& g, int64_t V, int64_t C) {
  const int64_t blocks = (C + kColumnBlock - 1) / kColumnBlock;
  if (blocks == 0) return;  // C == 0: nothing to write
  const int64_t R = static_cast<int64_t>(g.rows.size());
  const int64_t items = (R + 1) * blocks;
  auto gap_begin = [&](int64_t r) { return r == 0 ? 0 : g.rows[r - 1] + 1; };
  auto gap_end = [&](int64_t r) { return r == R ? V : g.rows[r]; };
  auto tokens = [&](int64_t r) { return r == R ? 0 : g.first[r + 1] - g.first[r]; };
  // Split the items into one contiguous range per thread with about equal work, so a few very
  // frequent rows (spaces in a character vocabulary) or long runs of untouched rows do not
  // leave the other threads idle. Cost, in row blocks: an item sums its tokens and writes
  // once (tokens + 1); a zeroed row writes each of its blocks once.
  std::vector<int64_t> group_work(R + 2, 0);  // work before group r
  for (int64_t r = 0; r <= R; ++r)
    group_work[r + 1] = group_work[r] + (gap_end(r) - gap_begin(r) + tokens(r) + 1) * blocks;
  auto work_before = [&](int64_t it) {
    const int64_t r = it / blocks, b = it % blocks;
    if (r > R) return group_work[R + 1];
    return group_work[r] + (b > 0 ? (gap_end(r) - gap_begin(r)) * blocks : 0) + b * (tokens(r) + 1);
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
      const int64_t r = it / blocks, c0 = (it % blocks) * kColumnBlock;
      if (c0 == 0) {
        const int64_t v0 = gap_begin(r), v1 = gap_end(r);
        if (v1 > v0) std::memset(out + v0 * C, 0, (v1 - v0) * C * sizeof(scalar_t));
      }
      if (r == R) continue;
      const int64_t width = std::min(kColumnBlock, C - c0);
      scalar_t* dst = out + g.rows[r] * C + c0;
      // fp32 gradients accumulate in place; fp16/bf16 ones in a local fp32 block
      float* acc;
      if constexpr (std::is_same_v<scalar_t, float>) acc = dst; else acc = local;
      std::fill(acc, acc + width, 0.0f);
      for (int64_t j = g.first[r]; j < g.first[r + 1]; ++j) {
        const scalar_t* __restrict__ src = grad + g.order[j] * C + c0;
        float* __restrict__ a = acc;
        for (int64_t c = 0; c < width; ++c) a[c] += static_cast<float>(src[c]);
      }
      if constexpr (!std::is_same_v<scalar_t, float>)
        for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

// Small tables: every thread owns a slice of columns (whole cache lines) of all V rows and
// streams through the tokens in order, adding each token's slice into its row. Reads are
// sequential and the V x slice fp32 accumulators stay in cache; each element is still summed
// in token order, so the result is bitwise the same as reduce_groups'.
template <typename scalar_t, typename index_t>
void scan_tokens(const scalar_t* grad, const index_t* idx, scalar_t* out, int64_t n, int64_t V,
                 int64_t C, int64_t padding_idx) {
  constexpr int64_t kLine = 16;  // floats per 64-byte cache line
  const int64_t lines = (C + kLine - 1) / kLine;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(lines, at::get_num_threads()));
  at::parallel_for(0, parts, 1, [&](int64_t pbegin, int64_t pend) {
    for (int64_t p = pbegin; p < pend; ++p) {
      const int64_t c0 = lines * p / parts * kLine;
      const int64_t width = std::min(C, lines * (p + 1) / parts * kLine) - c0;
      // fp32 gradients accumulate in place (row stride C); fp16/bf16 in a V x width buffer
      std::vector<float> buffer;
      float* acc;
      int64_t stride;
      if constexpr (std::is_same_v<scalar_t, float>) {
        acc = out + c0;
        stride = C;
      } else {
        buffer.resize(V * width);
        acc = buffer.data();
        stride = width;
      }
      for (int64_t v = 0; v < V; ++v) std::fill(acc + v * stride, acc + v * stride + width, 0.0f);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t k = static_cast<int64_t>(idx[i]);
        if (k == padding_idx) continue;
        const scalar_t* __restrict__ g = grad + i * C + c0;
        float* __restrict__ a = acc + k * stride;
        for (int64_t c = 0; c < width; ++c) a[c] += static_cast<float>(g[c]);
      }
      if constexpr (!std::is_same_v<scalar_t, float>)
        for (int64_t v = 0; v < V; ++v)
          for (int64_t c = 0; c < width; ++c)
            out[v * C + c0 + c] = static_cast<scalar_t>(acc[v * stride + c]);
    }
  });
}

// fp32 accumulators of at most this size use scan_tokens, larger tables reduce_groups
constexpr int64_t kScanBytes = 1 << 21;

template <typename scalar_t, typename index_t>
void backward_typed(const at::Tensor& grad, const at::Tensor& indices, at::Tensor& out,
                    int64_t padding_idx) {
  const int64_t n = indices.numel(), V = out.size(0), C = out.size(1);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const index_t* idx = indices.const_data_ptr<index_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  check_every_index("fastgpt::embedding_backward", idx, n, V);
  if (V * C * static_cast<int64_t>(sizeof(float)) <= kScanBytes)
    scan_tokens(g, idx, o, n, V, C, padding_idx);
  else
    reduce_groups(g, o, group_by_row(idx, n, V, padding_idx), V, C);
}

template <typename scalar_t>
void backward_index_dispatch(const at::Tensor& grad, const at::Tensor& indices, at::Tensor& out,
                             int64_t padding_idx) {
  if (indices.scalar_type() == at::kLong)
    backward_typed<scalar_t, int64_t>(grad, indices, out, padding_idx);
  else
    backward_typed<scalar_t, int32_t>(grad, indices, out, padding_idx);
}

at::Tensor embedding_backward_cpu(const at::Tensor& grad_out_, const at::Tensor& indices_,
                                  c10::SymInt num_weights_, int64_t padding_idx,
                                  bool deterministic) {
  (void)deterministic;  // the CPU algorithms are deterministic and as fast as racy ones would be
  const int64_t V = num_weights_.guard_int(__FILE__, __LINE__);
  check_backward_inputs(grad_out_, indices_, V, padding_idx);
  const at::Tensor indices = indices_.contiguous();
  const at::Tensor grad = grad_out_.contiguous();
  at::Tensor out = at::empty({V, grad.size(-1)}, grad.options());
  advise_huge_pages(out);
  switch (grad.scalar_type()) {
    case at::kFloat: backward_index_dispatch<float>(grad, indices, out, padding_idx); break;
    case at::kHalf: backward_index_dispatch<at::Half>(grad, indices, out, padding_idx); break;
    default:  // kBFloat16; check_backward_inputs allowed nothing else
      backward_index_dispatch<at::BFloat16>(grad, indices, out, padding_idx);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("embedding_forward", &embedding_forward_cpu);
  m.impl("embedding_backward", &embedding_backward_cpu);
}

}  // namespace fastgpt

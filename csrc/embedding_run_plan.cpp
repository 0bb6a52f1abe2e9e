// plan_runs: see embedding_run_plan.h.

#include "embedding_run_plan.h"

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastgpt {

RunPlan plan_runs(const at::Tensor& indices, int64_t chunk) {
  TORCH_INTERNAL_ASSERT(chunk >= 1 && indices.dim() == 1 && indices.numel() >= 1 &&
                        indices.scalar_type() == at::kLong);
  RunPlan p;
  std::tie(p.sorted, p.order) = at::sort(indices, /*stable=*/true, 0, /*descending=*/false);
  const int64_t n = indices.numel();
  const at::TensorOptions opts = indices.options();
  at::Tensor is_begin = at::ones({n}, opts.dtype(at::kBool));
  if (n > 1) is_begin.slice(0, 1).copy_(p.sorted.slice(0, 1).ne(p.sorted.slice(0, 0, n - 1)));
  const at::Tensor run_of = at::cumsum(is_begin, 0, at::kLong) - 1;  // (n,) run of each position
  // (n + 1,) slot r holds run r's first position; the slots past the last run keep n, so that
  // run r ends where slot r + 1 begins. Sized by n, not R, so that nothing waits for R yet.
  const at::Tensor begins = at::full({n + 1}, n, opts).scatter_reduce_(
      0, run_of, at::arange(n, opts), "amin", /*include_self=*/true);
  const at::Tensor length = begins.slice(0, 1) - begins.slice(0, 0, n);  // 0 past the last run
  const at::Tensor chunks = at::where(length.gt(chunk), (length + (chunk - 1)).div(chunk, "floor"),
                                      at::zeros_like(length));
  const at::Tensor run_chunks = at::cat({at::zeros({1}, opts), at::cumsum(chunks, 0)});
  // the one read-back: smallest index, largest index, R, Q
  const at::Tensor host = at::stack({p.sorted[0], p.sorted[n - 1], run_of[n - 1] + 1,
                                     run_chunks[n]}).cpu();
  const int64_t* h = host.const_data_ptr<int64_t>();
  p.min_index = h[0];
  p.max_index = h[1];
  p.runs = h[2];
  p.chunks = h[3];
  p.run_begin = begins.slice(0, 0, p.runs);
  p.run_end = begins.slice(0, 1, p.runs + 1);
  p.run_chunks = run_chunks.slice(0, 0, p.runs + 1);
  // the run of each chunk. The output size must be passed as an optional: a plain int64_t
  // would pick the overload that repeats every element of `chunks` that many times.
  const at::Tensor owner =
      at::repeat_interleave(chunks.slice(0, 0, p.runs), std::optional<int64_t>(p.chunks));
  const at::Tensor rank = at::arange(p.chunks, opts) - p.run_chunks.index_select(0, owner);
  p.chunk_begin = p.run_begin.index_select(0, owner) + rank * chunk;
  p.chunk_end = at::minimum(p.chunk_begin + chunk, p.run_end.index_select(0, owner));
  return p;
}

}  // namespace fastgpt

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
  p.run_begin = at::nonzero(is_begin).view(-1);  // waits for the device
  p.run_end = at::cat({p.run_begin.slice(0, 1), at::full({1}, n, opts)});
  const at::Tensor length = p.run_end - p.run_begin;
  const at::Tensor chunks = at::where(length.gt(chunk), (length + (chunk - 1)).div(chunk, "floor"),
                                      at::zeros_like(length));
  p.run_chunks = at::cat({at::zeros({1}, opts), at::cumsum(chunks, 0)});
  p.chunks = p.run_chunks[-1].item<int64_t>();  // waits for the device
  // the run of each chunk. The output size must be passed as an optional: a plain int64_t
  // would pick the overload that repeats every element of `chunks` that many times.
  const at::Tensor owner = at::repeat_interleave(chunks, std::optional<int64_t>(p.chunks));
  const at::Tensor rank = at::arange(p.chunks, opts) - p.run_chunks.index_select(0, owner);
  p.chunk_begin = p.run_begin.index_select(0, owner) + rank * chunk;
  p.chunk_end = at::minimum(p.chunk_begin + chunk, p.run_end.index_select(0, owner));
  return p;
}

}  // namespace fastgpt

// The plan of the deterministic CUDA embedding backward (embedding_gpu.h): the token positions
// sorted by index, the runs of equal indices, and the fixed-size chunks of the long runs.
//
// It is built with ATen ops only, so the same code runs on any device: on the GPU for the CUDA
// backward, on the CPU for its emulation (embedding_cuda_emulated.cpp), which the tests run.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastgpt {

struct RunPlan {
  at::Tensor sorted, order;           // (n,) indices sorted (stably) and their token positions
  at::Tensor run_begin, run_end;      // (R,) sorted positions [begin, end) of each run
  at::Tensor run_chunks;              // (R + 1,) run r owns chunks [run_chunks[r], run_chunks[r + 1])
  at::Tensor chunk_begin, chunk_end;  // (Q,) sorted positions [begin, end) of each chunk
  int64_t runs = 0, chunks = 0;       // R, Q
  int64_t min_index = 0, max_index = 0;  // for the caller's bounds check
};

// indices: flat int64, at least one element. Runs longer than `chunk` positions are cut into
// consecutive chunks of `chunk` positions (the last may be shorter); shorter runs get none.
// Index values are only compared, never used to address memory, so out-of-range ones are safe
// here. Everything the host needs (R, Q, the smallest and the largest index) comes back from
// the device in one copy: the plan costs one sync.
RunPlan plan_runs(const at::Tensor& indices, int64_t chunk);

}  // namespace fastgpt

// The GPU embedding kernels of fastgpt::embedding_forward / embedding_backward, and the host code
// that checks, plans and launches them, written once for two launchers:
//   CudaLauncher (embedding_cuda.cu) runs each kernel as a CUDA grid on the current stream;
//   SerialLauncher (embedding_cuda_emulated.cpp) runs every thread of the same grid one after
//   another on the CPU, so that CI, which has no GPU, tests this code (indexing, launch shapes,
//   vector widths, the deterministic plan, bounds checks) against the reference. That is exact
//   for these kernels: they use no shared memory and no barriers, and threads meet only in
//   atomicAdd, which becomes a plain add.
//
// Forward: a block of 256 threads is a (rows, lanes) grid: each row of `lanes` threads (a warp
//   or less) copies one output row, lane by lane, in the widest load the row's byte length and
//   alignment allow (16 bytes when C * sizeof(T) % 16 == 0, then 8, 4, 2).
// Backward, deterministic (default): sort the flattened indices (stable, so equal indices keep
//   token order) and find the runs of equal indices (embedding_run_plan.h, ATen ops). Runs
//   longer than kChunk positions are cut into chunks of kChunk; phase 1 sums each chunk's
//   gradient rows into an fp32 partial row; phase 2 gives each run one thread group that sums
//   either its gradient rows (short run) or its chunks' partial rows (long run), in order, in
//   fp32 registers, and writes its weight row once. No float atomics: bitwise reproducible, and
//   a very frequent index (a space in a character vocabulary) is summed by many thread groups,
//   not one. Column slices of a row go to separate thread groups (blockIdx.y).
// Backward, deterministic=False: one thread group per token adds its row into an fp32 buffer
//   with atomicAdd; fp16/bf16 gradients are rounded from that buffer at the end.
// Bounds: an out-of-range index never reads or writes outside a tensor. Both ops read the
//   indices' min and max back before launching (extreme_index, or with the deterministic
//   plan's counts) and raise the same IndexError as the CPU, at one device-to-host sync per
//   call: the price of a clear error instead of a device-side assert that poisons the context.
// Precision: forward copies bits; backward accumulates in fp32, one rounding to the grad dtype.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/SymInt.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "checks.h"
#include "embedding_run_plan.h"

#if defined(__CUDACC__)
#define FASTGPT_HD __host__ __device__ __forceinline__
#define FASTGPT_UNROLL _Pragma("unroll")
#else
#define FASTGPT_HD inline
#define FASTGPT_UNROLL
#endif

namespace fastgpt {
namespace embedding_gpu {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond this
constexpr int64_t kChunk = 32;           // deterministic backward: positions per partial sum

struct Dim {  // a grid's or a block's shape; z is always 1
  unsigned x = 1, y = 1;
};
struct Launch {
  Dim grid, block;
};
struct Thread {  // blockIdx, threadIdx, blockDim, gridDim
  Dim block_idx, thread_idx, block_dim, grid_dim;
};

// 16- and 8-byte words for the forward's row copies: CUDA's vector types on the GPU (one
// 128-/64-bit load and store each), plain structs of the same size and alignment on the CPU
#if defined(__CUDACC__)
using Bytes16 = uint4;
using Bytes8 = uint2;
#else
struct alignas(16) Bytes16 {
  uint32_t x, y, z, w;
};
struct alignas(8) Bytes8 {
  uint32_t x, y;
};
#endif

// VEC consecutive elements of a row, loaded and stored as one aligned access
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

FASTGPT_HD void atomic_add(float* address, float value) {
#if defined(__CUDA_ARCH__)
  atomicAdd(address, value);
#else
  *address += value;  // the serial launcher runs one thread at a time
#endif
}

// ---------------------------------------------------------------------------------- kernels
// Each kernel is a struct: Params (its arguments) and run(thread, params), one thread's work.

// Every kernel walks its items (rows, tokens, chunks or runs) grid-stride: thread group y of
// block x takes item x * blockDim.y + y, then every gridDim.x * blockDim.y-th after it.
FASTGPT_HD int64_t first_item(const Thread& t) {
  return t.block_idx.x * static_cast<int64_t>(t.block_dim.y) + t.thread_idx.y;
}
FASTGPT_HD int64_t item_stride(const Thread& t) {
  return static_cast<int64_t>(t.grid_dim.x) * t.block_dim.y;
}

// The first column of a backward thread: blockIdx.y picks a slice of blockDim.x * VEC columns.
template <int VEC>
FASTGPT_HD int64_t first_column(const Thread& t) {
  return (static_cast<int64_t>(t.block_idx.y) * t.block_dim.x + t.thread_idx.x) * VEC;
}

// Forward: thread group (y) = one output row at a time (grid-stride), lanes (x) over its words.
template <typename vec_t, typename index_t>
struct ForwardRows {
  struct Params {
    const vec_t* weight;
    const index_t* idx;
    vec_t* out;
    int64_t n, num_weights, row_vecs;
  };
  static FASTGPT_HD void run(const Thread& t, const Params& p) {
    for (int64_t row = first_item(t); row < p.n; row += item_stride(t)) {
      const int64_t k = static_cast<int64_t>(p.idx[row]);
      // the host checked every index; this only guards memory should that ever change
      if (k < 0 || k >= p.num_weights) continue;
      vec_t* dst = p.out + row * p.row_vecs;
      const vec_t* src = p.weight + k * p.row_vecs;
      for (int64_t c = t.thread_idx.x; c < p.row_vecs; c += t.block_dim.x) dst[c] = src[c];
    }
  }
};

// Deterministic backward, phase 1: thread group (y) = one chunk of kChunk consecutive sorted
// positions of a long run; sums their gradient rows into its fp32 row of `partial`.
template <typename scalar_t, int VEC>
struct ChunkSums {
  struct Params {
    const scalar_t* grad;
    const int64_t *order, *chunk_begin, *chunk_end;
    float* partial;
    int64_t chunks, C;
  };
  static FASTGPT_HD void run(const Thread& t, const Params& p) {
    using P = Pack<scalar_t, VEC>;
    const int64_t c = first_column<VEC>(t);
    if (c >= p.C) return;
    for (int64_t q = first_item(t); q < p.chunks; q += item_stride(t)) {
      float acc[VEC];
      FASTGPT_UNROLL
      for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
      for (int64_t j = p.chunk_begin[q]; j < p.chunk_end[q]; ++j) {
        const P g = *reinterpret_cast<const P*>(p.grad + p.order[j] * p.C + c);
        FASTGPT_UNROLL
        for (int e = 0; e < VEC; ++e) acc[e] += static_cast<float>(g.v[e]);
      }
      FASTGPT_UNROLL
      for (int e = 0; e < VEC; ++e) p.partial[q * p.C + c + e] = acc[e];
    }
  }
};

// Phase 2: thread group (y) = one run of equal sorted indices (one weight row). A run of at most
// kChunk positions sums its gradient rows; a longer one sums its chunks' partial rows, in order.
// Either way the order is fixed by the data alone: bitwise reproducible, no float atomics.
template <typename scalar_t, int VEC>
struct RunSums {
  struct Params {
    const scalar_t* grad;
    const int64_t *sorted, *order, *run_begin, *run_end, *run_chunks;
    const float* partial;
    scalar_t* grad_weight;
    int64_t runs, C, padding_idx;
  };
  static FASTGPT_HD void run(const Thread& t, const Params& p) {
    using P = Pack<scalar_t, VEC>;
    const int64_t c = first_column<VEC>(t);
    if (c >= p.C) return;
    for (int64_t r = first_item(t); r < p.runs; r += item_stride(t)) {
      const int64_t k = p.sorted[p.run_begin[r]];
      if (k == p.padding_idx) continue;  // the padding row stays zero
      float acc[VEC];
      FASTGPT_UNROLL
      for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
      if (p.run_chunks[r] == p.run_chunks[r + 1]) {  // short run: no chunks
        for (int64_t j = p.run_begin[r]; j < p.run_end[r]; ++j) {
          const P g = *reinterpret_cast<const P*>(p.grad + p.order[j] * p.C + c);
          FASTGPT_UNROLL
          for (int e = 0; e < VEC; ++e) acc[e] += static_cast<float>(g.v[e]);
        }
      } else {
        for (int64_t q = p.run_chunks[r]; q < p.run_chunks[r + 1]; ++q)
          FASTGPT_UNROLL
          for (int e = 0; e < VEC; ++e) acc[e] += p.partial[q * p.C + c + e];
      }
      P o;
      FASTGPT_UNROLL
      for (int e = 0; e < VEC; ++e) o.v[e] = static_cast<scalar_t>(acc[e]);
      *reinterpret_cast<P*>(p.grad_weight + k * p.C + c) = o;
    }
  }
};

// Non-deterministic backward: thread group (y) = one token, atomically added into fp32 rows.
template <typename scalar_t, int VEC>
struct AtomicSums {
  struct Params {
    const scalar_t* grad;
    const int64_t* idx;
    float* grad_weight;
    int64_t n, num_weights, C, padding_idx;
  };
  static FASTGPT_HD void run(const Thread& t, const Params& p) {
    using P = Pack<scalar_t, VEC>;
    const int64_t c = first_column<VEC>(t);
    if (c >= p.C) return;
    for (int64_t i = first_item(t); i < p.n; i += item_stride(t)) {
      const int64_t k = p.idx[i];
      // the host checked every index; this only guards memory should that ever change
      if (k < 0 || k >= p.num_weights || k == p.padding_idx) continue;
      const P g = *reinterpret_cast<const P*>(p.grad + i * p.C + c);
      FASTGPT_UNROLL
      for (int e = 0; e < VEC; ++e)
        atomic_add(p.grad_weight + k * p.C + c + e, static_cast<float>(g.v[e]));
    }
  }
};

// ------------------------------------------------------------------------------- host code
// A Launcher is constructed from the inputs' device (the CUDA one sets it current and takes
// its current stream) and has launch<Kernel>(Launch, Kernel::Params).

// The index a bounds check of [0, num_weights) must look at: the smallest if it is negative,
// else the largest.
inline int64_t extreme_of(int64_t lo, int64_t hi) { return lo < 0 ? lo : hi; }

// The same, read back from the device: one small device-to-host copy (it waits for the stream),
// the price of the same IndexError as on the CPU, raised before any kernel indexes with them,
// instead of a device-side assert that poisons the context.
inline int64_t extreme_index(const at::Tensor& idx) {
  const auto [lo, hi] = at::aminmax(idx);
  const at::Tensor range = at::stack({lo, hi}).to(at::kCPU, at::kLong);
  return extreme_of(range.const_data_ptr<int64_t>()[0], range.const_data_ptr<int64_t>()[1]);
}

inline int lanes_for(int64_t units) {  // threads per row: a power of two, at most a warp
  int lanes = 1;
  while (lanes < 32 && lanes < units) lanes *= 2;
  return lanes;
}

inline Launch rows_launch(int64_t items, int lanes, unsigned slices) {
  const unsigned rows = kThreads / lanes;
  const int64_t groups = std::max<int64_t>(1, std::min<int64_t>((items + rows - 1) / rows, kMaxBlocks));
  return {{static_cast<unsigned>(groups), slices}, {static_cast<unsigned>(lanes), rows}};
}

template <typename vec_t, typename index_t, class Launcher>
void launch_forward(const Launcher& launcher, const at::Tensor& weight, const at::Tensor& indices,
                    at::Tensor& out) {
  const int64_t row_vecs =
      weight.size(1) * weight.element_size() / static_cast<int64_t>(sizeof(vec_t));
  launcher.template launch<ForwardRows<vec_t, index_t>>(
      rows_launch(indices.numel(), lanes_for(row_vecs), 1),
      {static_cast<const vec_t*>(weight.const_data_ptr()), indices.const_data_ptr<index_t>(),
       static_cast<vec_t*>(out.mutable_data_ptr()), indices.numel(), weight.size(0), row_vecs});
}

template <typename index_t, class Launcher>
void forward_dispatch_width(const Launcher& launcher, const at::Tensor& weight,
                            const at::Tensor& indices, at::Tensor& out) {
  const int64_t row_bytes = weight.size(1) * weight.element_size();
  const auto aligned = [&](int64_t w) {
    return row_bytes % w == 0 && reinterpret_cast<uintptr_t>(weight.const_data_ptr()) % w == 0 &&
           reinterpret_cast<uintptr_t>(out.const_data_ptr()) % w == 0;
  };
  if (aligned(16)) launch_forward<Bytes16, index_t>(launcher, weight, indices, out);
  else if (aligned(8)) launch_forward<Bytes8, index_t>(launcher, weight, indices, out);
  else if (aligned(4)) launch_forward<uint32_t, index_t>(launcher, weight, indices, out);
  else launch_forward<uint16_t, index_t>(launcher, weight, indices, out);
}

template <class Launcher>
at::Tensor embedding_forward(const at::Tensor& weight_, const at::Tensor& indices_,
                             int64_t padding_idx) {
  check_forward_inputs(weight_, indices_, padding_idx);
  const Launcher launcher(weight_.device());
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor indices = indices_.contiguous();
  std::vector<int64_t> out_sizes = indices.sizes().vec();
  out_sizes.push_back(weight.size(1));
  at::Tensor out = at::empty(out_sizes, weight.options());  // (*indices.shape, C)
  if (indices.numel() == 0) return out;
#define OP_NAME "fastgpt::embedding_forward"
  CHECK_INDEX_VALUE(extreme_index(indices), weight.size(0));
#undef OP_NAME
  if (weight.size(1) == 0) return out;  // nothing to copy
  if (indices.scalar_type() == at::kLong)
    forward_dispatch_width<int64_t>(launcher, weight, indices, out);
  else
    forward_dispatch_width<int32_t>(launcher, weight, indices, out);
  return out;
}

// Backward launch shape: thread groups of `lanes` threads (y) over `items` (tokens, chunks or
// runs), blockIdx.y over column slices of lanes * VEC elements.
template <int VEC>
Launch backward_launch(int64_t items, int64_t C) {
  const int lanes = lanes_for((C + VEC - 1) / VEC);
  const int64_t slice = static_cast<int64_t>(lanes) * VEC;
  const int64_t slices = (C + slice - 1) / slice;
  TORCH_CHECK(slices <= 65535, "fastgpt::embedding_backward: rows of ", C, " elements are too wide");
  return rows_launch(items, lanes, static_cast<unsigned>(slices));
}

// plan: the deterministic backward's (runs and chunks); null for the atomic one
template <typename scalar_t, int VEC, class Launcher>
void launch_backward(const Launcher& launcher, const at::Tensor& grad, const at::Tensor& idx,
                     const RunPlan* plan, at::Tensor& grad_weight, int64_t padding_idx) {
  const int64_t n = idx.numel(), C = grad.size(-1), V = grad_weight.size(0);
  if (plan == nullptr) {
    launcher.template launch<AtomicSums<scalar_t, VEC>>(
        backward_launch<VEC>(n, C),
        {grad.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
         grad_weight.mutable_data_ptr<float>(), n, V, C, padding_idx});
    return;
  }
  const RunPlan& p = *plan;
  at::Tensor partial;
  if (p.chunks > 0) {
    partial = at::empty({p.chunks, C}, grad.options().dtype(at::kFloat));
    launcher.template launch<ChunkSums<scalar_t, VEC>>(
        backward_launch<VEC>(p.chunks, C),
        {grad.const_data_ptr<scalar_t>(), p.order.const_data_ptr<int64_t>(),
         p.chunk_begin.const_data_ptr<int64_t>(), p.chunk_end.const_data_ptr<int64_t>(),
         partial.mutable_data_ptr<float>(), p.chunks, C});
  }
  launcher.template launch<RunSums<scalar_t, VEC>>(
      backward_launch<VEC>(p.runs, C),
      {grad.const_data_ptr<scalar_t>(), p.sorted.const_data_ptr<int64_t>(),
       p.order.const_data_ptr<int64_t>(), p.run_begin.const_data_ptr<int64_t>(),
       p.run_end.const_data_ptr<int64_t>(), p.run_chunks.const_data_ptr<int64_t>(),
       p.chunks > 0 ? partial.const_data_ptr<float>() : nullptr,
       grad_weight.mutable_data_ptr<scalar_t>(), p.runs, C, padding_idx});
}

template <typename scalar_t, class Launcher>
void backward_dispatch_width(const Launcher& launcher, const at::Tensor& grad,
                             const at::Tensor& idx, const RunPlan* plan, at::Tensor& grad_weight,
                             int64_t padding_idx) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool aligned = grad.size(-1) % kVec == 0 &&
                       reinterpret_cast<uintptr_t>(grad.const_data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(grad_weight.const_data_ptr()) % 16 == 0;
  if (aligned)
    launch_backward<scalar_t, kVec>(launcher, grad, idx, plan, grad_weight, padding_idx);
  else
    launch_backward<scalar_t, 1>(launcher, grad, idx, plan, grad_weight, padding_idx);
}

template <class Launcher>
at::Tensor embedding_backward(const at::Tensor& grad_out_, const at::Tensor& indices_,
                              c10::SymInt num_weights_, int64_t padding_idx, bool deterministic) {
  const int64_t V = num_weights_.guard_int(__FILE__, __LINE__);
  check_backward_inputs(grad_out_, indices_, V, padding_idx);
  const Launcher launcher(grad_out_.device());
  const int64_t C = grad_out_.size(-1);
  const at::Tensor grad = grad_out_.contiguous();
  const at::Tensor idx = indices_.reshape({-1}).to(at::kLong);
  // fp32 grads are accumulated straight into the result; the atomic path for fp16/bf16 needs
  // an fp32 buffer that is rounded at the end
  const bool buffer = !deterministic && grad.scalar_type() != at::kFloat;
  at::Tensor grad_weight =
      at::zeros({V, C}, grad.options().dtype(buffer ? at::kFloat : grad.scalar_type()));
  const auto result = [&] { return buffer ? grad_weight.to(grad.scalar_type()) : grad_weight; };
  if (idx.numel() == 0) return result();
  // the deterministic plan brings the smallest and largest index back with its own counts:
  // one sync per call on either path
  std::optional<RunPlan> plan;
  int64_t extreme;
  if (deterministic) {
    plan = plan_runs(idx, kChunk);
    extreme = extreme_of(plan->min_index, plan->max_index);
  } else {
    extreme = extreme_index(idx);
  }
#define OP_NAME "fastgpt::embedding_backward"
  CHECK_INDEX_VALUE(extreme, V);
#undef OP_NAME
  if (C == 0) return result();
  const RunPlan* p = plan ? &*plan : nullptr;
  switch (grad.scalar_type()) {
    case at::kFloat:
      backward_dispatch_width<float>(launcher, grad, idx, p, grad_weight, padding_idx);
      break;
    case at::kHalf:
      backward_dispatch_width<at::Half>(launcher, grad, idx, p, grad_weight, padding_idx);
      break;
    default:  // kBFloat16
      backward_dispatch_width<at::BFloat16>(launcher, grad, idx, p, grad_weight, padding_idx);
  }
  return result();
}

}  // namespace embedding_gpu
}  // namespace fastgpt

// CUDA kernels of fastgpt::embedding_forward / embedding_backward.
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
//   indices' min and max back before launching (extreme_index) and raise the same IndexError
//   as the CPU, at one device-to-host sync per call: the price of a clear error instead of a
//   device-side assert that poisons the context.
// Precision: forward copies bits; backward accumulates in fp32, one rounding to the grad dtype.
// Streams: everything runs on the current stream of the inputs' device.
//
// Headers: c10/cuda only (not ATen/cuda/CUDAContext.h, which pulls cuBLAS/cuSPARSE headers the
// toolkit used to build this may lack).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "checks.h"
#include "embedding_run_plan.h"

namespace fastgpt {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond this
constexpr int64_t kChunk = 32;           // deterministic backward: positions per partial sum

// The index a bounds check of [0, num_weights) must look at: the smallest if it is negative,
// else the largest. Reading them back is one small device-to-host copy (it waits for the
// stream): the price of the same IndexError as on the CPU, raised before any kernel indexes
// with them, instead of a device-side assert that poisons the context.
int64_t extreme_index(const at::Tensor& idx) {
  const auto [lo, hi] = at::aminmax(idx);
  const at::Tensor range = at::stack({lo, hi}).to(at::kCPU, at::kLong);
  const int64_t l = range.const_data_ptr<int64_t>()[0], h = range.const_data_ptr<int64_t>()[1];
  return l < 0 ? l : h;
}

int lanes_for(int64_t units) {  // threads per row: a power of two, at most a warp
  int lanes = 1;
  while (lanes < 32 && lanes < units) lanes *= 2;
  return lanes;
}

// ---------------------------------------------------------------------------------- forward

template <typename vec_t, typename index_t>
__global__ void forward_kernel(const vec_t* __restrict__ weight, const index_t* __restrict__ idx,
                               vec_t* __restrict__ out, int64_t n, int64_t num_weights,
                               int64_t row_vecs) {
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < n;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t k = static_cast<int64_t>(idx[row]);
    // the host checked every index; this only guards memory should that ever change
    if (k < 0 || k >= num_weights) continue;
    vec_t* dst = out + row * row_vecs;
    const vec_t* src = weight + k * row_vecs;
    for (int64_t c = threadIdx.x; c < row_vecs; c += blockDim.x) dst[c] = src[c];
  }
}

template <typename vec_t, typename index_t>
void launch_forward(const at::Tensor& weight, const at::Tensor& indices, at::Tensor& out,
                    cudaStream_t stream) {
  const int64_t n = indices.numel();
  const int64_t row_vecs = weight.size(1) * weight.element_size() / static_cast<int64_t>(sizeof(vec_t));
  const int lanes = lanes_for(row_vecs);
  const dim3 block(lanes, kThreads / lanes);
  const int64_t blocks = std::min<int64_t>((n + block.y - 1) / block.y, kMaxBlocks);
  forward_kernel<vec_t, index_t><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
      static_cast<const vec_t*>(weight.const_data_ptr()), indices.const_data_ptr<index_t>(),
      static_cast<vec_t*>(out.mutable_data_ptr()), n, weight.size(0), row_vecs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename index_t>
void forward_dispatch_width(const at::Tensor& weight, const at::Tensor& indices, at::Tensor& out,
                            cudaStream_t stream) {
  const int64_t row_bytes = weight.size(1) * weight.element_size();
  const auto aligned = [&](int64_t w) {
    return row_bytes % w == 0 && reinterpret_cast<uintptr_t>(weight.const_data_ptr()) % w == 0 &&
           reinterpret_cast<uintptr_t>(out.const_data_ptr()) % w == 0;
  };
  if (aligned(16)) launch_forward<uint4, index_t>(weight, indices, out, stream);
  else if (aligned(8)) launch_forward<uint2, index_t>(weight, indices, out, stream);
  else if (aligned(4)) launch_forward<uint32_t, index_t>(weight, indices, out, stream);
  else launch_forward<uint16_t, index_t>(weight, indices, out, stream);
}

at::Tensor embedding_forward_cuda(const at::Tensor& weight_, const at::Tensor& indices_,
                                  int64_t padding_idx) {
  check_forward_inputs(weight_, indices_, padding_idx);
  const c10::cuda::CUDAGuard guard(weight_.device());
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

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (indices.scalar_type() == at::kLong)
    forward_dispatch_width<int64_t>(weight, indices, out, stream);
  else
    forward_dispatch_width<int32_t>(weight, indices, out, stream);
  return out;
}

// --------------------------------------------------------------------------------- backward

// VEC consecutive elements of a row, loaded and stored as one aligned access
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// Deterministic backward, phase 1: the runs longer than kChunk positions are cut into chunks of
// kChunk consecutive sorted positions; thread group (y) = one chunk sums its gradient rows into
// its fp32 row of `partial`. blockIdx.y picks a slice of blockDim.x * VEC columns.
template <typename scalar_t, int VEC>
__global__ void chunk_sums_kernel(const scalar_t* __restrict__ grad,
                                  const int64_t* __restrict__ order,
                                  const int64_t* __restrict__ chunk_begin,
                                  const int64_t* __restrict__ chunk_end,
                                  float* __restrict__ partial, int64_t chunks, int64_t C) {
  using P = Pack<scalar_t, VEC>;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (c >= C) return;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; q < chunks;
       q += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
    for (int64_t j = chunk_begin[q]; j < chunk_end[q]; ++j) {
      const P p = *reinterpret_cast<const P*>(grad + order[j] * C + c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += static_cast<float>(p.v[e]);
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) partial[q * C + c + e] = acc[e];
  }
}

// Phase 2: thread group (y) = one run of equal sorted indices (one weight row). A run of at most
// kChunk positions sums its gradient rows; a longer one sums its chunks' partial rows, in order.
// Either way the order is fixed by the data alone: bitwise reproducible, no float atomics.
template <typename scalar_t, int VEC>
__global__ void run_sums_kernel(const scalar_t* __restrict__ grad,
                                const int64_t* __restrict__ sorted,
                                const int64_t* __restrict__ order,
                                const int64_t* __restrict__ run_begin,
                                const int64_t* __restrict__ run_end,
                                const int64_t* __restrict__ run_chunks,
                                const float* __restrict__ partial,
                                scalar_t* __restrict__ grad_weight, int64_t runs, int64_t C,
                                int64_t padding_idx) {
  using P = Pack<scalar_t, VEC>;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (c >= C) return;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; r < runs;
       r += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t k = sorted[run_begin[r]];
    if (k == padding_idx) continue;  // the padding row stays zero
    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
    if (run_chunks[r] == run_chunks[r + 1]) {  // short run: no chunks
      for (int64_t j = run_begin[r]; j < run_end[r]; ++j) {
        const P p = *reinterpret_cast<const P*>(grad + order[j] * C + c);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += static_cast<float>(p.v[e]);
      }
    } else {
      for (int64_t q = run_chunks[r]; q < run_chunks[r + 1]; ++q)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += partial[q * C + c + e];
    }
    P o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.v[e] = static_cast<scalar_t>(acc[e]);
    *reinterpret_cast<P*>(grad_weight + k * C + c) = o;
  }
}

// Non-deterministic: thread group (y) = one token, atomically added into an fp32 buffer.
template <typename scalar_t, int VEC>
__global__ void backward_atomic_kernel(const scalar_t* __restrict__ grad,
                                       const int64_t* __restrict__ idx,
                                       float* __restrict__ grad_weight, int64_t n,
                                       int64_t num_weights, int64_t C, int64_t padding_idx) {
  using P = Pack<scalar_t, VEC>;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (c >= C) return;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t k = idx[i];
    // the host checked every index; this only guards memory should that ever change
    if (k < 0 || k >= num_weights || k == padding_idx) continue;
    const P p = *reinterpret_cast<const P*>(grad + i * C + c);
#pragma unroll
    for (int e = 0; e < VEC; ++e) atomicAdd(grad_weight + k * C + c + e, static_cast<float>(p.v[e]));
  }
}

// Launch shape shared by the backward kernels: thread groups of `lanes` threads (y) over
// `items` (tokens, chunks or runs), blockIdx.y over column slices of lanes * VEC elements.
struct Launch {
  dim3 grid, block;
};

template <int VEC>
Launch backward_launch(int64_t items, int64_t C) {
  const int lanes = lanes_for((C + VEC - 1) / VEC);
  const dim3 block(lanes, kThreads / lanes);
  const int64_t slices = (C + static_cast<int64_t>(lanes) * VEC - 1) / (static_cast<int64_t>(lanes) * VEC);
  TORCH_CHECK(slices <= 65535, "fastgpt::embedding_backward: rows of ", C, " elements are too wide");
  const int64_t groups = std::max<int64_t>(1, std::min<int64_t>((items + block.y - 1) / block.y, kMaxBlocks));
  return {dim3(static_cast<unsigned>(groups), static_cast<unsigned>(slices)), block};
}

template <typename scalar_t, int VEC>
void launch_backward(const at::Tensor& grad, const at::Tensor& idx, at::Tensor& grad_weight,
                     int64_t padding_idx, bool deterministic, cudaStream_t stream) {
  const int64_t n = idx.numel(), C = grad.size(-1), V = grad_weight.size(0);
  if (!deterministic) {
    const Launch l = backward_launch<VEC>(n, C);
    backward_atomic_kernel<scalar_t, VEC><<<l.grid, l.block, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
        grad_weight.mutable_data_ptr<float>(), n, V, C, padding_idx);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const RunPlan p = plan_runs(idx, kChunk);
  at::Tensor partial;
  if (p.chunks > 0) {
    partial = at::empty({p.chunks, C}, grad.options().dtype(at::kFloat));
    const Launch l = backward_launch<VEC>(p.chunks, C);
    chunk_sums_kernel<scalar_t, VEC><<<l.grid, l.block, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), p.order.const_data_ptr<int64_t>(),
        p.chunk_begin.const_data_ptr<int64_t>(), p.chunk_end.const_data_ptr<int64_t>(),
        partial.mutable_data_ptr<float>(), p.chunks, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t runs = p.run_begin.numel();
  const Launch l = backward_launch<VEC>(runs, C);
  run_sums_kernel<scalar_t, VEC><<<l.grid, l.block, 0, stream>>>(
      grad.const_data_ptr<scalar_t>(), p.sorted.const_data_ptr<int64_t>(),
      p.order.const_data_ptr<int64_t>(), p.run_begin.const_data_ptr<int64_t>(),
      p.run_end.const_data_ptr<int64_t>(), p.run_chunks.const_data_ptr<int64_t>(),
      p.chunks > 0 ? partial.const_data_ptr<float>() : nullptr,
      grad_weight.mutable_data_ptr<scalar_t>(), runs, C, padding_idx);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void backward_dispatch_width(const at::Tensor& grad, const at::Tensor& idx, at::Tensor& grad_weight,
                             int64_t padding_idx, bool deterministic, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t C = grad.size(-1);
  const bool aligned = C % kVec == 0 &&
                       reinterpret_cast<uintptr_t>(grad.const_data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(grad_weight.const_data_ptr()) % 16 == 0;
  if (aligned)
    launch_backward<scalar_t, kVec>(grad, idx, grad_weight, padding_idx, deterministic, stream);
  else
    launch_backward<scalar_t, 1>(grad, idx, grad_weight, padding_idx, deterministic, stream);
}

at::Tensor embedding_backward_cuda(const at::Tensor& grad_out_, const at::Tensor& indices_,
                                   c10::SymInt num_weights_, int64_t padding_idx,
                                   bool deterministic) {
  const int64_t V = num_weights_.guard_int(__FILE__, __LINE__);
  check_backward_inputs(grad_out_, indices_, V, padding_idx);
  const c10::cuda::CUDAGuard guard(grad_out_.device());
  const int64_t C = grad_out_.size(-1);
  const at::Tensor grad = grad_out_.contiguous();
  const at::Tensor idx = indices_.reshape({-1}).to(at::kLong);
  const int64_t n = idx.numel();
  // fp32 grads are accumulated straight into the result; the atomic path for fp16/bf16 needs
  // an fp32 buffer that is rounded at the end
  const bool buffer = !deterministic && grad.scalar_type() != at::kFloat;
  at::Tensor grad_weight =
      at::zeros({V, C}, grad.options().dtype(buffer ? at::kFloat : grad.scalar_type()));
  if (n == 0) return buffer ? grad_weight.to(grad.scalar_type()) : grad_weight;

#define OP_NAME "fastgpt::embedding_backward"
  CHECK_INDEX_VALUE(extreme_index(idx), V);
#undef OP_NAME
  if (C == 0) return buffer ? grad_weight.to(grad.scalar_type()) : grad_weight;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (grad.scalar_type()) {
    case at::kFloat:
      backward_dispatch_width<float>(grad, idx, grad_weight, padding_idx, deterministic, stream);
      break;
    case at::kHalf:
      backward_dispatch_width<at::Half>(grad, idx, grad_weight, padding_idx, deterministic, stream);
      break;
    default:  // kBFloat16
      backward_dispatch_width<at::BFloat16>(grad, idx, grad_weight, padding_idx, deterministic, stream);
  }
  return buffer ? grad_weight.to(grad.scalar_type()) : grad_weight;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("embedding_forward", &embedding_forward_cuda);
  m.impl("embedding_backward", &embedding_backward_cuda);
}

}  // namespace fastgpt

// CUDA kernels of fastgpt::embedding_forward / embedding_backward.
//
// Forward: a block of 256 threads is a (rows, lanes) grid: each row of `lanes` threads (a warp
//   or less) copies one output row, lane by lane, in the widest load the row's byte length and
//   alignment allow (16 bytes when C * sizeof(T) % 16 == 0, then 8, 4, 2).
// Backward, deterministic (default): sort the flattened indices (stable, so equal indices keep
//   token order), then the first position of each run of equal indices sums that run's
//   gradient rows, in order, in fp32 registers, and writes its weight row once. No float
//   atomics: bitwise reproducible. Column slices of a row go to separate thread groups
//   (blockIdx.y), so wide rows use many warps; one very frequent index is summed serially.
// Backward, deterministic=False: one thread group per token adds its row into an fp32 buffer
//   with atomicAdd; fp16/bf16 gradients are rounded from that buffer at the end.
// Bounds: an out-of-range index never reads or writes outside a tensor; the kernel records it
//   in a small device buffer (count, one offending value) that the host reads after the launch
//   and turns into the same IndexError as the CPU. That read is one device-to-host sync per
//   call: the price of a clear error instead of a device-side assert that poisons the context.
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

namespace fastgpt {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond this

// err[0]: how many indices were out of range; err[1]: one of them
__device__ __forceinline__ void record_bad_index(unsigned long long* err, int64_t k) {
  atomicAdd(err, 1ULL);
  err[1] = static_cast<unsigned long long>(k);
}

void raise_if_bad(const at::Tensor& err, int64_t num_weights, const char* op) {
  const at::Tensor host = err.to(at::kCPU);  // waits for the kernels on this stream
  const int64_t* e = host.const_data_ptr<int64_t>();
  TORCH_CHECK_INDEX(e[0] == 0, op, ": index ", e[1], " is out of range for an embedding table of ",
                    num_weights, " rows (allowed: 0 <= index < ", num_weights, "; ", e[0],
                    " indices were out of range)");
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
                               int64_t row_vecs, unsigned long long* __restrict__ err) {
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < n;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t k = static_cast<int64_t>(idx[row]);
    vec_t* dst = out + row * row_vecs;
    if (k < 0 || k >= num_weights) {
      if (threadIdx.x == 0) record_bad_index(err, k);
      for (int64_t c = threadIdx.x; c < row_vecs; c += blockDim.x) dst[c] = vec_t{};
      continue;
    }
    const vec_t* src = weight + k * row_vecs;
    for (int64_t c = threadIdx.x; c < row_vecs; c += blockDim.x) dst[c] = src[c];
  }
}

template <typename vec_t, typename index_t>
void launch_forward(const at::Tensor& weight, const at::Tensor& indices, at::Tensor& out,
                    const at::Tensor& err, cudaStream_t stream) {
  const int64_t n = indices.numel();
  const int64_t row_vecs = weight.size(1) * weight.element_size() / static_cast<int64_t>(sizeof(vec_t));
  const int lanes = lanes_for(row_vecs);
  const dim3 block(lanes, kThreads / lanes);
  const int64_t blocks = std::min<int64_t>((n + block.y - 1) / block.y, kMaxBlocks);
  forward_kernel<vec_t, index_t><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
      static_cast<const vec_t*>(weight.const_data_ptr()), indices.const_data_ptr<index_t>(),
      static_cast<vec_t*>(out.mutable_data_ptr()), n, weight.size(0), row_vecs,
      reinterpret_cast<unsigned long long*>(err.mutable_data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename index_t>
void forward_dispatch_width(const at::Tensor& weight, const at::Tensor& indices, at::Tensor& out,
                            const at::Tensor& err, cudaStream_t stream) {
  const int64_t row_bytes = weight.size(1) * weight.element_size();
  const auto aligned = [&](int64_t w) {
    return row_bytes % w == 0 && reinterpret_cast<uintptr_t>(weight.const_data_ptr()) % w == 0 &&
           reinterpret_cast<uintptr_t>(out.const_data_ptr()) % w == 0;
  };
  if (aligned(16)) launch_forward<uint4, index_t>(weight, indices, out, err, stream);
  else if (aligned(8)) launch_forward<uint2, index_t>(weight, indices, out, err, stream);
  else if (aligned(4)) launch_forward<uint32_t, index_t>(weight, indices, out, err, stream);
  else launch_forward<uint16_t, index_t>(weight, indices, out, err, stream);
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

  const at::Tensor err = at::zeros({2}, indices.options().dtype(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (weight.size(1) == 0) {
    // nothing to copy; still check the indices
    const auto [lo, hi] = at::aminmax(indices);
    const int64_t l = lo.item<int64_t>(), h = hi.item<int64_t>();
#define OP_NAME "fastgpt::embedding_forward"
    CHECK_INDEX_VALUE(l < 0 ? l : h, weight.size(0));
#undef OP_NAME
    return out;
  }
  if (indices.scalar_type() == at::kLong)
    forward_dispatch_width<int64_t>(weight, indices, out, err, stream);
  else
    forward_dispatch_width<int32_t>(weight, indices, out, err, stream);
  raise_if_bad(err, weight.size(0), "fastgpt::embedding_forward");
  return out;
}

// --------------------------------------------------------------------------------- backward

// VEC consecutive elements of a row, loaded and stored as one aligned access
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// Deterministic: thread group (y) = one sorted position; acts only at the start of a run of
// equal indices, summing the run in order. blockIdx.y picks a slice of blockDim.x * VEC columns.
template <typename scalar_t, int VEC>
__global__ void backward_sorted_kernel(const scalar_t* __restrict__ grad,
                                       const int64_t* __restrict__ sorted,
                                       const int64_t* __restrict__ order,
                                       scalar_t* __restrict__ grad_weight, int64_t n,
                                       int64_t num_weights, int64_t C, int64_t padding_idx,
                                       unsigned long long* __restrict__ err) {
  using P = Pack<scalar_t, VEC>;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t k = sorted[i];
    if (i > 0 && sorted[i - 1] == k) continue;  // not the start of a run
    if (k < 0 || k >= num_weights) {
      if (threadIdx.x == 0 && blockIdx.y == 0) record_bad_index(err, k);
      continue;
    }
    if (k == padding_idx || c >= C) continue;  // padding row stays zero
    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
    for (int64_t j = i; j < n && sorted[j] == k; ++j) {
      const P p = *reinterpret_cast<const P*>(grad + order[j] * C + c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += static_cast<float>(p.v[e]);
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
                                       int64_t num_weights, int64_t C, int64_t padding_idx,
                                       unsigned long long* __restrict__ err) {
  using P = Pack<scalar_t, VEC>;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t k = idx[i];
    if (k < 0 || k >= num_weights) {
      if (threadIdx.x == 0 && blockIdx.y == 0) record_bad_index(err, k);
      continue;
    }
    if (k == padding_idx || c >= C) continue;
    const P p = *reinterpret_cast<const P*>(grad + i * C + c);
#pragma unroll
    for (int e = 0; e < VEC; ++e) atomicAdd(grad_weight + k * C + c + e, static_cast<float>(p.v[e]));
  }
}

template <typename scalar_t, int VEC>
void launch_backward(const at::Tensor& grad, const at::Tensor& idx, const at::Tensor& order,
                     at::Tensor& grad_weight, int64_t padding_idx, bool deterministic,
                     const at::Tensor& err, cudaStream_t stream) {
  const int64_t n = idx.numel(), C = grad.size(-1);
  const int lanes = lanes_for((C + VEC - 1) / VEC);
  const dim3 block(lanes, kThreads / lanes);
  const int64_t slices = (C + static_cast<int64_t>(lanes) * VEC - 1) / (static_cast<int64_t>(lanes) * VEC);
  TORCH_CHECK(slices <= 65535, "fastgpt::embedding_backward: rows of ", C, " elements are too wide");
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((n + block.y - 1) / block.y, kMaxBlocks)),
                  static_cast<unsigned>(slices));
  auto* e = reinterpret_cast<unsigned long long*>(err.mutable_data_ptr<int64_t>());
  if (deterministic) {
    backward_sorted_kernel<scalar_t, VEC><<<grid, block, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
        order.const_data_ptr<int64_t>(), grad_weight.mutable_data_ptr<scalar_t>(), n,
        grad_weight.size(0), C, padding_idx, e);
  } else {
    backward_atomic_kernel<scalar_t, VEC><<<grid, block, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
        grad_weight.mutable_data_ptr<float>(), n, grad_weight.size(0), C, padding_idx, e);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void backward_dispatch_width(const at::Tensor& grad, const at::Tensor& idx, const at::Tensor& order,
                             at::Tensor& grad_weight, int64_t padding_idx, bool deterministic,
                             const at::Tensor& err, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t C = grad.size(-1);
  const bool aligned = C % kVec == 0 &&
                       reinterpret_cast<uintptr_t>(grad.const_data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(grad_weight.const_data_ptr()) % 16 == 0;
  if (aligned)
    launch_backward<scalar_t, kVec>(grad, idx, order, grad_weight, padding_idx, deterministic, err, stream);
  else
    launch_backward<scalar_t, 1>(grad, idx, order, grad_weight, padding_idx, deterministic, err, stream);
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
  if (n == 0 || C == 0) return buffer ? grad_weight.to(grad.scalar_type()) : grad_weight;

  const at::Tensor err = at::zeros({2}, idx.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor sorted = idx, order = idx;
  if (deterministic) std::tie(sorted, order) = at::sort(idx, /*stable=*/true, 0, false);

  switch (grad.scalar_type()) {
    case at::kFloat:
      backward_dispatch_width<float>(grad, sorted, order, grad_weight, padding_idx, deterministic, err, stream);
      break;
    case at::kHalf:
      backward_dispatch_width<at::Half>(grad, sorted, order, grad_weight, padding_idx, deterministic, err, stream);
      break;
    default:  // kBFloat16
      backward_dispatch_width<at::BFloat16>(grad, sorted, order, grad_weight, padding_idx, deterministic, err, stream);
  }
  raise_if_bad(err, V, "fastgpt::embedding_backward");
  return buffer ? grad_weight.to(grad.scalar_type()) : grad_weight;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("embedding_forward", &embedding_forward_cuda);
  m.impl("embedding_backward", &embedding_backward_cuda);
}

}  // namespace fastgpt

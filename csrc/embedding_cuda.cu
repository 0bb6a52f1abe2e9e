// fastgpt::embedding_forward / embedding_backward on CUDA: the kernels and host code of
// embedding_gpu.h, launched as CUDA grids on the current stream of the inputs' device.
//
// Headers: c10/cuda only (not ATen/cuda/CUDAContext.h, which pulls cuBLAS/cuSPARSE headers the
// toolkit used to build this may lack).

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "embedding_gpu.h"

namespace fastgpt {
namespace embedding_gpu {
namespace {

template <class Kernel>
__global__ void kernel(const typename Kernel::Params params) {
  const Thread t{{blockIdx.x, blockIdx.y}, {threadIdx.x, threadIdx.y}, {blockDim.x, blockDim.y},
                 {gridDim.x, gridDim.y}};
  Kernel::run(t, params);
}

class CudaLauncher {
 public:
  explicit CudaLauncher(const at::Device& device)
      : guard_(device), stream_(c10::cuda::getCurrentCUDAStream()) {}

  template <class Kernel>
  void launch(const Launch& l, const typename Kernel::Params& params) const {
    kernel<Kernel><<<dim3(l.grid.x, l.grid.y), dim3(l.block.x, l.block.y), 0, stream_>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  c10::cuda::CUDAGuard guard_;
  cudaStream_t stream_;
};

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("embedding_forward", &embedding_forward<CudaLauncher>);
  m.impl("embedding_backward", &embedding_backward<CudaLauncher>);
}

}  // namespace embedding_gpu
}  // namespace fastgpt

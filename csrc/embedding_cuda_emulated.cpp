// fastgpt::_embedding_forward_emulated / _embedding_backward_emulated: the CUDA embedding ops
// (embedding_gpu.h) on CPU tensors, every thread of every grid run one after another, so that
// tests exercise the CUDA code's indexing, launch shapes and plan on a machine without a GPU.
// Slow by design (one simulated thread at a time); for tests only.

#include <torch/library.h>

#include "embedding_gpu.h"

namespace fastgpt {
namespace embedding_gpu {
namespace {

struct SerialLauncher {
  explicit SerialLauncher(const at::Device&) {}

  template <class Kernel>
  void launch(const Launch& l, const typename Kernel::Params& params) const {
    Thread t;
    t.grid_dim = l.grid;
    t.block_dim = l.block;
    for (t.block_idx.y = 0; t.block_idx.y < l.grid.y; ++t.block_idx.y)
      for (t.block_idx.x = 0; t.block_idx.x < l.grid.x; ++t.block_idx.x)
        for (t.thread_idx.y = 0; t.thread_idx.y < l.block.y; ++t.thread_idx.y)
          for (t.thread_idx.x = 0; t.thread_idx.x < l.block.x; ++t.thread_idx.x)
            Kernel::run(t, params);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("_embedding_forward_emulated", &embedding_forward<SerialLauncher>);
  m.impl("_embedding_backward_emulated", &embedding_backward<SerialLauncher>);
}

}  // namespace embedding_gpu
}  // namespace fastgpt

// The CPU block's residual dropouts and the keep masks; see dropout_cpu.h.

#include "dropout_cpu.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <mutex>

#include "cpu_isa.h"
#include "vec_cpu.h"

namespace fastgpt {
namespace dropout {
namespace {
using namespace vec;

// rows per parallel task: about 32K elements
int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(cols, 1));
}

// out[c] = (residual ? residual[c] : 0) + (kept ? y[c] * scale : 0) for one row of C columns
template <class V, typename raw_t>
__attribute__((always_inline)) inline void dropped_row(const raw_t* y, const raw_t* residual,
                                                       raw_t* out, int64_t C, uint32_t key,
                                                       const Params& d) {
  int64_t c = 0;
  if (d.threshold == 0) {   // every lane kept (p = 0 or below 2^-25): no hashing
    for (; c + V::lanes <= C; c += V::lanes) {
      typename V::f v = loadv<V>(y + c) * d.scale;
      if (residual != nullptr) v += loadv<V>(residual + c);
      storev<V>(out + c, v);
    }
  }
  for (; c + V::lanes <= C; c += V::lanes) {
    typename V::f v = kept_lanes<V>(key, uint32_t(c), d) ? loadv<V>(y + c) * d.scale
                                                          : typename V::f{};
    if (residual != nullptr) v += loadv<V>(residual + c);
    storev<V>(out + c, v);
  }
  for (; c < C; ++c) {
    float v = keeps(d, key, uint32_t(c)) ? load(y, c) * d.scale : 0.0f;
    if (residual != nullptr) v += load(residual, c);
    store(out, c, v);
  }
}

// out = residual + dropout(y) (no residual: dropout(y)) over (N, C) rows, raw_t the dtype's bits
template <typename raw_t>
void dropped_rows(const at::Tensor& y, const at::Tensor* residual, const at::Tensor& out,
                  const Params& d) {
  const int64_t N = y.size(0), C = y.size(1);
  const raw_t* yp = static_cast<const raw_t*>(y.const_data_ptr());
  const raw_t* rp = residual ? static_cast<const raw_t*>(residual->const_data_ptr()) : nullptr;
  raw_t* op = static_cast<raw_t*>(out.data_ptr());
  at::parallel_for(0, N, row_grain(C), [&](int64_t begin, int64_t end) {
    dispatch([&]<Isa I>() __attribute__((always_inline)) {
      for (int64_t n = begin; n < end; ++n) {
        dropped_row<NativeVec<I>>(yp + n * C, rp ? rp + n * C : nullptr, op + n * C, C,
                                  row_key(d.seed, uint64_t(n)), d);
      }
    });
  });
}

// the vectorised kernel for float32 / bfloat16, the mask as a tensor for other dtypes
void apply(const at::Tensor& y, const at::Tensor* residual, const at::Tensor& out,
           const Params& d) {
  TORCH_INTERNAL_ASSERT(y.dim() == 2 && y.is_contiguous() && out.is_contiguous());
  if (y.scalar_type() == at::kFloat) {
    dropped_rows<float>(y, residual, out, d);
  } else if (y.scalar_type() == at::kBFloat16) {
    dropped_rows<uint16_t>(y, residual, out, d);
  } else if (d.p == 0.0) {
    at::Tensor o = out;   // a handle to the same storage (add_out takes a non-const one)
    if (residual != nullptr) {
      at::add_out(o, y, *residual);
    } else {
      o.copy_(y);
    }
  } else {
    // 1 / (1 - p) in double: d.scale is its float32 rounding
    at::Tensor v = y * keep_mask(d.seed, y.size(0), y.size(1), d.p).to(y.scalar_type()) *
                   (1.0 / (1.0 - d.p));
    if (residual != nullptr) v.add_(*residual);
    out.copy_(v);
  }
}

}  // namespace

uint64_t draw_seed() {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return at::check_generator<at::CPUGeneratorImpl>(gen)->random64();
}

at::Tensor keep_mask(uint64_t seed, int64_t rows, int64_t cols, double p) {
  const Params d = Params::make(seed, p);
  at::Tensor keep = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  bool* k = keep.mutable_data_ptr<bool>();
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint32_t key = row_key(seed, uint64_t(r));
      for (int64_t c = 0; c < cols; ++c) k[r * cols + c] = keeps(d, key, uint32_t(c));
    }
  });
  return keep;
}

void add_dropped_(at::Tensor& y, const at::Tensor& residual, const Params& d) {
  TORCH_INTERNAL_ASSERT(residual.is_contiguous() && residual.sizes() == y.sizes() &&
                        residual.scalar_type() == y.scalar_type());
  apply(y, &residual, y, d);
}

at::Tensor scale_kept(const at::Tensor& grad, const Params& d) {
  at::Tensor out = at::empty_like(grad, at::MemoryFormat::Contiguous);
  apply(grad.contiguous(), nullptr, out, d);
  return out;
}

}  // namespace dropout
}  // namespace fastgpt

// LayerNorm forward and backward over rows of C; see layer_norm_cpu.h.
//
// Algorithm: forward, per row in one task: mean, then the variance about it (two passes over
// the row, which is in L1), y = (x - mean) * rstd * w + b. Backward, per block of 64 rows:
// xhat = (x - mean) * rstd, g = dy * w, dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), and
// the block's partial column sums of dy * xhat (dweight) and dy (dbias); the partials are then
// added in block order, so the result does not depend on the thread count.
// Precision: all in fp32 (bf16 is widened exactly); mean/rstd are kept in fp32; outputs round
// once. Limits: float32 and bfloat16 here; other dtypes call aten's kernels.

#include "layer_norm_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "vec_cpu.h"

namespace fastgpt {
namespace layer_norm_detail {
using namespace vec;

constexpr int64_t kRowBlock = 64;   // rows per backward task and per partial column sum

__attribute__((always_inline)) inline float hsum(vfloat v) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

template <typename raw_t>
__attribute__((always_inline)) inline void forward_rows(const raw_t* x, const float* w,
                                                        const float* b, raw_t* y, float* mean,
                                                        float* rstd, int64_t C, float eps,
                                                        int64_t begin, int64_t end) {
  const int64_t Cv = C / kLanes * kLanes;
  for (int64_t r = begin; r < end; ++r) {
    const raw_t* xr = x + r * C;
    raw_t* yr = y + r * C;
    vfloat vs = {};
    for (int64_t c = 0; c < Cv; c += kLanes) vs += load16(xr + c);
    float s = hsum(vs);
    for (int64_t c = Cv; c < C; ++c) s += load(xr, c);
    const float mu = s / C;
    vfloat vq = {};
    for (int64_t c = 0; c < Cv; c += kLanes) {
      const vfloat d = load16(xr + c) - mu;
      vq += d * d;
    }
    float q = hsum(vq);
    for (int64_t c = Cv; c < C; ++c) q += (load(xr, c) - mu) * (load(xr, c) - mu);
    const float rs = 1.0f / std::sqrt(q / C + eps);
    for (int64_t c = 0; c < Cv; c += kLanes)
      store16(yr + c, (load16(xr + c) - mu) * rs * load16(w + c) + load16(b + c));
    for (int64_t c = Cv; c < C; ++c) store(yr, c, (load(xr, c) - mu) * rs * w[c] + b[c]);
    mean[r] = mu;
    rstd[r] = rs;
  }
}

// rows [begin, end): dx, and the column sums of dy * xhat and dy into dw_part and db_part
template <typename raw_t>
__attribute__((always_inline)) inline void backward_rows(const raw_t* dy, const raw_t* x,
                                                         const float* mean, const float* rstd,
                                                         const float* w, raw_t* dx,
                                                         float* dw_part, float* db_part,
                                                         int64_t C, int64_t begin, int64_t end) {
  const int64_t Cv = C / kLanes * kLanes;
  for (int64_t c = 0; c < C; ++c) dw_part[c] = db_part[c] = 0.0f;
  for (int64_t r = begin; r < end; ++r) {
    const raw_t *dyr = dy + r * C, *xr = x + r * C;
    const float mu = mean[r], rs = rstd[r];
    vfloat vg = {}, vgx = {};
    for (int64_t c = 0; c < Cv; c += kLanes) {
      const vfloat d = load16(dyr + c), xh = (load16(xr + c) - mu) * rs, g = d * load16(w + c);
      vg += g;
      vgx += g * xh;
      store16(dw_part + c, load16(dw_part + c) + d * xh);
      store16(db_part + c, load16(db_part + c) + d);
    }
    float sg = hsum(vg), sgx = hsum(vgx);
    for (int64_t c = Cv; c < C; ++c) {
      const float d = load(dyr, c), xh = (load(xr, c) - mu) * rs, g = d * w[c];
      sg += g;
      sgx += g * xh;
      dw_part[c] += d * xh;
      db_part[c] += d;
    }
    const float a = sg / C, bb = sgx / C;
    for (int64_t c = 0; c < Cv; c += kLanes) {
      const vfloat xh = (load16(xr + c) - mu) * rs;
      store16(dx + r * C + c, (load16(dyr + c) * load16(w + c) - a - xh * bb) * rs);
    }
    for (int64_t c = Cv; c < C; ++c) {
      const float xh = (load(xr, c) - mu) * rs;
      store(dx + r * C, c, (load(dyr, c) * w[c] - a - xh * bb) * rs);
    }
  }
}

FASTGPT_CLONES void forward_range(const float* x, const float* w, const float* b, float* y,
                                  float* mean, float* rstd, int64_t C, float eps, int64_t begin,
                                  int64_t end) {
  forward_rows(x, w, b, y, mean, rstd, C, eps, begin, end);
}
FASTGPT_CLONES void forward_range(const uint16_t* x, const float* w, const float* b, uint16_t* y,
                                  float* mean, float* rstd, int64_t C, float eps, int64_t begin,
                                  int64_t end) {
  forward_rows(x, w, b, y, mean, rstd, C, eps, begin, end);
}
FASTGPT_CLONES void backward_range(const float* dy, const float* x, const float* mean,
                                   const float* rstd, const float* w, float* dx, float* dw_part,
                                   float* db_part, int64_t C, int64_t begin, int64_t end) {
  backward_rows(dy, x, mean, rstd, w, dx, dw_part, db_part, C, begin, end);
}
FASTGPT_CLONES void backward_range(const uint16_t* dy, const uint16_t* x, const float* mean,
                                   const float* rstd, const float* w, uint16_t* dx,
                                   float* dw_part, float* db_part, int64_t C, int64_t begin,
                                   int64_t end) {
  backward_rows(dy, x, mean, rstd, w, dx, dw_part, db_part, C, begin, end);
}

bool fused_path(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
}

template <typename raw_t>
raw_t* raw(const at::Tensor& t) {
  return static_cast<raw_t*>(t.data_ptr());
}

// weight or bias widened to fp32 (zeros for a missing bias)
at::Tensor widened(const std::optional<at::Tensor>& t, int64_t C, const at::Tensor& like) {
  if (!t.has_value() || !t->defined()) return at::zeros({C}, like.options().dtype(at::kFloat));
  return t->to(at::kFloat).contiguous();
}

template <typename raw_t>
void forward_typed(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                   const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd,
                   double eps) {
  const int64_t N = x.size(0), C = x.size(1);
  at::parallel_for(0, N, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(C, 1)),
                   [&](int64_t begin, int64_t end) {
    forward_range(raw<const raw_t>(x), w.const_data_ptr<float>(), b.const_data_ptr<float>(),
                  raw<raw_t>(y), mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(),
                  C, float(eps), begin, end);
  });
}

template <typename raw_t>
void backward_typed(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                    const at::Tensor& rstd, const at::Tensor& w, const at::Tensor& dx,
                    const at::Tensor& dw_parts, const at::Tensor& db_parts) {
  const int64_t N = x.size(0), C = x.size(1), blocks = dw_parts.size(0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      backward_range(raw<const raw_t>(dy), raw<const raw_t>(x), mean.const_data_ptr<float>(),
                     rstd.const_data_ptr<float>(), w.const_data_ptr<float>(), raw<raw_t>(dx),
                     dw_parts.mutable_data_ptr<float>() + blk * C,
                     db_parts.mutable_data_ptr<float>() + blk * C, C, blk * kRowBlock,
                     std::min(N, (blk + 1) * kRowBlock));
    }
  });
}

}  // namespace layer_norm_detail

using layer_norm_detail::fused_path;

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    double eps) {
  if (!fused_path(x)) return at::native_layer_norm(x, {x.size(1)}, weight, bias, eps);
  TORCH_INTERNAL_ASSERT(x.dim() == 2 && x.is_contiguous());
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({N, 1}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({N, 1}, x.options().dtype(at::kFloat));
  const at::Tensor w = layer_norm_detail::widened(weight, C, x);
  const at::Tensor b = layer_norm_detail::widened(bias, C, x);
  if (x.scalar_type() == at::kFloat) {
    layer_norm_detail::forward_typed<float>(x, w, b, y, mean, rstd, eps);
  } else {
    layer_norm_detail::forward_typed<uint16_t>(x, w, b, y, mean, rstd, eps);
  }
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const bool with_bias = bias.has_value() && bias->defined();
  if (!fused_path(x)) {
    return at::native_layer_norm_backward(dy_in, x, {x.size(1)}, mean, rstd, weight, bias,
                                          {true, true, with_bias});
  }
  TORCH_INTERNAL_ASSERT(x.dim() == 2 && x.is_contiguous() && mean.scalar_type() == at::kFloat);
  const at::Tensor dy = dy_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t blocks = (N + layer_norm_detail::kRowBlock - 1) / layer_norm_detail::kRowBlock;
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw_parts = at::empty({blocks, C}, x.options().dtype(at::kFloat));
  at::Tensor db_parts = at::empty({blocks, C}, x.options().dtype(at::kFloat));
  const at::Tensor w = layer_norm_detail::widened(weight, C, x);
  if (x.scalar_type() == at::kFloat) {
    layer_norm_detail::backward_typed<float>(dy, x, mean, rstd, w, dx, dw_parts, db_parts);
  } else {
    layer_norm_detail::backward_typed<uint16_t>(dy, x, mean, rstd, w, dx, dw_parts, db_parts);
  }
  // the blocks' partial sums, added in block order (blocks x C values, in fp32)
  float *dw_sum = dw_parts.mutable_data_ptr<float>(), *db_sum = db_parts.mutable_data_ptr<float>();
  for (int64_t blk = 1; blk < blocks; ++blk) {
    for (int64_t c = 0; c < C; ++c) {
      dw_sum[c] += dw_sum[blk * C + c];
      db_sum[c] += db_sum[blk * C + c];
    }
  }
  at::Tensor dw = dw_parts[0].to(weight.scalar_type());
  at::Tensor db = with_bias ? db_parts[0].to(bias->scalar_type()) : at::Tensor();
  return {dx, dw, db};
}

}  // namespace fastgpt

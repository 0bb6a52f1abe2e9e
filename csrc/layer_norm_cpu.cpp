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

#include "column_sums_cpu.h"
#include "cpu_isa.h"
#include "vec_cpu.h"

namespace fastgpt {
namespace layer_norm_detail {
using namespace vec;

constexpr int64_t kRowBlock = 64;   // rows per backward task and per partial column sum

// w and b have x's dtype (the block's weights all do); b may be null (no bias)
template <class V, typename raw_t>
__attribute__((always_inline)) inline void forward_rows(const raw_t* x, const raw_t* w,
                                                        const raw_t* b, raw_t* y, float* mean,
                                                        float* rstd, int64_t C, float eps,
                                                        int64_t begin, int64_t end) {
  using F = typename V::f;
  constexpr int64_t L = V::lanes;
  const int64_t Cv = C / L * L;
  for (int64_t r = begin; r < end; ++r) {
    const raw_t* xr = x + r * C;
    raw_t* yr = y + r * C;
    F vs = {};
    for (int64_t c = 0; c < Cv; c += L) vs += loadv<V>(xr + c);
    float s = hsum<V>(vs);
    for (int64_t c = Cv; c < C; ++c) s += load(xr, c);
    const float mu = s / C;
    F vq = {};
    for (int64_t c = 0; c < Cv; c += L) {
      const F d = loadv<V>(xr + c) - mu;
      vq += d * d;
    }
    float q = hsum<V>(vq);
    for (int64_t c = Cv; c < C; ++c) q += (load(xr, c) - mu) * (load(xr, c) - mu);
    const float rs = 1.0f / std::sqrt(q / C + eps);
    for (int64_t c = 0; c < Cv; c += L) {
      const F v = (loadv<V>(xr + c) - mu) * rs * loadv<V>(w + c);
      storev<V>(yr + c, b != nullptr ? v + loadv<V>(b + c) : v);
    }
    for (int64_t c = Cv; c < C; ++c) {
      const float v = (load(xr, c) - mu) * rs * load(w, c);
      store(yr, c, b != nullptr ? v + load(b, c) : v);
    }
    mean[r] = mu;
    rstd[r] = rs;
  }
}

// rows [begin, end): dx, and the column sums of dy * xhat and dy into dw_part and db_part
template <class V, typename raw_t>
__attribute__((always_inline)) inline void backward_rows(const raw_t* dy, const raw_t* x,
                                                         const float* mean, const float* rstd,
                                                         const raw_t* w, raw_t* dx,
                                                         float* dw_part, float* db_part,
                                                         int64_t C, int64_t begin, int64_t end) {
  using F = typename V::f;
  constexpr int64_t L = V::lanes;
  const int64_t Cv = C / L * L;
  for (int64_t c = 0; c < C; ++c) dw_part[c] = db_part[c] = 0.0f;
  for (int64_t r = begin; r < end; ++r) {
    const raw_t *dyr = dy + r * C, *xr = x + r * C;
    const float mu = mean[r], rs = rstd[r];
    F vg = {}, vgx = {};
    for (int64_t c = 0; c < Cv; c += L) {
      const F d = loadv<V>(dyr + c), xh = (loadv<V>(xr + c) - mu) * rs, g = d * loadv<V>(w + c);
      vg += g;
      vgx += g * xh;
      storev<V>(dw_part + c, loadv<V>(dw_part + c) + d * xh);
      storev<V>(db_part + c, loadv<V>(db_part + c) + d);
    }
    float sg = hsum<V>(vg), sgx = hsum<V>(vgx);
    for (int64_t c = Cv; c < C; ++c) {
      const float d = load(dyr, c), xh = (load(xr, c) - mu) * rs, g = d * load(w, c);
      sg += g;
      sgx += g * xh;
      dw_part[c] += d * xh;
      db_part[c] += d;
    }
    const float a = sg / C, bb = sgx / C;
    for (int64_t c = 0; c < Cv; c += L) {
      const F xh = (loadv<V>(xr + c) - mu) * rs;
      storev<V>(dx + r * C + c, (loadv<V>(dyr + c) * loadv<V>(w + c) - a - xh * bb) * rs);
    }
    for (int64_t c = Cv; c < C; ++c) {
      const float xh = (load(xr, c) - mu) * rs;
      store(dx + r * C, c, (load(dyr, c) * load(w, c) - a - xh * bb) * rs);
    }
  }
}

// One copy per instruction set (cpu_isa.h) inlines the row loops above with vectors of its own
// width (NativeVec: 16-lane vectors went through the stack on AVX2).
template <typename raw_t>
void forward_range(const raw_t* x, const raw_t* w, const raw_t* b, raw_t* y, float* mean,
                   float* rstd, int64_t C, float eps, int64_t begin, int64_t end) {
  dispatch([&]<Isa I>() __attribute__((always_inline)) {
    forward_rows<NativeVec<I>>(x, w, b, y, mean, rstd, C, eps, begin, end);
  });
}
template <typename raw_t>
void backward_range(const raw_t* dy, const raw_t* x, const float* mean, const float* rstd,
                    const raw_t* w, raw_t* dx, float* dw_part, float* db_part, int64_t C,
                    int64_t begin, int64_t end) {
  dispatch([&]<Isa I>() __attribute__((always_inline)) {
    backward_rows<NativeVec<I>>(dy, x, mean, rstd, w, dx, dw_part, db_part, C, begin, end);
  });
}

bool fused_path(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
}

template <typename raw_t>
raw_t* raw(const at::Tensor& t) {
  return static_cast<raw_t*>(t.data_ptr());
}

template <typename raw_t>
void forward_typed(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                   const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd,
                   double eps) {
  const raw_t* bias = b.has_value() && b->defined() ? raw<const raw_t>(*b) : nullptr;
  const int64_t N = x.size(0), C = x.size(1);
  at::parallel_for(0, N, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(C, 1)),
                   [&](int64_t begin, int64_t end) {
    forward_range(raw<const raw_t>(x), raw<const raw_t>(w), bias,
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
                     rstd.const_data_ptr<float>(), raw<const raw_t>(w), raw<raw_t>(dx),
                     dw_parts.mutable_data_ptr<float>() + blk * C,
                     db_parts.mutable_data_ptr<float>() + blk * C, C, blk * kRowBlock,
                     std::min(N, (blk + 1) * kRowBlock));
    }
  });
}

// the blocks' partial column sums, added in block order, into dw and db (if defined)
template <typename raw_t>
void sum_blocks(const at::Tensor& dw_parts, const at::Tensor& db_parts, const at::Tensor& dw,
                const at::Tensor& db) {
  const int64_t blocks = dw_parts.size(0), C = dw_parts.size(1);
  sum_block_parts(dw_parts.const_data_ptr<float>(), blocks, C, raw<raw_t>(dw));
  if (db.defined()) sum_block_parts(db_parts.const_data_ptr<float>(), blocks, C, raw<raw_t>(db));
}

}  // namespace layer_norm_detail

using layer_norm_detail::fused_path;

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    double eps) {
  if (!fused_path(x)) return at::native_layer_norm(x, {x.size(1)}, weight, bias, eps);
  TORCH_INTERNAL_ASSERT(x.dim() == 2 && x.is_contiguous());
  const int64_t N = x.size(0);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({N, 1}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({N, 1}, x.options().dtype(at::kFloat));
  const at::Tensor w = weight.contiguous();
  const std::optional<at::Tensor> b =
      bias.has_value() && bias->defined() ? std::optional<at::Tensor>(bias->contiguous())
                                          : std::nullopt;
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
  const at::Tensor w = weight.contiguous();
  at::Tensor dw = at::empty({C}, weight.options());
  at::Tensor db = with_bias ? at::empty({C}, bias->options()) : at::Tensor();
  if (x.scalar_type() == at::kFloat) {
    layer_norm_detail::backward_typed<float>(dy, x, mean, rstd, w, dx, dw_parts, db_parts);
    layer_norm_detail::sum_blocks<float>(dw_parts, db_parts, dw, db);
  } else {
    layer_norm_detail::backward_typed<uint16_t>(dy, x, mean, rstd, w, dx, dw_parts, db_parts);
    layer_norm_detail::sum_blocks<uint16_t>(dw_parts, db_parts, dw, db);
  }
  return {dx, dw, db};
}

}  // namespace fastgpt

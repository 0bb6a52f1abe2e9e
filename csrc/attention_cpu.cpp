// Causal self-attention on the CPU: one fused pass per head, forward and backward.
//
// Why: at the presets' CPU shapes (T = 64, D = 32) attention as batched matmuls runs each bmm
// on (64 x 64) tiles at ~100 GFLOP/s, computes the masked half of the scores too, and copies
// q/k/v and the output between (B, T, H, D) and (B, H, T, D) layouts on the way in and out.
// Here each head is done in registers and L1: only the causal half is computed, and the tensors
// are read and written in place. Measured at (B=12, H=4, T=64, D=32) bf16 on one thread of the
// dev machine: forward 475 us -> 337 us, backward 596 us -> 427 us (aten path incl. its copies).
//
// Algorithm, per (batch, head), heads spread over threads with at::parallel_for. Inputs are
// widened to fp32 scratch copies (D zero-padded to 16, 32, 64 or 128 floats),
// with k (and v in the backward) transposed so that consecutive keys form one vector.
//   forward, for each block of 4 query rows i:
//     S = scale * q k^T over keys j < (last row of the block) + 1, in register tiles of
//         4 rows x (1-4 vectors of) keys (outer products over d);
//     P = softmax over j <= i (max-subtracted exp, vectorised, see vec_cpu.h), 0 for j > i;
//     out_i = sum_j P_ij v_j (4 rows x a few vectors of accumulators per column tile).
//   backward, with P saved by the forward:
//     dP = dout v^T (the same tiles as S), dS_ij = scale * P_ij (dP_ij - sum_j P_ij dP_ij),
//     dq_i = sum_j dS_ij k_j; then for each block of 4 keys j, in two passes (each with the
//     output tiles' width; one pass for both held half as many columns and ran 1.45x slower
//     at T = 256, D = 64 on AVX2): dv_j = sum_{i >= j} P_ij dout_i, dk_j = sum_{i >= j} dS_ij q_i.
//   dropout (the transformer block's; masks from dropout_cpu.h): the forward saves P and
//     weights v by P' = P * keep / (1 - p); the backward recomputes keep per row, takes dv from
//     P' and dS_ij = scale * (P'_ij dP'_ij - P_ij sum_j P'_ij dP'_ij), dP' = dout v^T.
// Saved state: P in fp32, (B*H, T, Tp) with rows padded to Tp = T rounded up to 16; entries
// with j > i are 0.
// Limits: float32 and bfloat16 with D <= 128 take this path; other dtypes (float16, float64) or
// larger D use the batched-matmul path below (aten bmm/softmax, probabilities in the input
// dtype), which is also the float64 reference of the gradchecks. Memory is O(T^2) per head
// (P), as in the batched-matmul path. Register tiles are sized per instruction set (Tiles
// below; cpu_isa.h picks the copy at run time): 16-lane vectors and 4 x 64 score tiles on
// AVX-512, 8-lane vectors and 4 x 16 tiles on AVX2 + FMA, 4-lane ones on SSE2. (With AVX-512's
// tiles on AVX2 the kernel spilled and ran 5-10x slower than aten's SDPA.)
// Precision: every product and sum in fp32 (bf16 inputs are widened exactly); outputs round
// once to the input dtype. exp has a relative error of about 2e-7.

#include "attention_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu_isa.h"
#include "dropout_cpu.h"
#include "vec_cpu.h"

namespace fastgpt {
namespace attention_detail {
using namespace vec;

constexpr int64_t kRows = 4;    // query rows (or keys) per register tile
constexpr int64_t kPad = 16;    // P's rows and the widened head rows pad to multiples of 16
constexpr int64_t kMaxD = 128;

// Register tiles per instruction set (cpu_isa.h): V, one register of the set (NativeVec); key
// vectors per score tile (4 rows x key_vecs accumulators), value vectors per output, dk and dv
// tile (4 rows or keys x out_vecs): at most 16 of AVX-512's 32 registers, 8 of the 16 of AVX2
// and SSE2, so that no tile spills.
template <Isa I>
struct Tiles {   // AVX2 and SSE2
  using V = NativeVec<I>;
  static constexpr int key_vecs = 2, out_vecs = 2;
};
template <>
struct Tiles<Isa::kAvx512> {
  using V = NativeVec<Isa::kAvx512>;
  static constexpr int key_vecs = 4, out_vecs = 4;
};

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// one head's rows: element (i, d) of the head at p[i * row_stride + d]
template <typename raw_t>
struct Rows {
  raw_t* p;
  int64_t row_stride;
};

// rows [0, n) of src into dst (row stride Dp, fp32, times `mul`); d >= D and rows n..n_pad are 0
template <class V, typename raw_t>
__attribute__((always_inline)) inline void widen_rows(Rows<const raw_t> src, int64_t n,
                                                      int64_t n_pad, int64_t D, int64_t Dp,
                                                      float mul, float* dst) {
  for (int64_t i = 0; i < n_pad; ++i) {
    float* row = dst + i * Dp;
    int64_t d = 0;
    if (i < n) {
      const raw_t* s = src.p + i * src.row_stride;
      for (; d + V::lanes <= D; d += V::lanes) storev<V>(row + d, loadv<V>(s + d) * mul);
      for (; d < D; ++d) row[d] = load(s, d) * mul;
    }
    for (; d < Dp; ++d) row[d] = 0.0f;
  }
}

// src^T into dst: dst[d * Tp + j] = src(j, d) for d < D, j < T; 0 for T <= j < Tp
template <typename raw_t>
__attribute__((always_inline)) inline void transpose_rows(Rows<const raw_t> src, int64_t T,
                                                          int64_t Tp, int64_t D, float* dst) {
  for (int64_t d = 0; d < D; ++d) std::fill(dst + d * Tp + T, dst + (d + 1) * Tp, 0.0f);
  for (int64_t j = 0; j < T; ++j) {
    const raw_t* s = src.p + j * src.row_stride;
    for (int64_t d = 0; d < D; ++d) dst[d * Tp + j] = load(s, d);
  }
}

// Nv accumulators (columns [d0, d0 + Nv * lanes) of a row) into dst, for d < D, rounded to raw_t
template <class V, int Nv, typename raw_t>
__attribute__((always_inline)) inline void store_row(raw_t* dst, const typename V::f (&acc)[Nv],
                                                     int64_t d0, int64_t D) {
  for (int c = 0; c < Nv; ++c) {
    const int64_t d = d0 + c * V::lanes;
    if (d + V::lanes <= D) {
      storev<V>(dst + d, acc[c]);
    } else {
      for (int64_t e = d; e < D; ++e) store(dst, e, acc[c][e - d]);
    }
  }
}

// A (rows x D, row stride Dp) times Bt (D x Tp, the transposed right operand) for 4 rows and
// key vectors [c0, c0 + Nv): out[r * Tp + j] for j in [lanes * c0, lanes * (c0 + Nv))
template <class V, int Nv>
__attribute__((always_inline)) inline void score_tile(const float* a, int64_t Dp, const float* bt,
                                                      int64_t Tp, int64_t D, int64_t c0,
                                                      float* out) {
  typename V::f acc[kRows][Nv] = {};
  const float* b = bt + c0 * V::lanes;
  for (int64_t d = 0; d < D; ++d) {
    typename V::f bv[Nv];
    for (int c = 0; c < Nv; ++c) bv[c] = loadv<V>(b + d * Tp + c * V::lanes);
    for (int r = 0; r < kRows; ++r) {
      const float ad = a[r * Dp + d];
      for (int c = 0; c < Nv; ++c) acc[r][c] += ad * bv[c];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < Nv; ++c) storev<V>(out + r * Tp + (c0 + c) * V::lanes, acc[r][c]);
}

// score_tile over key vectors [0, nv) for the 4 rows at a
template <Isa I>
__attribute__((always_inline)) inline void scores(const float* a, int64_t Dp, const float* bt,
                                                  int64_t Tp, int64_t D, int64_t nv, float* out) {
  using V = typename Tiles<I>::V;
  constexpr int Nv = Tiles<I>::key_vecs;
  int64_t c = 0;
  for (; c + Nv <= nv; c += Nv) score_tile<V, Nv>(a, Dp, bt, Tp, D, c, out);
  for (; c < nv; ++c) score_tile<V, 1>(a, Dp, bt, Tp, D, c, out);
}

// dst row i0 + r = sum_{j < n} w[r * w_stride + j] * m[j] (m: rows of Dp floats), for the
// `rows` <= 4 rows at w; column tiles of out_vecs vectors, those past D skipped
template <Isa I, int Dp, typename raw_t>
__attribute__((always_inline)) inline void weighted_rows(const float* w, int64_t w_stride,
                                                         const float* m, int64_t n, int64_t rows,
                                                         Rows<raw_t> dst, int64_t i0, int64_t D) {
  using V = typename Tiles<I>::V;
  constexpr int64_t L = V::lanes;
  constexpr int Nv = std::min<int64_t>(Tiles<I>::out_vecs, Dp / L);
  for (int64_t c0 = 0; c0 * L < D; c0 += Nv) {
    typename V::f acc[kRows][Nv] = {};
    for (int64_t j = 0; j < n; ++j) {
      typename V::f mv[Nv];
      for (int c = 0; c < Nv; ++c) mv[c] = loadv<V>(m + j * Dp + (c0 + c) * L);
      for (int r = 0; r < kRows; ++r) {
        const float wj = w[r * w_stride + j];
        for (int c = 0; c < Nv; ++c) acc[r][c] += wj * mv[c];
      }
    }
    for (int64_t r = 0; r < rows; ++r)
      store_row<V, Nv>(dst.p + (i0 + r) * dst.row_stride, acc[r], c0 * L, D);
  }
}

// row s (scores of keys 0..i, nv vectors) -> softmax probabilities, 0 for keys j > i; also
// written to `saved` (when not null) in the same pass
template <class V>
__attribute__((always_inline)) inline void causal_softmax_row(float* s, int64_t i, int64_t nv,
                                                              float* saved) {
  using F = typename V::f;
  constexpr int64_t L = V::lanes;
  const F neg_inf = F{} - std::numeric_limits<float>::infinity();
  const typename V::i lanes = lane_numbers<V>();
  F vmax = neg_inf;
  for (int64_t c = 0; c < nv; ++c) {
    const typename V::i keep = lanes <= int32_t(i - c * L);
    const F v = keep ? loadv<V>(s + c * L) : neg_inf;
    vmax = vmax > v ? vmax : v;
  }
  const float m = hmax<V>(vmax);
  F vsum = {};
  for (int64_t c = 0; c < nv; ++c) {
    const typename V::i keep = lanes <= int32_t(i - c * L);
    const F e = exp_nonpositive<F, typename V::u, typename V::i>(loadv<V>(s + c * L) - m);
    const F p = keep ? e : F{};
    vsum += p;
    storev<V>(s + c * L, p);
  }
  const float inv = 1.0f / hsum<V>(vsum);
  for (int64_t c = 0; c < nv; ++c) {
    const F p = loadv<V>(s + c * L) * inv;
    storev<V>(s + c * L, p);
    if (saved != nullptr) storev<V>(saved + c * L, p);
  }
}

// dropout of one row of probabilities (nv vectors, in place): P' = P * keep / (1 - p), the
// mask of row `key` (dropout_cpu.h)
template <class V>
__attribute__((always_inline)) inline void drop_row(float* s, int64_t nv, uint32_t key,
                                                    const dropout::Params& d) {
  constexpr int64_t L = V::lanes;
  for (int64_t c = 0; c < nv; ++c) {
    const typename V::f v = loadv<V>(s + c * L) * d.scale;
    storev<V>(s + c * L, dropout::kept_lanes<V>(key, uint32_t(c * L), d) ? v : typename V::f{});
  }
}

// one head forward; scratch holds at least forward_scratch(T, Dp) floats
inline int64_t forward_scratch(int64_t T, int64_t Dp) {
  const int64_t Tp = round_up(T, kPad), Tr = round_up(T, kRows);
  return Tr * Dp + Dp * Tp + T * Dp + kRows * Tp;
}

template <Isa I, int Dp, typename raw_t>
__attribute__((always_inline)) inline void forward_head(Rows<const raw_t> q, Rows<const raw_t> k,
                                                        Rows<const raw_t> v, Rows<raw_t> out,
                                                        float* probs, int64_t T, int64_t D,
                                                        float scale, const dropout::Params* drop,
                                                        uint64_t row0, float* scratch) {
  using V = typename Tiles<I>::V;
  constexpr int64_t L = V::lanes;
  const int64_t Tp = round_up(T, kPad), Tr = round_up(T, kRows);
  float* qs = scratch;          // (Tr, Dp): scale * q
  float* kt = qs + Tr * Dp;     // (D, Tp): k^T
  float* vs = kt + Dp * Tp;     // (T, Dp)
  float* s = vs + T * Dp;       // (4, Tp): one tile's scores, then probabilities
  widen_rows<V>(q, T, Tr, D, Dp, scale, qs);
  transpose_rows(k, T, Tp, D, kt);
  widen_rows<V>(v, T, T, D, Dp, 1.0f, vs);
  for (int64_t i0 = 0; i0 < T; i0 += kRows) {
    const int64_t rows = std::min(kRows, T - i0), keys = i0 + rows;
    const int64_t nv = (keys + L - 1) / L;
    scores<I>(qs + i0 * Dp, Dp, kt, Tp, D, nv, s);
    for (int64_t r = 0; r < rows; ++r) {
      float* saved = probs == nullptr ? nullptr : probs + (i0 + r) * Tp;
      causal_softmax_row<V>(s + r * Tp, i0 + r, nv, saved);
      // the rest of the saved row as 0, so the saved tensor is all defined
      if (saved != nullptr) std::fill(saved + nv * L, saved + Tp, 0.0f);
      if (drop != nullptr)   // P' for the output; the saved P stays undropped
        drop_row<V>(s + r * Tp, nv, dropout::row_key(drop->seed, row0 + i0 + r), *drop);
    }
    weighted_rows<I, Dp>(s, Tp, vs, keys, rows, out, i0, D);
  }
}

// the backward of softmax then dropout for one row: with P' = P * keep / (1 - p) and dP' the
// gradient of P', dP = dP' * keep / (1 - p) and dS = scale * P * (dP - sum_j P_j dP_j)
// = scale * (P' dP' - P * sum_j P'_j dP'_j); writes P' (for dv) to pd and dS to ds
template <class V>
__attribute__((always_inline)) inline void dropped_softmax_grad_row(
    const float* p, const float* dpr, int64_t nv, uint32_t key, const dropout::Params& d,
    float scale, float* pd, float* ds) {
  constexpr int64_t L = V::lanes;
  typename V::f vdot = {};
  for (int64_t c = 0; c < nv; ++c) {
    const typename V::f kept = loadv<V>(p + c * L) * d.scale;
    const typename V::f pdv =
        dropout::kept_lanes<V>(key, uint32_t(c * L), d) ? kept : typename V::f{};
    storev<V>(pd + c * L, pdv);
    vdot += pdv * loadv<V>(dpr + c * L);
  }
  const float dot = hsum<V>(vdot);
  for (int64_t c = 0; c < nv; ++c) {
    const typename V::f g = loadv<V>(pd + c * L) * loadv<V>(dpr + c * L);
    storev<V>(ds + c * L, (g - loadv<V>(p + c * L) * dot) * scale);
  }
}

inline int64_t backward_scratch(int64_t T, int64_t Dp) {
  const int64_t Tp = round_up(T, kPad), Tr = round_up(T, kRows);
  return Tr * Dp + Dp * Tp + 2 * T * Dp + 2 * Tr * Tp + kRows * Tp;
}

// dst row j = sum_{i >= j} w[i * Tp + j] m_i (m: rows of Dp floats), for 4 keys j at a time:
// dv from P (after dropout, if any) and dout, dk from dS and q. Reads w at (i, j) with i >= j0
// and j < j0 + 4: inside the vectors the forward wrote for row i (j0 is a multiple of 4, rows
// are written up to a multiple of the lanes past their block). One sum per pass, with
// out_vecs-wide column tiles: half the accumulators of a joint dk/dv tile, so twice its width.
template <Isa I, int Dp, typename raw_t>
__attribute__((always_inline)) inline void key_sums(const float* w, const float* m,
                                                    Rows<raw_t> dst, int64_t T, int64_t Tp,
                                                    int64_t D) {
  using V = typename Tiles<I>::V;
  constexpr int64_t L = V::lanes;
  constexpr int Nv = std::min<int64_t>(Tiles<I>::out_vecs, Dp / L);
  for (int64_t j0 = 0; j0 < T; j0 += kRows) {
    const int64_t nkeys = std::min(kRows, T - j0);
    for (int64_t c0 = 0; c0 * L < D; c0 += Nv) {
      typename V::f acc[kRows][Nv] = {};
      for (int64_t i = j0; i < T; ++i) {
        typename V::f mv[Nv];
        for (int c = 0; c < Nv; ++c) mv[c] = loadv<V>(m + i * Dp + (c0 + c) * L);
        for (int jj = 0; jj < kRows; ++jj) {
          const float wij = w[i * Tp + j0 + jj];
          for (int c = 0; c < Nv; ++c) acc[jj][c] += wij * mv[c];
        }
      }
      for (int64_t jj = 0; jj < nkeys; ++jj)
        store_row<V, Nv>(dst.p + (j0 + jj) * dst.row_stride, acc[jj], c0 * L, D);
    }
  }
}

template <Isa I, int Dp, typename raw_t>
__attribute__((always_inline)) inline void backward_head(
    Rows<const raw_t> dout, Rows<const raw_t> q, Rows<const raw_t> k, Rows<const raw_t> v,
    const float* probs, Rows<raw_t> dq, Rows<raw_t> dk, Rows<raw_t> dv, int64_t T, int64_t D,
    float scale, const dropout::Params* drop, uint64_t row0, float* scratch) {
  using V = typename Tiles<I>::V;
  constexpr int64_t L = V::lanes;
  const int64_t Tp = round_up(T, kPad), Tr = round_up(T, kRows);
  float* dos = scratch;         // (Tr, Dp): dout
  float* vt = dos + Tr * Dp;    // (D, Tp): v^T
  float* ks = vt + Dp * Tp;     // (T, Dp)
  float* qs = ks + T * Dp;      // (T, Dp)
  float* ds = qs + T * Dp;      // (Tr, Tp): dS, rows >= T stay 0
  float* pd = ds + Tr * Tp;     // (Tr, Tp): P' = P after dropout (with dropout only)
  float* dp = pd + Tr * Tp;     // (4, Tp): one tile of dP
  widen_rows<V>(dout, T, Tr, D, Dp, 1.0f, dos);
  transpose_rows(v, T, Tp, D, vt);
  widen_rows<V>(k, T, T, D, Dp, 1.0f, ks);
  widen_rows<V>(q, T, T, D, Dp, 1.0f, qs);
  std::fill(ds + T * Tp, ds + Tr * Tp, 0.0f);
  for (int64_t i0 = 0; i0 < T; i0 += kRows) {
    const int64_t rows = std::min(kRows, T - i0), keys = i0 + rows;
    const int64_t nv = (keys + L - 1) / L;
    scores<I>(dos + i0 * Dp, Dp, vt, Tp, D, nv, dp);
    for (int64_t r = 0; r < rows; ++r) {
      const float* p = probs + (i0 + r) * Tp;
      const float* dpr = dp + r * Tp;
      float* dsr = ds + (i0 + r) * Tp;
      if (drop != nullptr) {
        dropped_softmax_grad_row<V>(p, dpr, nv, dropout::row_key(drop->seed, row0 + i0 + r),
                                    *drop, scale, pd + (i0 + r) * Tp, dsr);
        continue;
      }
      typename V::f vdot = {};
      for (int64_t c = 0; c < nv; ++c) vdot += loadv<V>(p + c * L) * loadv<V>(dpr + c * L);
      const float dot = hsum<V>(vdot);
      for (int64_t c = 0; c < nv; ++c) {
        const typename V::f pv = loadv<V>(p + c * L);
        storev<V>(dsr + c * L, pv * (loadv<V>(dpr + c * L) - dot) * scale);
      }
    }
    weighted_rows<I, Dp>(ds + i0 * Tp, Tp, ks, keys, rows, dq, i0, D);
  }
  key_sums<I, Dp>(drop != nullptr ? pd : probs, dos, dv, T, Tp, D);
  key_sums<I, Dp>(ds, qs, dk, T, Tp, D);
}

// Per-dtype entry points, dispatching on the instruction set (cpu_isa.h) and on Dp. A head's
// tensors are addressed as base + b * stride_b + h * stride_h; `st` holds (b, h, row) per
// tensor.
struct HeadLayout {
  int64_t B, H, T, D;
  // D padded to 16, 32, 64 or 128 floats
  int64_t padded_d() const {
    const int64_t Dp = round_up(D, kPad);
    return Dp <= 16 ? 16 : Dp <= 32 ? 32 : Dp <= 64 ? 64 : 128;
  }
};

// the rows of head bh of tensor number t
template <typename raw_t>
__attribute__((always_inline)) inline Rows<raw_t> head_rows(raw_t* base, const int64_t (*st)[3],
                                                            int t, int64_t bh, HeadLayout L) {
  return {base + bh / L.H * st[t][0] + bh % L.H * st[t][1], st[t][2]};
}

// calls body.template operator()<Dp>() with the compile-time padded head size of L
template <typename Body>
__attribute__((always_inline)) inline void with_padded_d(HeadLayout L, Body&& body) {
  switch (L.padded_d()) {
    case 16: body.template operator()<16>(); break;
    case 32: body.template operator()<32>(); break;
    case 64: body.template operator()<64>(); break;
    default: body.template operator()<128>(); break;
  }
}

template <typename raw_t>
void forward_range(const raw_t* q, const raw_t* k, const raw_t* v, raw_t* out, float* probs,
                   const int64_t (*st)[3], HeadLayout L, float scale,
                   const dropout::Params* drop, int64_t begin, int64_t end) {
  std::vector<float> scratch(forward_scratch(L.T, L.padded_d()));
  const int64_t Tp = round_up(L.T, kPad);
  dispatch([&]<Isa I>() __attribute__((always_inline)) {
    with_padded_d(L, [&]<int Dp>() __attribute__((always_inline)) {
      for (int64_t bh = begin; bh < end; ++bh) {
        float* pr = probs == nullptr ? nullptr : probs + bh * L.T * Tp;
        forward_head<I, Dp>(head_rows(q, st, 0, bh, L), head_rows(k, st, 1, bh, L),
                            head_rows(v, st, 2, bh, L), head_rows(out, st, 3, bh, L), pr, L.T,
                            L.D, scale, drop, uint64_t(bh * L.T), scratch.data());
      }
    });
  });
}

template <typename raw_t>
void backward_range(const raw_t* dout, const raw_t* q, const raw_t* k, const raw_t* v,
                    const float* probs, raw_t* dq, raw_t* dk, raw_t* dv, const int64_t (*st)[3],
                    HeadLayout L, float scale, const dropout::Params* drop, int64_t begin,
                    int64_t end) {
  std::vector<float> scratch(backward_scratch(L.T, L.padded_d()));
  const int64_t Tp = round_up(L.T, kPad);
  dispatch([&]<Isa I>() __attribute__((always_inline)) {
    with_padded_d(L, [&]<int Dp>() __attribute__((always_inline)) {
      for (int64_t bh = begin; bh < end; ++bh) {
        backward_head<I, Dp>(head_rows(dout, st, 0, bh, L), head_rows(q, st, 1, bh, L),
                             head_rows(k, st, 2, bh, L), head_rows(v, st, 3, bh, L),
                             probs + bh * L.T * Tp, head_rows(dq, st, 4, bh, L),
                             head_rows(dk, st, 5, bh, L), head_rows(dv, st, 6, bh, L), L.T, L.D,
                             scale, drop, uint64_t(bh * L.T), scratch.data());
      }
    });
  });
}

// t itself when its D dimension has stride 1 (all the fused kernel needs), else a copy
at::Tensor unit_stride_d(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

bool fused_path(const at::Tensor& q) {
  return (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
         q.size(3) <= kMaxD;
}

// the raw element pointer (bf16 as its 16 bits)
template <typename raw_t>
raw_t* raw(const at::Tensor& t) {
  return static_cast<raw_t*>(t.data_ptr());
}

template <typename raw_t>
void forward_fused(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                   const at::Tensor& out, float* probs, const dropout::Params* drop) {
  const HeadLayout L{q.size(0), q.size(1), q.size(2), q.size(3)};
  int64_t st[4][3];
  const at::Tensor* ts[4] = {&q, &k, &v, &out};
  for (int t = 0; t < 4; ++t)
    for (int d = 0; d < 3; ++d) st[t][d] = ts[t]->stride(d);
  at::parallel_for(0, L.B * L.H, 1, [&](int64_t begin, int64_t end) {
    forward_range(raw<const raw_t>(q), raw<const raw_t>(k), raw<const raw_t>(v), raw<raw_t>(out),
                  probs, st, L, float(scale), drop, begin, end);
  });
}

template <typename raw_t>
void backward_fused(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& probs, double scale,
                    const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                    const dropout::Params* drop) {
  const HeadLayout L{q.size(0), q.size(1), q.size(2), q.size(3)};
  int64_t st[7][3];
  const at::Tensor* ts[7] = {&dout, &q, &k, &v, &dq, &dk, &dv};
  for (int t = 0; t < 7; ++t)
    for (int d = 0; d < 3; ++d) st[t][d] = ts[t]->stride(d);
  at::parallel_for(0, L.B * L.H, 1, [&](int64_t begin, int64_t end) {
    backward_range(raw<const raw_t>(dout), raw<const raw_t>(q), raw<const raw_t>(k),
                   raw<const raw_t>(v), probs.const_data_ptr<float>(), raw<raw_t>(dq),
                   raw<raw_t>(dk), raw<raw_t>(dv), st, L, float(scale), drop, begin, end);
  });
}

}  // namespace attention_detail

using attention_detail::fused_path;
using attention_detail::unit_stride_d;

// the dropout mask of the batched-matmul path, (B*H, T, T) in `like`'s dtype, times 1 / (1 - p)
at::Tensor scaled_keep(const dropout::Params& d, int64_t BH, int64_t T, const at::Tensor& like) {
  return dropout::keep_mask(d.seed, BH * T, T, d.p).view({BH, T, T}).to(like.scalar_type()) *
         (1.0 / (1.0 - d.p));
}

at::Tensor causal_attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                    const at::Tensor& v_in, double scale, const at::Tensor& out,
                                    bool save, const dropout::Params* drop) {
  const int64_t B = q_in.size(0), H = q_in.size(1), T = q_in.size(2), D = q_in.size(3);
  if (fused_path(q_in)) {
    const at::Tensor q = unit_stride_d(q_in), k = unit_stride_d(k_in), v = unit_stride_d(v_in);
    TORCH_INTERNAL_ASSERT(out.stride(3) == 1);
    at::Tensor probs;
    if (save) probs = at::empty({B * H, T, attention_detail::round_up(T, attention_detail::kPad)},
                                q.options().dtype(at::kFloat));
    if (q.scalar_type() == at::kFloat) {
      attention_detail::forward_fused<float>(
          q, k, v, scale, out, save ? probs.mutable_data_ptr<float>() : nullptr, drop);
    } else {
      attention_detail::forward_fused<uint16_t>(
          q, k, v, scale, out, save ? probs.mutable_data_ptr<float>() : nullptr, drop);
    }
    return probs;
  }
  // batched matmuls: scores = causal mask + scale * q k^T in one baddbmm
  const at::Tensor qb = q_in.reshape({B * H, T, D}), kb = k_in.reshape({B * H, T, D}),
                   vb = v_in.reshape({B * H, T, D});
  const at::Tensor mask =
      at::full({T, T}, -std::numeric_limits<double>::infinity(), q_in.options()).triu_(1);
  const at::Tensor scores =
      at::baddbmm(mask.expand({B * H, T, T}), qb, kb.transpose(1, 2), /*beta=*/1.0, scale);
  const at::Tensor probs = at::_softmax(scores, -1, /*half_to_float=*/false);
  const at::Tensor weights = drop == nullptr ? probs : probs * scaled_keep(*drop, B * H, T, probs);
  out.copy_(at::bmm(weights, vb).view({B, H, T, D}));
  return save ? probs : at::Tensor();
}

void causal_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& saved,
                               double scale, const at::Tensor& dq, const at::Tensor& dk,
                               const at::Tensor& dv, const dropout::Params* drop) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  if (fused_path(q)) {
    TORCH_INTERNAL_ASSERT(dq.stride(3) == 1 && dk.stride(3) == 1 && dv.stride(3) == 1);
    const at::Tensor dout = unit_stride_d(grad_out), qu = unit_stride_d(q),
                     ku = unit_stride_d(k), vu = unit_stride_d(v);
    if (q.scalar_type() == at::kFloat) {
      attention_detail::backward_fused<float>(dout, qu, ku, vu, saved, scale, dq, dk, dv, drop);
    } else {
      attention_detail::backward_fused<uint16_t>(dout, qu, ku, vu, saved, scale, dq, dk, dv,
                                                 drop);
    }
    return;
  }
  const at::Tensor dout = grad_out.reshape({B * H, T, D}), qb = q.reshape({B * H, T, D}),
                   kb = k.reshape({B * H, T, D}), vb = v.reshape({B * H, T, D});
  const at::Tensor keep = drop == nullptr ? at::Tensor() : scaled_keep(*drop, B * H, T, saved);
  const at::Tensor weights = drop == nullptr ? saved : saved * keep;   // after dropout
  dv.copy_(at::bmm(weights.transpose(1, 2), dout).view({B, H, T, D}));
  at::Tensor dprobs = at::bmm(dout, vb.transpose(1, 2));
  if (drop != nullptr) dprobs.mul_(keep);
  // softmax backward; the masked probabilities are exactly 0, so their scores get 0 gradient
  at::Tensor dscores = at::_softmax_backward_data(dprobs, saved, -1, saved.scalar_type());
  dscores.mul_(scale);
  dq.copy_(at::bmm(dscores, kb).view({B, H, T, D}));
  dk.copy_(at::bmm(dscores.transpose(1, 2), qb).view({B, H, T, D}));
}

at::Tensor causal_attention_saved_like(const at::Tensor& q) {
  const int64_t BH = q.size(0) * q.size(1), T = q.size(2);
  return fused_path(q) ? at::empty({BH, T, attention_detail::round_up(T, attention_detail::kPad)},
                                   q.options().dtype(at::kFloat).device(at::kMeta))
                       : at::empty({BH, T, T}, q.options().device(at::kMeta));
}

// ---- the fastgpt::causal_attention ops on CPU ----
namespace {

#define OP_NAME "fastgpt::causal_attention"
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  CHECK_DIM(q, 4);
  TORCH_CHECK_VALUE(k.sizes() == q.sizes() && v.sizes() == q.sizes(), OP_NAME ": q, k, v must "
                    "have one shape (B, H, T, D); got ", q.sizes(), ", ", k.sizes(), ", ",
                    v.sizes());
  TORCH_CHECK_VALUE(q.is_floating_point() && k.scalar_type() == q.scalar_type() &&
                        v.scalar_type() == q.scalar_type(),
                    OP_NAME ": q, k, v must have one floating dtype; got ", q.scalar_type(), ", ",
                    k.scalar_type(), ", ", v.scalar_type());
  CHECK_DEVICE(k, q.device());
  CHECK_DEVICE(v, q.device());
  TORCH_CHECK_VALUE(q.size(3) >= 1, OP_NAME ": the head size D must be >= 1; got shape ",
                    q.sizes());
}

// (B, H, T, D) as a view of a fresh (B, T, H, D) tensor: the heads of a row sit side by side
at::Tensor new_like_heads(const at::Tensor& q) {
  return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
}

at::Tensor causal_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                double scale) {
  check_qkv(q, k, v);
  at::Tensor out = new_like_heads(q);
  causal_attention_forward(q, k, v, scale, out, /*save=*/false);
  return out;
}

std::tuple<at::Tensor, at::Tensor> causal_attention_train_cpu(const at::Tensor& q,
                                                              const at::Tensor& k,
                                                              const at::Tensor& v, double scale) {
  check_qkv(q, k, v);
  at::Tensor out = new_like_heads(q);
  at::Tensor saved = causal_attention_forward(q, k, v, scale, out, /*save=*/true);
  return {out, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& saved, double scale) {
  check_qkv(q, k, v);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type(),
                    OP_NAME ": grad_out must have q's shape ", q.sizes(), " and dtype ",
                    q.scalar_type(), "; got ", grad_out.sizes(), " ", grad_out.scalar_type());
  const at::Tensor expected = causal_attention_saved_like(q);
  TORCH_CHECK_VALUE(saved.sizes() == expected.sizes() &&
                        saved.scalar_type() == expected.scalar_type() && saved.is_contiguous(),
                    OP_NAME ": `saved` must be what causal_attention_train returned for these "
                    "inputs, a contiguous ", expected.scalar_type(), " tensor of shape ",
                    expected.sizes(), "; got ", saved.scalar_type(), " ", saved.sizes());
  at::Tensor dq = new_like_heads(q), dk = new_like_heads(q), dv = new_like_heads(q);
  causal_attention_backward(grad_out, q, k, v, saved, scale, dq, dk, dv);
  return {dq, dk, dv};
}
#undef OP_NAME

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("causal_attention", &causal_attention_cpu);
  m.impl("causal_attention_train", &causal_attention_train_cpu);
  m.impl("causal_attention_backward", &causal_attention_backward_cpu);
}

}  // namespace fastgpt

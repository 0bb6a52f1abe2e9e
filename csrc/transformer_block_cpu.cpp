// CPU kernels of fastgpt::transformer_block / transformer_block_train / transformer_block_backward:
// one GPT block, forward and backward, written out as ATen calls from C++.
//
// Why: at the baby preset's sizes (768 tokens x 128 channels) a training step spends about as
// long in Python, module calls and the autograd engine (~35 ops and autograd nodes per block)
// as in the matmuls themselves. Here a block is one autograd node and one op call; its ~25
// forward and ~40 backward ATen calls go straight to the kernels (below the autograd keys).
//
// Algorithm (x: (B, T, C), N = B*T, H heads of D = C/H):
//   forward  ln_1 -> c_attn (one matmul for q, k, v, as (N, 3C) rows) -> causal attention
//            (attention_cpu.h: reads q, k, v from those rows and writes its output straight
//            into (N, C) rows) -> c_proj -> + x -> ln_2 -> c_fc -> exact (erf) GELU, which also
//            writes its derivative -> mlp c_proj -> + x1;
//   backward the chain rule in reverse, with the attention backward of attention_cpu.h, which
//            writes dq, dk, dv into one (N, 3C) buffer. LayerNorm is layer_norm_cpu.h's.
// Saved for backward (the `saved` list, in this order): ln_1 out, its mean and rstd (fp32 for
// float32/bfloat16 x), q/k/v as
// (N, 3C) rows, what the attention forward saves (its probabilities), the attention output
// (N, C), x1, ln_2 out, its mean and rstd, gelu'(c_fc output) in fp32 (fp64 for fp64 input;
// written by the forward's GELU pass, gelu_cpu.h), the GELU output, and the dropout seed (an
// int64 tensor of one element; 0 without dropout).
// Dropout (dropout_p > 0), at nanoGPT's three places: the attention probabilities (inside the
// attention kernels) and the two branches before their residual adds (dropout_cpu.h's
// add_dropped_); the backward recomputes the masks from the seed.
// Limits: CPU only; any float dtype, all inputs of one dtype. T is any length; attention is
// O(T^2) memory per head.
// Precision: the dtype of the inputs throughout, like the eager module in that dtype: matmuls
// accumulate in fp32 (oneDNN/BLAS), LayerNorm statistics and softmax are computed in fp32, and
// for float32/bfloat16 the whole attention is computed in fp32 (attention_cpu.cpp).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "attention_cpu.h"
#include "column_sums_cpu.h"
#include "dropout_cpu.h"
#include "gelu_cpu.h"
#include "layer_norm_cpu.h"
#include "transformer_block.h"

namespace fastgpt {
namespace {

constexpr double kLayerNormEps = 1e-5;  // nn.LayerNorm's default, which nanoGPT uses

at::Tensor dense(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  return has(b) ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
}

// part `s` of (B*T, P*H*D) rows (P parts side by side, e.g. q, k, v) as (B, H, T, D) heads
at::Tensor heads(const at::Tensor& rows, int64_t B, int64_t T, int64_t H, int64_t D, int64_t s) {
  return rows.view({B, T, rows.size(1) / (H * D), H, D}).select(2, s).transpose(1, 2);
}

// the dropout of each site (dropout_cpu.h's site_seed) for the block call's seed
struct BlockDropout {
  dropout::Params site[3];
  BlockDropout(uint64_t seed, double p) {
    for (int k = 0; k < 3; ++k) site[k] = dropout::Params::make(dropout::site_seed(seed, k), p);
  }
};

// branch + residual, after the branch's dropout when there is one (in place, in branch);
// dropout_cpu.h's vectorised add either way (aten's bf16 add_ took ~20 us at the baby block)
void add_residual_(at::Tensor& branch, const at::Tensor& residual, const BlockDropout* drop,
                   int site) {
  dropout::add_dropped_(branch, residual,
                        drop == nullptr ? dropout::Params::none() : drop->site[site]);
}

#define OP_NAME "fastgpt::transformer_block"
void check_inputs(const at::Tensor& x, const BlockWeights& w, int64_t n_head, double dropout_p) {
  CHECK_DIM(x, 3);
  TORCH_CHECK_VALUE(x.is_floating_point(), OP_NAME ": x must be a floating dtype; got ",
                    x.scalar_type());
  const int64_t C = x.size(2);
  TORCH_CHECK_VALUE(n_head >= 1 && C % n_head == 0, OP_NAME ": n_head must be >= 1 and divide "
                    "the channel count ", C, "; got ", n_head);
  dropout::check_probability(OP_NAME, dropout_p);
  const int64_t F = w.c_fc_weight.dim() == 2 ? w.c_fc_weight.size(0) : -1;
  const struct {
    const char* name;
    const std::optional<at::Tensor> t;
    std::vector<int64_t> shape;
  } expected[] = {
      {"ln_1_weight", w.ln_1_weight, {C}},          {"ln_1_bias", w.ln_1_bias, {C}},
      {"c_attn_weight", w.c_attn_weight, {3 * C, C}}, {"c_attn_bias", w.c_attn_bias, {3 * C}},
      {"attn_c_proj_weight", w.attn_c_proj_weight, {C, C}},
      {"attn_c_proj_bias", w.attn_c_proj_bias, {C}},
      {"ln_2_weight", w.ln_2_weight, {C}},          {"ln_2_bias", w.ln_2_bias, {C}},
      {"c_fc_weight", w.c_fc_weight, {F, C}},       {"c_fc_bias", w.c_fc_bias, {F}},
      {"mlp_c_proj_weight", w.mlp_c_proj_weight, {C, F}},
      {"mlp_c_proj_bias", w.mlp_c_proj_bias, {C}},
  };
  for (const auto& e : expected) {
    if (!has(e.t)) continue;
    TORCH_CHECK_VALUE(e.t->sizes() == at::IntArrayRef(e.shape), OP_NAME ": ", e.name,
                      " must have shape ", at::IntArrayRef(e.shape), " for x of shape ",
                      x.sizes(), "; got ", e.t->sizes());
    TORCH_CHECK_VALUE(e.t->scalar_type() == x.scalar_type(), OP_NAME ": ", e.name,
                      " must have x's dtype ", x.scalar_type(), "; got ", e.t->scalar_type());
    TORCH_CHECK_VALUE(e.t->device() == x.device(), OP_NAME ": ", e.name, " must be on ",
                      x.device(), " like x; got ", e.t->device());
  }
}
#undef OP_NAME

// The forward pass; fills `saved` (see the file comment) when it is not null.
at::Tensor block_forward(const at::Tensor& x_in, const BlockWeights& w, int64_t n_head,
                         double dropout_p, std::vector<at::Tensor>* saved) {
  check_inputs(x_in, w, n_head, dropout_p);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // no per-op autograd bookkeeping
  const int64_t B = x_in.size(0), T = x_in.size(1), C = x_in.size(2), N = B * T;
  const int64_t H = n_head, D = C / H;
  const at::Tensor x = x_in.contiguous().view({N, C});
  const uint64_t seed = dropout_p > 0 ? dropout::draw_seed() : 0;
  const BlockDropout drop_sites(seed, dropout_p);
  const BlockDropout* drop = dropout_p > 0 ? &drop_sites : nullptr;

  auto [ln1, mean1, rstd1] = layer_norm_forward(x, w.ln_1_weight, w.ln_1_bias, kLayerNormEps);
  // q, k, v and the attention output stay in their (N, 3C) and (N, C) rows: the attention
  // kernel reads and writes them as (B, H, T, D) views
  const at::Tensor qkv = dense(ln1, w.c_attn_weight, w.c_attn_bias);  // (N, 3C)
  const at::Tensor att = at::empty({N, C}, x.options());
  at::Tensor probs = causal_attention_forward(
      heads(qkv, B, T, H, D, 0), heads(qkv, B, T, H, D, 1), heads(qkv, B, T, H, D, 2),
      1.0 / std::sqrt(double(D)), heads(att, B, T, H, D, 0), /*save=*/saved != nullptr,
      drop ? &drop->site[0] : nullptr);
  at::Tensor x1 = dense(att, w.attn_c_proj_weight, w.attn_c_proj_bias);
  add_residual_(x1, x, drop, 1);

  auto [ln2, mean2, rstd2] = layer_norm_forward(x1, w.ln_2_weight, w.ln_2_bias, kLayerNormEps);
  const at::Tensor h = dense(ln2, w.c_fc_weight, w.c_fc_bias);  // (N, F)
  at::Tensor g, gelu_grad;  // gelu(h) and gelu'(h), the latter in fp32 (fp64 for fp64 input)
  if (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) {
    std::tie(g, gelu_grad) = gelu_with_derivative(h);
  } else {  // float16, float64: aten's kernels
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    g = at::gelu(h);
    gelu_grad = at::gelu_backward(at::ones(h.sizes(), h.options().dtype(acc)), h.to(acc));
  }
  at::Tensor out = dense(g, w.mlp_c_proj_weight, w.mlp_c_proj_bias);
  add_residual_(out, x1, drop, 2);
  if (saved != nullptr) {
    *saved = {ln1, mean1, rstd1, qkv, probs, att, x1, ln2, mean2, rstd2, gelu_grad, g,
              at::full({1}, int64_t(seed), x.options().dtype(at::kLong))};
  }
  return out.view({B, T, C});
}

at::Tensor transformer_block_cpu(BLOCK_PARAMS) {
  return block_forward(x, BLOCK_WEIGHTS, n_head, dropout_p, nullptr);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> transformer_block_train_cpu(BLOCK_PARAMS) {
  std::vector<at::Tensor> saved;
  at::Tensor out = block_forward(x, BLOCK_WEIGHTS, n_head, dropout_p, &saved);
  return {out, saved};
}

std::vector<at::Tensor> transformer_block_backward_cpu(const at::Tensor& grad_out,
                                                       at::TensorList saved, BLOCK_PARAMS) {
  const BlockWeights w = BLOCK_WEIGHTS;
  TORCH_CHECK_VALUE(saved.size() == 13, "fastgpt::transformer_block_backward: expected the 13 "
                    "tensors transformer_block_train saves; got ", saved.size());
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "fastgpt::transformer_block_backward: "
                    "grad_out must have x's shape ", x.sizes(), "; got ", grad_out.sizes());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor &ln1 = saved[0], &mean1 = saved[1], &rstd1 = saved[2], &qkv = saved[3],
                   &probs = saved[4], &att = saved[5], &x1 = saved[6], &ln2 = saved[7],
                   &mean2 = saved[8], &rstd2 = saved[9], &gelu_grad = saved[10],
                   &g = saved[11], &seed = saved[12];
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), N = B * T;
  const int64_t H = n_head, D = C / H;
  const at::Tensor expected_probs = causal_attention_saved_like(heads(qkv, B, T, H, D, 0));
  TORCH_CHECK_VALUE(qkv.sizes() == at::IntArrayRef({N, 3 * C}) &&
                        probs.sizes() == expected_probs.sizes() &&
                        probs.scalar_type() == expected_probs.scalar_type() &&
                        probs.is_contiguous() && seed.numel() == 1 &&
                        seed.scalar_type() == at::kLong,
                    "fastgpt::transformer_block_backward: `saved` is not what "
                    "transformer_block_train returned for x of shape ", x.sizes());
  dropout::check_probability("fastgpt::transformer_block_backward", dropout_p);
  const BlockDropout drop_sites(uint64_t(seed.const_data_ptr<int64_t>()[0]), dropout_p);
  const BlockDropout* drop = dropout_p > 0 ? &drop_sites : nullptr;
  // a branch's gradient: the residual's, through the branch's dropout
  const auto through_dropout = [&](const at::Tensor& grad, int site) {
    return drop == nullptr ? grad : dropout::scale_kept(grad, drop->site[site]);
  };
  const at::Tensor dout = grad_out.reshape({N, C}).contiguous();

  // MLP: out = x1 + dropout(g @ Wp^T + bp), g = gelu(h), h = ln2 @ Wfc^T + bfc
  const at::Tensor dmlp = through_dropout(dout, 2);
  const at::Tensor d_mlp_proj_w = dmlp.t().mm(g);
  const at::Tensor dg = dmlp.mm(w.mlp_c_proj_weight);
  const at::Tensor dh = dg.scalar_type() == at::kFloat || dg.scalar_type() == at::kBFloat16
                            ? scale_by_derivative(dg, gelu_grad)
                            : at::mul(dg, gelu_grad).to(dg.scalar_type());
  const at::Tensor d_fc_w = dh.t().mm(ln2);
  auto [dx1, d_ln2_w, d_ln2_b] =
      layer_norm_backward(dh.mm(w.c_fc_weight), x1, mean2, rstd2, w.ln_2_weight, w.ln_2_bias);
  dropout::add_dropped_(dx1, dout, dropout::Params::none());  // the residual path

  // attention: x1 = x + dropout(att @ Wo^T + bo)
  const at::Tensor dproj = through_dropout(dx1, 1);
  const at::Tensor d_attn_proj_w = dproj.t().mm(att);
  const at::Tensor datt = dproj.mm(w.attn_c_proj_weight);  // (N, C)
  const at::Tensor dqkv_rows = at::empty({N, 3 * C}, x.options());
  causal_attention_backward(heads(datt, B, T, H, D, 0), heads(qkv, B, T, H, D, 0),
                            heads(qkv, B, T, H, D, 1), heads(qkv, B, T, H, D, 2), probs,
                            1.0 / std::sqrt(double(D)), heads(dqkv_rows, B, T, H, D, 0),
                            heads(dqkv_rows, B, T, H, D, 1), heads(dqkv_rows, B, T, H, D, 2),
                            drop ? &drop->site[0] : nullptr);
  const at::Tensor d_attn_w = dqkv_rows.t().mm(ln1);
  auto [dx, d_ln1_w, d_ln1_b] = layer_norm_backward(
      dqkv_rows.mm(w.c_attn_weight), x.contiguous().view({N, C}), mean1, rstd1, w.ln_1_weight,
      w.ln_1_bias);
  dropout::add_dropped_(dx, dx1, dropout::Params::none());

  // the gradients of x and of each weight that is present, in argument order
  std::vector<at::Tensor> grads{dx.view({B, T, C}), d_ln1_w};
  if (has(w.ln_1_bias)) grads.push_back(d_ln1_b);
  grads.push_back(d_attn_w);
  if (has(w.c_attn_bias)) grads.push_back(column_sums(dqkv_rows));
  grads.push_back(d_attn_proj_w);
  if (has(w.attn_c_proj_bias)) grads.push_back(column_sums(dproj));
  grads.push_back(d_ln2_w);
  if (has(w.ln_2_bias)) grads.push_back(d_ln2_b);
  grads.push_back(d_fc_w);
  if (has(w.c_fc_bias)) grads.push_back(column_sums(dh));
  grads.push_back(d_mlp_proj_w);
  if (has(w.mlp_c_proj_bias)) grads.push_back(column_sums(dmlp));
  return grads;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> transformer_block_dropout_masks(
    int64_t seed, int64_t B, int64_t T, int64_t C, int64_t n_head, double dropout_p) {
  TORCH_CHECK_VALUE(B >= 0 && T >= 0 && n_head >= 1 && C >= 0 && C % n_head == 0 &&
                        dropout_p >= 0.0 && dropout_p < 1.0,
                    "fastgpt::transformer_block_dropout_masks: expected B, T, C >= 0, n_head "
                    ">= 1 dividing C, dropout_p in [0, 1); got B=", B, " T=", T, " C=", C,
                    " n_head=", n_head, " dropout_p=", dropout_p);
  const auto mask = [&](int site, int64_t rows, int64_t cols) {
    return dropout::keep_mask(dropout::site_seed(uint64_t(seed), site), rows, cols, dropout_p);
  };
  return {mask(0, B * n_head * T, T).view({B, n_head, T, T}), mask(1, B * T, C).view({B, T, C}),
          mask(2, B * T, C).view({B, T, C})};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CompositeExplicitAutograd, m) {
  m.impl("transformer_block_dropout_masks", &transformer_block_dropout_masks);
}

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("transformer_block", &transformer_block_cpu);
  m.impl("transformer_block_train", &transformer_block_train_cpu);
  m.impl("transformer_block_backward", &transformer_block_backward_cpu);
}

}  // namespace fastgpt

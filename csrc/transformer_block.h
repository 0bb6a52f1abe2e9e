// The weights of one GPT block as the transformer_block ops take them, shared by the kernel
// and autograd files. Names follow nanoGPT's parameters (transformer.h.N.<name with dots>).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "checks.h"

namespace fastgpt {

struct BlockWeights {
  at::Tensor ln_1_weight;
  std::optional<at::Tensor> ln_1_bias;
  at::Tensor c_attn_weight;
  std::optional<at::Tensor> c_attn_bias;
  at::Tensor attn_c_proj_weight;
  std::optional<at::Tensor> attn_c_proj_bias;
  at::Tensor ln_2_weight;
  std::optional<at::Tensor> ln_2_bias;
  at::Tensor c_fc_weight;
  std::optional<at::Tensor> c_fc_bias;
  at::Tensor mlp_c_proj_weight;
  std::optional<at::Tensor> mlp_c_proj_bias;
};

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The ops' arguments after any leading ones (schema: FASTGPT_BLOCK_ARGS in library.cpp).
#define BLOCK_PARAMS                                                                          \
  const at::Tensor &x, const at::Tensor &ln_1_weight,                                         \
      const std::optional<at::Tensor>&ln_1_bias, const at::Tensor &c_attn_weight,             \
      const std::optional<at::Tensor>&c_attn_bias, const at::Tensor &attn_c_proj_weight,      \
      const std::optional<at::Tensor>&attn_c_proj_bias, const at::Tensor &ln_2_weight,        \
      const std::optional<at::Tensor>&ln_2_bias, const at::Tensor &c_fc_weight,               \
      const std::optional<at::Tensor>&c_fc_bias, const at::Tensor &mlp_c_proj_weight,         \
      const std::optional<at::Tensor>&mlp_c_proj_bias, int64_t n_head, double dropout_p
#define BLOCK_WEIGHTS                                                                         \
  BlockWeights {                                                                              \
    ln_1_weight, ln_1_bias, c_attn_weight, c_attn_bias, attn_c_proj_weight, attn_c_proj_bias, \
        ln_2_weight, ln_2_bias, c_fc_weight, c_fc_bias, mlp_c_proj_weight, mlp_c_proj_bias    \
  }
#define BLOCK_ARGS                                                                            \
  x, ln_1_weight, ln_1_bias, c_attn_weight, c_attn_bias, attn_c_proj_weight, attn_c_proj_bias, \
      ln_2_weight, ln_2_bias, c_fc_weight, c_fc_bias, mlp_c_proj_weight, mlp_c_proj_bias, n_head, \
      dropout_p

}  // namespace fastgpt

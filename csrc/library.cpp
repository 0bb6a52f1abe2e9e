// fastgpt._C: the schemas of every op the extension implements.
//
// embedding_forward(weight (V, C), indices (any shape), padding_idx) -> indices.shape + (C,)
//   out[..., :] = weight[indices[...], :]; padding_idx only matters for the gradient.
// embedding_backward(grad_out, indices, num_weights, padding_idx, deterministic) -> (V, C)
//   grad_weight[v] = sum of grad_out rows whose index is v (zero for padding_idx), summed in
//   fp32. deterministic=True sums each row in token order (bitwise reproducible); False lets
//   the CUDA kernel use atomics (CPU is always deterministic).
// padding_idx is -1 for "none", else a row in [0, V), as in aten::embedding.
// _embedding_forward_emulated / _embedding_backward_emulated: the same two ops computed by the
//   CUDA kernels' code run thread by thread on CPU tensors, for tests only
//   (csrc/embedding_cuda_emulated.cpp).
//
// transformer_block(x, <the block's weights>, n_head, dropout_p) -> (B, T, C)
//   One pre-LayerNorm GPT block (nanoGPT's Block): x1 = x + dropout(c_proj(attention(
//   c_attn(ln_1(x))))), out = x1 + dropout(mlp_c_proj(gelu(c_fc(ln_2(x1))))), the attention's
//   probabilities dropped out too; dropout_p = 0: none. The masks are hashes of one seed per
//   call drawn from torch's default CPU generator (csrc/dropout_cpu.h).
//   Weights use nn.Linear's (out, in) layout; a missing bias is None. Autograd calls
// transformer_block_train -> (out, saved activations, the last being the seed) and
// transformer_block_backward(grad_out, saved, x, <weights>, n_head, dropout_p) -> the
//   gradients of x and of every weight that is not None, in argument order.
// transformer_block_dropout_masks(seed, B, T, C, n_head, dropout_p) -> (attention (B, H, T, T),
//   after attention (B, T, C), after the MLP (B, T, C)): the keep masks (bool) of a block
//   call whose saved seed is `seed`, for tests.
//
// causal_attention(q, k, v (B, H, T, D), scale) -> (B, H, T, D)
//   softmax(scale * q k^T + causal mask) v; the result is laid out as (B, T, H, D) (a transposed
//   view), so that merging the heads back into (B, T, C) rows costs no copy. Autograd calls
// causal_attention_train -> (out, saved) and
// causal_attention_backward(grad_out, q, k, v, saved, scale) -> (dq, dk, dv), laid out like out.
//
// flat_adamw_step_(master, exp_avg, exp_avg_sq, working, steps, grads, offsets, group, lr,
//                  weight_decay, beta1, beta2, eps, max_norm) -> grad norm (0-d; NaN if no clip)
//   Clip the grads to max_norm (max_norm <= 0: no clipping), one AdamW step of the flat fp32
//   master weights and moments, and the new bf16 working copy (none if `working` is empty), in
//   place. Tensor i owns
//   [offsets[i], offsets[i+1]) of the flat buffers, grads[i] is its gradient (None: skipped) and
//   group[i] indexes the per-group lr, weight_decay, beta1, beta2, eps; steps holds each
//   tensor's step count (CPU only, csrc/adamw_cpu.cpp).
//
// The kernels live in embedding_cpu.cpp, embedding_cuda.cu (embedding_gpu.h), attention_cpu.cpp, adamw_cpu.cpp
// and transformer_block_cpu.cpp (TORCH_LIBRARY_IMPL); autograd in *_autograd.cpp; the fake (meta)
// kernels are registered from Python (fastgpt/ops/embedding_ext.py, attention_ext.py,
// transformer_block_ext.py).
// Python ops of the same namespace (fastgpt::attention_*) are added with torch.library
// fragments, which coexist with this one TORCH_LIBRARY block.

#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu_isa.h"

TORCH_LIBRARY(fastgpt, m) {
  m.def("embedding_forward(Tensor weight, Tensor indices, int padding_idx) -> Tensor");
  m.def("embedding_backward(Tensor grad_out, Tensor indices, SymInt num_weights, "
        "int padding_idx, bool deterministic) -> Tensor");
  m.def("_embedding_forward_emulated(Tensor weight, Tensor indices, int padding_idx) -> Tensor");
  m.def("_embedding_backward_emulated(Tensor grad_out, Tensor indices, SymInt num_weights, "
        "int padding_idx, bool deterministic) -> Tensor");
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("causal_attention_train(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor saved, "
        "float scale) -> (Tensor, Tensor, Tensor)");
#define FASTGPT_BLOCK_ARGS                                                              \
  "Tensor x, Tensor ln_1_weight, Tensor? ln_1_bias, Tensor c_attn_weight, "             \
  "Tensor? c_attn_bias, Tensor attn_c_proj_weight, Tensor? attn_c_proj_bias, "          \
  "Tensor ln_2_weight, Tensor? ln_2_bias, Tensor c_fc_weight, Tensor? c_fc_bias, "      \
  "Tensor mlp_c_proj_weight, Tensor? mlp_c_proj_bias, int n_head, float dropout_p=0.0"
  m.def("transformer_block(" FASTGPT_BLOCK_ARGS ") -> Tensor");
  m.def("transformer_block_train(" FASTGPT_BLOCK_ARGS ") -> (Tensor, Tensor[])");
  m.def("transformer_block_backward(Tensor grad_out, Tensor[] saved, " FASTGPT_BLOCK_ARGS
        ") -> Tensor[]");
  m.def("transformer_block_dropout_masks(int seed, int B, int T, int C, int n_head, "
        "float dropout_p) -> (Tensor, Tensor, Tensor)");
#undef FASTGPT_BLOCK_ARGS
  m.def("flat_adamw_step_(Tensor(a!) master, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
        "Tensor(d!) working, Tensor(e!) steps, Tensor?[] grads, int[] offsets, int[] group, "
        "float[] lr, float[] weight_decay, float[] beta1, float[] beta2, float[] eps, "
        "float max_norm) -> Tensor");
  // the instruction set the CPU kernels use now: avx512, avx2 or baseline (csrc/cpu_isa.h)
  m.def("cpu_isa() -> str", [] { return std::string(fastgpt::isa_name(fastgpt::cpu_isa())); });
}

// `import fastgpt._C` loads this library, which runs the registrations above; the module
// itself is empty: the ops are reached through torch.ops.fastgpt.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

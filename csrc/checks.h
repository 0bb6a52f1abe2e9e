// Input checks shared by the CPU and CUDA embedding kernels.
//
// Every message says which op complained, what it got and what is allowed. Shape and dtype
// problems raise ValueError in Python (TORCH_CHECK_VALUE), an index outside the table raises
// IndexError (TORCH_CHECK_INDEX), as nn.Embedding does.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define CHECK_DEVICE(x, dev)                                                                  \
  TORCH_CHECK_VALUE((x).device() == (dev), OP_NAME ": " #x " must be on ", (dev),            \
                    " like the other inputs; got ", (x).device())

#define CHECK_DIM(x, d)                                                                       \
  TORCH_CHECK_VALUE((x).dim() == (d), OP_NAME ": " #x " must be ", (d), "-D; got shape ",    \
                    (x).sizes())

#define CHECK_FLOAT_DTYPE(x)                                                                  \
  TORCH_CHECK_VALUE((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||     \
                        (x).scalar_type() == at::kBFloat16,                                   \
                    OP_NAME ": " #x " must be float32, float16 or bfloat16; got ",           \
                    (x).scalar_type())

#define CHECK_INDEX_DTYPE(x)                                                                  \
  TORCH_CHECK_VALUE((x).scalar_type() == at::kLong || (x).scalar_type() == at::kInt,         \
                    OP_NAME ": " #x " must be int64 or int32; got ", (x).scalar_type())

// padding_idx follows aten::embedding: -1 means "no padding row", otherwise 0 <= p < V
// (fastgpt.ops.embedding turns nn.Embedding's negative padding_idx into V + p first).
#define CHECK_PADDING_IDX(p, num_weights)                                                     \
  TORCH_CHECK_VALUE((p) == -1 || ((p) >= 0 && (p) < (num_weights)),                          \
                    OP_NAME ": padding_idx must be -1 (none) or in [0, ", (num_weights),     \
                    "); got ", (p))

// (OP_NAME is a separate argument here, so it may also be a runtime string)
#define CHECK_INDEX_VALUE(k, num_weights)                                                     \
  TORCH_CHECK_INDEX((k) >= 0 && (k) < (num_weights), OP_NAME, ": index ", (k),               \
                    " is out of range for an embedding table of ", (num_weights),             \
                    " rows (allowed: 0 <= index < ", (num_weights), ")")

namespace fastgpt {

// The checks both forward kernels run before touching data.
#define OP_NAME "fastgpt::embedding_forward"
inline void check_forward_inputs(const at::Tensor& weight, const at::Tensor& indices,
                                 int64_t padding_idx) {
  CHECK_DIM(weight, 2);
  CHECK_FLOAT_DTYPE(weight);
  CHECK_INDEX_DTYPE(indices);
  CHECK_DEVICE(indices, weight.device());
  CHECK_PADDING_IDX(padding_idx, weight.size(0));
}
#undef OP_NAME

// ... and the backward kernels: grad_out has shape indices.shape + (C,).
#define OP_NAME "fastgpt::embedding_backward"
inline void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& indices,
                                  int64_t num_weights, int64_t padding_idx) {
  CHECK_FLOAT_DTYPE(grad_out);
  CHECK_INDEX_DTYPE(indices);
  CHECK_DEVICE(indices, grad_out.device());
  TORCH_CHECK_VALUE(num_weights >= 0, OP_NAME ": num_weights must be >= 0; got ", num_weights);
  TORCH_CHECK_VALUE(grad_out.dim() == indices.dim() + 1 &&
                        grad_out.sizes().slice(0, indices.dim()) == indices.sizes(),
                    OP_NAME ": grad_out must have shape indices.shape + (dim,); got grad_out ",
                    grad_out.sizes(), " for indices ", indices.sizes());
  CHECK_PADDING_IDX(padding_idx, num_weights);
}
#undef OP_NAME

}  // namespace fastgpt

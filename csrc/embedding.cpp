// fastgpt._C: the schemas of fastgpt's embedding ops.
//
// embedding_forward(weight (V, C), indices (any shape), padding_idx) -> indices.shape + (C,)
//   out[..., :] = weight[indices[...], :]; padding_idx only matters for the gradient.
// embedding_backward(grad_out, indices, num_weights, padding_idx, deterministic) -> (V, C)
//   grad_weight[v] = sum of grad_out rows whose index is v (zero for padding_idx), summed in
//   fp32. deterministic=True sums each row in token order (bitwise reproducible); False lets
//   the CUDA kernel use atomics (CPU is always deterministic).
// padding_idx is -1 for "none", else a row in [0, V), as in aten::embedding.
//
// The kernels live in embedding_cpu.cpp and embedding_cuda.cu (TORCH_LIBRARY_IMPL); the
// fake (meta) kernels and autograd are registered from Python (fastgpt/ops/embedding_ext.py).
// Python ops of the same namespace (fastgpt::attention_*) are added with torch.library
// fragments, which coexist with this one TORCH_LIBRARY block.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastgpt, m) {
  m.def("embedding_forward(Tensor weight, Tensor indices, int padding_idx) -> Tensor");
  m.def("embedding_backward(Tensor grad_out, Tensor indices, SymInt num_weights, "
        "int padding_idx, bool deterministic) -> Tensor");
}

// `import fastgpt._C` loads this library, which runs the registrations above; the module
// itself is empty: the ops are reached through torch.ops.fastgpt.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

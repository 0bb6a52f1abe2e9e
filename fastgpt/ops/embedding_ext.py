"""The ``ext`` embedding backend: fastgpt._C's C++/CUDA kernels as torch custom ops.

The ops ``fastgpt::embedding_forward`` and ``fastgpt::embedding_backward`` are declared and
implemented in csrc/ (one TORCH_LIBRARY block, CPU and CUDA kernels). This module adds what
PyTorch needs around them: fake (meta) kernels so torch.compile can trace them. Autograd of
the forward is registered in C++ (csrc/embedding_autograd.cpp): the Python
``register_autograd`` wrapper cost ~30 us per call, more than the whole lookup at small sizes;
the deterministic=False variant below is a Python autograd.Function (eager only). The extension
is loaded by fastgpt.ops.extension on the first availability check.

padding_idx: None or a row in [0, V) here (fastgpt.ops.embedding normalises nn.Embedding's
negative values); the ops take -1 for "none", like aten::embedding.
Backward: deterministic by default (bitwise reproducible, fp32 accumulation); pass
``deterministic=False`` to let the CUDA kernel use fp32 atomics instead (CPU ignores it).
Memory: on CPU the backward's only tensor allocation is its (V, C) result; fp32 gradients are
summed in it directly, fp16/bf16 ones in small per-thread fp32 scratch.
Bounds: every index is checked on CPU and on CUDA; on CUDA the indices' min and max are read
back before any kernel uses them (an IndexError instead of a device-side assert), which costs
one device-to-host sync per call (so these ops cannot be captured in a CUDA graph).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastgpt.ops import registry
from fastgpt.ops.extension import available, has_kernel, on_load

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(indices: torch.Tensor, weight: torch.Tensor, padding_idx=None) -> Optional[str]:
    dev = weight.device.type
    if dev not in ("cpu", "cuda"):
        return f"fastgpt._C has kernels for cpu and cuda only; got {dev}"
    if dev == "cuda" and not has_kernel("fastgpt::embedding_forward", "CUDA"):
        return "fastgpt._C was built without CUDA (torch had no CUDA or nvcc was not found)"
    if weight.dtype not in _DTYPES:
        return f"weight dtype {weight.dtype} is not float32, float16 or bfloat16"
    if indices.device != weight.device:
        return f"indices on {indices.device} but weight on {weight.device}"
    return None


def embedding_ext(indices: torch.Tensor, weight: torch.Tensor, padding_idx: Optional[int] = None,
                  deterministic: bool = True) -> torch.Tensor:
    """``weight[indices]`` through fastgpt._C; output shape indices.shape + (C,)."""
    reason = available()
    if reason is not None:
        raise RuntimeError(reason)
    pad = -1 if padding_idx is None else padding_idx
    if deterministic:
        return _forward(weight, indices, pad)
    return _NonDeterministic.apply(weight, indices, pad)


class _NonDeterministic(torch.autograd.Function):
    """The forward op with the atomics backward (deterministic=False); eager use only."""

    @staticmethod
    def forward(weight, indices, padding_idx):
        return torch.ops.fastgpt.embedding_forward(weight, indices, padding_idx)

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, indices, padding_idx = inputs
        ctx.save_for_backward(indices)
        ctx.num_weights, ctx.padding_idx = weight.shape[0], padding_idx

    @staticmethod
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        grad_weight = torch.ops.fastgpt.embedding_backward(
            grad_out, indices, ctx.num_weights, ctx.padding_idx, False)
        return grad_weight, None, None


_forward = None  # the OpOverload (not the packet: no overload resolution per call), once loaded


@on_load
def _register_fake() -> None:
    global _forward
    _forward = torch.ops.fastgpt.embedding_forward.default

    @torch.library.register_fake("fastgpt::embedding_forward")
    def _forward_fake(weight, indices, padding_idx):
        return weight.new_empty((*indices.shape, weight.shape[1]))

    @torch.library.register_fake("fastgpt::embedding_backward")
    def _backward_fake(grad_out, indices, num_weights, padding_idx, deterministic):
        return grad_out.new_empty((num_weights, grad_out.shape[-1]))


registry.register("embedding", "ext", embedding_ext, supports=supports, available=available)
registry.set_default_order("embedding", "cpu", ["ext", "torch"])
registry.set_default_order("embedding", "cuda", ["ext", "torch"])

"""The ``ext`` attention backend: fastgpt._C's fused causal attention for the CPU.

The ops ``fastgpt::causal_attention`` (autograd registered in C++, csrc/attention_autograd.cpp),
``causal_attention_train`` and ``causal_attention_backward`` are declared in csrc/library.cpp
and implemented in csrc/attention_cpu.cpp: one pass per head in fp32 registers, only the causal
half of the scores computed, q/k/v read through their strides. This module adds their fake
kernels, so torch.compile can trace them, and registers the backend.

Output and gradients are (B, H, T, D) views of (B, T, H, D) tensors: merging the heads back
into (B, T, C) rows, as the model does next, is then free. Float32 and bfloat16 with D <= 128
use the fused kernel; float16, float64 and larger D run as batched matmuls in C++ (the same math
as the ``torch`` backend). No dropout: dropout > 0 goes to another backend.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastgpt.ops import registry
from fastgpt.ops.extension import available, on_load

_FUSED_DTYPES = (torch.float32, torch.bfloat16)
_FUSED_MAX_D = 128


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale=None,
             dropout_p: float = 0.0) -> Optional[str]:
    if q.device.type != "cpu":
        return f"fastgpt._C has a CPU causal_attention only; got {q.device.type}"
    if dropout_p > 0:
        return f"no dropout in the C++ attention (dropout_p={dropout_p})"
    return None


def attention_ext(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:
    reason = available()
    if reason is not None:
        raise RuntimeError(reason)
    if dropout_p > 0:
        raise ValueError(f"the ext attention has no dropout; got dropout_p={dropout_p}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.dtype == torch.float16:
        # CPUs have no fp16 arithmetic to speak of: the fp32 kernel on the widened inputs, the
        # output and gradients rounded once (the batched-matmul path rounded at every step)
        return attention_ext(q.float(), k.float(), v.float(), scale=scale).to(q.dtype)
    # the OpOverload, not the packet: skips overload resolution per call
    return torch.ops.fastgpt.causal_attention.default(q, k, v, scale)


def saved_fake(like: torch.Tensor, B: int, H: int, T: int, D: int) -> torch.Tensor:
    """A fake of what causal_attention_train saves for (B, H, T, D) inputs of like's dtype."""
    if like.dtype in _FUSED_DTYPES and D <= _FUSED_MAX_D:   # fp32 probabilities, rows of 16s
        return like.new_empty((B * H, T, (T + 15) // 16 * 16), dtype=torch.float32)
    return like.new_empty((B * H, T, T))


def _like_heads(q: torch.Tensor) -> torch.Tensor:
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2)


@on_load
def _register_fake() -> None:
    @torch.library.register_fake("fastgpt::causal_attention")
    def _fake(q, k, v, scale):
        return _like_heads(q)

    @torch.library.register_fake("fastgpt::causal_attention_train")
    def _train_fake(q, k, v, scale):
        return _like_heads(q), saved_fake(q, *q.shape)

    @torch.library.register_fake("fastgpt::causal_attention_backward")
    def _backward_fake(grad_out, q, k, v, saved, scale):
        return _like_heads(q), _like_heads(q), _like_heads(q)


registry.register("attention", "ext", attention_ext, supports=supports, available=available)

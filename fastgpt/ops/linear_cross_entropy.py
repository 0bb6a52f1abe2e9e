"""Linear layer followed by cross-entropy: loss(hidden @ weight.T + bias, targets).

The ``torch`` backend is the naive one: it materialises the (N, V) logits. Backends that never
hold all the logits at once register themselves from their own modules.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastgpt.errors import FastGPTError
from fastgpt.ops import registry
from fastgpt.ops.cross_entropy import REDUCTIONS, cross_entropy_torch


def linear_cross_entropy_torch(hidden, weight, targets, *, bias=None, ignore_index=-100,
                               reduction="mean"):
    logits = F.linear(hidden, weight, bias)   # (N, V)
    return cross_entropy_torch(logits, targets, ignore_index=ignore_index, reduction=reduction)


registry.register("linear_cross_entropy", "torch", linear_cross_entropy_torch)
registry.set_default_order("linear_cross_entropy", "default", ["torch"])


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean", backend: Optional[str] = None,
                         preferred: Optional[str] = None) -> torch.Tensor:
    """Cross-entropy of ``hidden`` (N, C) projected by ``weight`` (V, C) against ``targets`` (N,)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise FastGPTError(f"linear_cross_entropy expects hidden (N, C) and weight (V, C); got "
                           f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise FastGPTError(f"targets must have shape ({hidden.shape[0]},); got {tuple(targets.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise FastGPTError(f"bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
    if reduction not in REDUCTIONS:
        raise FastGPTError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    kwargs = {"bias": bias, "ignore_index": ignore_index, "reduction": reduction}
    chosen = registry.choose("linear_cross_entropy", hidden.device.type, (hidden, weight, targets),
                             kwargs, backend=backend, preferred=preferred)
    return chosen.fn(hidden, weight, targets.long(), **kwargs)

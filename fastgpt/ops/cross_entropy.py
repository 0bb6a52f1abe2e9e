"""Cross-entropy over logits (N, V) and targets (N,): the plain PyTorch reference and dispatch.

Reductions: "mean" over non-ignored targets, "sum", "none" (per row, 0 where ignored).
A batch whose targets are all ignored gives loss 0 (not NaN) under "mean".
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastgpt.errors import FastGPTError
from fastgpt.ops import registry

REDUCTIONS = ("mean", "sum", "none")


def cross_entropy_torch(logits, targets, *, ignore_index=-100, reduction="mean"):
    per_row = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    # mean over counted rows; dividing by a tensor keeps this free of host synchronisation
    count = (targets != ignore_index).sum().clamp_min(1).to(total.dtype)
    return total / count


registry.register("cross_entropy", "torch", cross_entropy_torch)
registry.set_default_order("cross_entropy", "default", ["torch"])


def check_ce_args(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> None:
    if logits.dim() != 2:
        raise FastGPTError(f"cross_entropy expects logits of shape (N, V); got {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise FastGPTError(f"cross_entropy expects targets of shape ({logits.shape[0]},); got "
                           f"{tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise FastGPTError(f"targets must be int64 or int32; got {targets.dtype}")
    if reduction not in REDUCTIONS:
        raise FastGPTError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", backend: Optional[str] = None,
                  preferred: Optional[str] = None) -> torch.Tensor:
    """Softmax cross-entropy of ``logits`` (N, V) against integer ``targets`` (N,)."""
    check_ce_args(logits, targets, reduction)
    kwargs = {"ignore_index": ignore_index, "reduction": reduction}
    chosen = registry.choose("cross_entropy", logits.device.type, (logits, targets), kwargs,
                             backend=backend, preferred=preferred)
    return chosen.fn(logits, targets.long(), **kwargs)

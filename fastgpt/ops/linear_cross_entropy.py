"""Linear layer followed by cross-entropy: loss(hidden @ weight.T + bias, targets).

The ``torch`` backend is the naive one (and, in float64, the reference): it materialises the
(N, V) logits. Backends that never hold all the logits at once (``chunked``, ``compile``,
``triton``) live in fastgpt/ops/linear_cross_entropy_chunked.py. Options and return value are
those of fastgpt.ops.cross_entropy.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastgpt.errors import FastGPTError
from fastgpt.ops import measured, registry
from fastgpt.ops.cross_entropy import check_options, check_targets, cross_entropy_torch


def linear_cross_entropy_torch(hidden, weight, targets, *, bias=None, ignore_index=-100,
                               reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                               return_z_loss=False):
    logits = F.linear(hidden, weight, bias)   # (N, V)
    return cross_entropy_torch(logits, targets, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                               return_z_loss=return_z_loss)


# not a candidate of measured dispatch: holding all (N, V) logits is what the others avoid
registry.register("linear_cross_entropy", "torch", linear_cross_entropy_torch, measured=False)
registry.set_default_order("linear_cross_entropy", "cpu", ["chunked", "torch"])
registry.set_default_order("linear_cross_entropy", "cuda", ["triton", "chunked", "torch"])
registry.set_default_order("linear_cross_entropy", "default", ["chunked", "torch"])


def _workload_key(hidden, weight, targets, *, bias=None, **options):
    (N, C), V = hidden.shape, weight.shape[0]
    return (("N", measured.bucket(N)), ("C", C), ("V", V), ("bias", bias is not None),
            *sorted(options.items()))


def _workload_inputs(key: dict, make: measured.InputMaker):
    N, C, V = key.pop("N"), key.pop("C"), key.pop("V")
    bias = make.floats((V,), 0.02) if key.pop("bias") else None
    return (make.floats((N, C)), make.floats((V, C), 0.02), make.ints((N,), V)), {"bias": bias, **key}


registry.set_workload("linear_cross_entropy", measured.Workload(_workload_key, _workload_inputs))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, softcap: Optional[float] = None,
                         return_z_loss: bool = False, backend: Optional[str] = None,
                         preferred: Optional[str] = None):
    """Cross-entropy of ``hidden`` (N, C) projected by ``weight`` (V, C) against ``targets`` (N,).

    Returns the loss, or ``(loss, z_loss_part)`` with ``return_z_loss=True``, in fp32 (float64
    for float64 inputs) whatever the inputs' dtype.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise FastGPTError(f"linear_cross_entropy expects hidden (N, C) and weight (V, C); got "
                           f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if not hidden.is_floating_point():
        raise FastGPTError(f"linear_cross_entropy expects floating-point hidden; got {hidden.dtype}")
    if targets.shape != hidden.shape[:1]:
        raise FastGPTError(f"targets must have shape ({hidden.shape[0]},); got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise FastGPTError(f"targets must be int64 or int32; got {targets.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise FastGPTError(f"bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
    check_options(reduction, label_smoothing, z_loss, softcap)
    check_targets(targets, weight.shape[0], ignore_index)
    kwargs = {"bias": bias, "ignore_index": ignore_index, "reduction": reduction,
              "label_smoothing": float(label_smoothing), "z_loss": float(z_loss),
              "softcap": None if softcap is None else float(softcap),
              "return_z_loss": return_z_loss}
    chosen = registry.choose("linear_cross_entropy", hidden.device.type, (hidden, weight, targets),
                             kwargs, backend=backend, preferred=preferred)
    return chosen(hidden, weight, targets.long(), **kwargs)

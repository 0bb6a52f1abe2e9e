"""Cross-entropy over logits (N, V) and targets (N,): the plain PyTorch reference and dispatch.

Per row, with z = logits or z = softcap * tanh(logits / softcap) and lse = logsumexp(z):

    loss = (1 - eps) * (lse - z[target]) + eps * (lse - mean(z)) + z_loss * lse**2

(eps = label_smoothing; the same formula as F.cross_entropy's label smoothing; z-loss as in
PaLM). Rows whose target is ``ignore_index`` count 0. Reductions: "mean" over non-ignored rows,
"sum", "none" (per row). A batch whose targets are all ignored gives loss 0 and zero gradients.
The mean divides by a device tensor, so nothing here synchronises with the host.

Each piece of that math is written once, below (``apply_softcap``/``softcap_grad``,
``row_losses``, ``add_z_loss``, ``softmax_coef``, ``smoothed_target``, ``reduce_rows``), and every
PyTorch-side backend (here, cross_entropy_triton.py, linear_cross_entropy_chunked.py) forms its
losses and gradients with them; the Triton kernels (fastgpt/kernels/cross_entropy.py) are the one
other spelling. Helpers that the chunked path runs over a chunk-sized buffer take ``inplace``.

With ``return_z_loss=True`` the result is ``(loss, z_loss_part)``: the z-loss term, reduced
like the loss and already included in it, returned detached for logging (Liger's convention).

Precision: fp16/bf16 logits are computed in fp32 (softcap, log-sum-exp, smoothing, z-loss) and
their gradient is rounded once to the logits' dtype; losses come back in fp32 (float64 for
float64 logits), from every backend and reduction, as Liger-Kernel's and ml-cross-entropy's do.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastgpt.errors import FastGPTError
from fastgpt.ops import measured, registry

REDUCTIONS = ("mean", "sum", "none")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the losses compute and come back in: float64 for float64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_softcap(x: torch.Tensor, softcap: float, *, inplace: bool = False,
                  keep_tanh: bool = True):
    """(softcap * tanh(x / softcap), that tanh for softcap_grad, or None without keep_tanh).

    ``inplace`` reuses x's buffer for the tanh, and for the capped logits too when the tanh is
    not kept: one buffer where the caller needs no gradient, two where it does.
    """
    th = x.div_(softcap).tanh_() if inplace else torch.tanh(x / softcap)
    if keep_tanh:
        return th * softcap, th
    return (th.mul_(softcap) if inplace else th * softcap), None


def softcap_grad(th: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """d(softcap * tanh(x / softcap))/dx = 1 - tanh**2, from apply_softcap's tanh ``th``."""
    return th.square_().neg_().add_(1.0) if inplace else 1.0 - th * th


def row_losses(z_t: torch.Tensor, z_mean: Optional[torch.Tensor], label_smoothing: float, *,
               lse: Optional[torch.Tensor] = None, m: Optional[torch.Tensor] = None,
               log_s: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row loss without z-loss: (1 - eps) * (lse - z_t) + eps * (lse - z_mean), where z_t is
    the target's (capped) logit, z_mean the row mean (unused when eps = label_smoothing is 0).

    lse comes whole, or as the row max ``m`` and ``log_s`` = log(sum(exp(z - m))): then each
    lse - v is formed as (m - v) + log_s, which keeps the digits m + log_s loses at |z| ~ 1e4.
    """
    def lse_minus(v):
        return lse - v if log_s is None else (m - v) + log_s
    rows = lse_minus(z_t)
    if label_smoothing:
        rows = (1.0 - label_smoothing) * rows + label_smoothing * lse_minus(z_mean)
    return rows


def add_z_loss(rows: torch.Tensor, lse: torch.Tensor, valid: torch.Tensor, z_loss: float):
    """(rows + z-loss rows, z-loss rows): PaLM's z_loss * lse**2 per row, 0 where ignored."""
    z_rows = torch.where(valid, z_loss * lse.square(), 0.0)
    return rows + z_rows, z_rows


def softmax_coef(coef: torch.Tensor, lse: Optional[torch.Tensor], z_loss: float) -> torch.Tensor:
    """a in d(sum_i coef_i * loss_i)/dz = a * softmax(z) - coef * smoothed_target, per row:
    z-loss adds coef * d(z_loss * lse**2)/dlse = coef * 2 * z_loss * lse (lse unused without it)."""
    return coef * (1.0 + 2.0 * z_loss * lse) if z_loss else coef


def smoothed_target(label_smoothing: float, V: int) -> tuple[float, float]:
    """The label-smoothed one-hot target as (weight on the target, weight on every column):
    (1 - eps) * one_hot + eps / V, so its row sums to 1."""
    return 1.0 - label_smoothing, label_smoothing / V


def reduce_rows(rows: torch.Tensor, z_rows: Optional[torch.Tensor], valid: torch.Tensor,
                reduction: str, return_z_loss: bool):
    """Apply ``reduction`` to per-row losses (z-loss included in ``rows``) and package the
    result, in the rows' dtype (fp32 or float64)."""
    if reduction == "none":
        loss, z = rows, z_rows
    elif reduction == "sum":
        loss, z = rows.sum(), (None if z_rows is None else z_rows.sum())
    else:
        # dividing by a device tensor keeps the mean free of host synchronisation
        count = valid.sum().clamp_min(1).to(rows.dtype)
        loss, z = rows.sum() / count, (None if z_rows is None else z_rows.sum() / count)
    if not return_z_loss:
        return loss
    z = torch.zeros_like(loss) if z is None else z
    return loss, z.detach()


def cross_entropy_torch(logits, targets, *, ignore_index=-100, reduction="mean",
                        label_smoothing=0.0, z_loss=0.0, softcap=None, return_z_loss=False):
    # fp16/bf16 in fp32 (as the kernels do): autograd rounds the gradient once, on the way back
    x = logits.to(acc_dtype(logits.dtype))
    valid = targets != ignore_index
    if not (z_loss or softcap or return_z_loss):
        # F.cross_entropy already does smoothing and ignore_index in one fused call
        rows = F.cross_entropy(x, targets, ignore_index=ignore_index, reduction="none",
                               label_smoothing=label_smoothing)
        return reduce_rows(rows, None, valid, reduction, False)
    z = x if softcap is None else apply_softcap(x, softcap)[0]
    lse = torch.logsumexp(z, dim=-1)                                       # (N,)
    z_t = z.gather(1, targets.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
    z_mean = z.mean(dim=-1) if label_smoothing else None
    rows = row_losses(z_t, z_mean, label_smoothing, lse=lse)
    z_rows = None
    if z_loss or return_z_loss:
        rows, z_rows = add_z_loss(rows, lse, valid, z_loss)
    rows = torch.where(valid, rows, 0.0)
    return reduce_rows(rows, z_rows, valid, reduction, return_z_loss)


registry.register("cross_entropy", "torch", cross_entropy_torch)
registry.register("cross_entropy", "compile", registry.compile_backend(cross_entropy_torch),
                  measured=False)
registry.set_default_order("cross_entropy", "cpu", ["torch"])
registry.set_default_order("cross_entropy", "cuda", ["triton", "torch"])
registry.set_default_order("cross_entropy", "default", ["torch"])


def _workload_key(logits, targets, **options):
    N, V = logits.shape
    return (("N", measured.bucket(N)), ("V", V), *sorted(options.items()))


def _workload_inputs(key: dict, make: measured.InputMaker):
    N, V = key.pop("N"), key.pop("V")
    return (make.floats((N, V)), make.ints((N,), V)), key


registry.set_workload("cross_entropy", measured.Workload(_workload_key, _workload_inputs))


def check_targets(targets: torch.Tensor, V: int, ignore_index: int) -> None:
    """Targets must be ``ignore_index`` or in [0, V).

    On CPU (eager) a bad target raises FastGPTError at once. On GPUs and under torch.compile
    the check is ``torch._assert_async``: it fails on the device without stalling the host (the
    Triton kernels also write NaN for such rows, so a bad target can never pass unnoticed).
    """
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if targets.device.type == "cpu" and not torch.compiler.is_compiling():
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise FastGPTError(f"target {int(targets[i])} at position {i} is out of range: targets "
                               f"must be in [0, {V}) or equal ignore_index ({ignore_index})")
        return
    torch._assert_async(~bad.any(), f"fastgpt: a target is outside [0, {V}) and is not "
                                    f"ignore_index ({ignore_index})")


def check_options(reduction: str, label_smoothing: float, z_loss: float,
                  softcap: Optional[float]) -> None:
    if reduction not in REDUCTIONS:
        raise FastGPTError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise FastGPTError(f"label_smoothing must be in [0, 1]; got {label_smoothing}")
    if z_loss < 0.0:
        raise FastGPTError(f"z_loss must be >= 0; got {z_loss}")
    if softcap is not None and not softcap > 0.0:
        raise FastGPTError(f"softcap must be None or > 0; got {softcap}")


def check_ce_args(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> None:
    if logits.dim() != 2:
        raise FastGPTError(f"cross_entropy expects logits of shape (N, V); got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise FastGPTError(f"cross_entropy expects floating-point logits; got {logits.dtype}")
    if targets.shape != logits.shape[:1]:
        raise FastGPTError(f"cross_entropy expects targets of shape ({logits.shape[0]},); got "
                           f"{tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise FastGPTError(f"targets must be int64 or int32; got {targets.dtype}")
    if reduction not in REDUCTIONS:
        raise FastGPTError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: Optional[float] = None, return_z_loss: bool = False,
                  backend: Optional[str] = None, preferred: Optional[str] = None):
    """Softmax cross-entropy of ``logits`` (N, V) against integer ``targets`` (N,).

    Returns the loss, or ``(loss, z_loss_part)`` with ``return_z_loss=True`` (see module doc),
    in fp32 (float64 for float64 logits).
    """
    check_ce_args(logits, targets, reduction)
    check_options(reduction, label_smoothing, z_loss, softcap)
    check_targets(targets, logits.shape[1], ignore_index)
    kwargs = {"ignore_index": ignore_index, "reduction": reduction,
              "label_smoothing": float(label_smoothing), "z_loss": float(z_loss),
              "softcap": None if softcap is None else float(softcap),
              "return_z_loss": return_z_loss}
    chosen = registry.choose("cross_entropy", logits.device.type, (logits, targets), kwargs,
                             backend=backend, preferred=preferred)
    return chosen(logits, targets.long(), **kwargs)

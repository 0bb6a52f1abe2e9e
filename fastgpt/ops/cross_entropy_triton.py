"""The ``triton`` backend of cross_entropy: fastgpt::cross_entropy_fwd/bwd as torch.library triton_ops.

``cross_entropy_fwd(logits, targets, ...) -> (rows, lse, row_max, row_sum)`` gives per-row losses
without z-loss (0 where ignored), per-row log-sum-exp, and the row's largest (capped) logit m and
sum of exp(z - m), from which the backward kernel forms the softmax. ``rows`` and ``lse`` are
differentiable: z-loss, reductions and ignore masks are O(N) PyTorch on top, and whatever flows
into ``lse`` (z-loss) becomes the softmax coefficient of the backward kernel. Kernels:
fastgpt/kernels/cross_entropy.py.

The launchers (``launch_fwd``/``launch_bwd``) are shared with the fused linear+cross-entropy,
which runs them on chunks of logits it owns and overwrites each chunk with its gradient.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.library import wrap_triton

from fastgpt.ops import registry
from fastgpt.ops._triton import define_op, interpreting, kernels, store_dtype, triton_missing
from fastgpt.ops.cross_entropy import acc_dtype, add_z_loss, reduce_rows

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    """fastgpt.kernels.cross_entropy, imported on first use, not with fastgpt.ops: importing
    triton takes ~0.2 s, which a CPU training run (whose loss is the ``chunked`` one) never needs."""
    return kernels("cross_entropy")


@registry.constant_under_compile
def triton_unavailable() -> Optional[str]:
    """None when triton is installed (and then the ops are defined), else why not."""
    reason = triton_missing()
    if reason is None:
        _define_ops()
    return reason


def triton_device_reason(t: torch.Tensor) -> Optional[str]:
    """None when Triton can run on ``t``'s device: CUDA, or CPU under TRITON_INTERPRET=1."""
    if t.device.type == "cuda":
        return None
    if t.device.type == "cpu" and interpreting():
        return None
    return f"needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU); got device {t.device.type}"


def _launch_args(V: int, label_smoothing: float, softcap: float):
    block = _kernels().block_v(V)
    return dict(HAS_SOFTCAP=softcap > 0.0, HAS_SMOOTHING=label_smoothing > 0.0, BLOCK_V=block,
                num_warps=_kernels().num_warps_for(block))


def launch_fwd(logits, targets, ignore_index: int, label_smoothing: float, softcap: float):
    """(rows, lse, row_max, row_sum), each (N,) in fp32 (float64 for float64 logits)."""
    N, V = logits.shape
    rows = torch.empty(N, dtype=acc_dtype(logits.dtype), device=logits.device)
    lse, row_max, row_sum = (torch.empty_like(rows) for _ in range(3))
    if N:
        wrap_triton(_kernels().cross_entropy_fwd_kernel)[(N,)](
            logits, logits.stride(0), logits.stride(1), targets, rows, lse, row_max, row_sum,
            V, ignore_index, label_smoothing, softcap,
            **_launch_args(V, label_smoothing, softcap))
    return rows, lse, row_max, row_sum


def launch_bwd(logits, targets, row_max, row_sum, a, b, label_smoothing: float, softcap: float,
               out):
    """Write the gradient into ``out`` (which may be ``logits`` itself)."""
    N, V = logits.shape
    if N:
        store = store_dtype(out.dtype)
        dst = out if store == out.dtype else out.new_empty(out.shape, dtype=store)
        wrap_triton(_kernels().cross_entropy_bwd_kernel)[(N,)](
            logits, logits.stride(0), logits.stride(1), targets, row_max, row_sum, a, b,
            dst, dst.stride(0), dst.stride(1), V, label_smoothing, softcap,
            **_launch_args(V, label_smoothing, softcap))
        if dst is not out:
            out.copy_(dst)
    return out


@functools.cache
def _define_ops() -> None:
    """Defined on first use (see fastgpt.ops._triton.define_op)."""
    def _fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
             label_smoothing: float, softcap: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-row loss without z-loss, 0 where ignored; per-row logsumexp; row max m; row sum
        of exp(z - m)). softcap 0 = off."""
        return launch_fwd(logits, targets, ignore_index, label_smoothing, softcap)

    def _fwd_fake(logits, targets, ignore_index, label_smoothing, softcap):
        rows = logits.new_empty(logits.shape[:1], dtype=acc_dtype(logits.dtype))
        return rows, torch.empty_like(rows), torch.empty_like(rows), torch.empty_like(rows)

    def _bwd(logits: torch.Tensor, targets: torch.Tensor, row_max: torch.Tensor,
             row_sum: torch.Tensor, a: torch.Tensor, b: torch.Tensor, label_smoothing: float,
             softcap: float) -> torch.Tensor:
        """dlogits = (a * softmax - b * smoothed one-hot) * dsoftcap, row-wise coefficients a, b."""
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        return launch_bwd(logits, targets, row_max, row_sum, a, b, label_smoothing, softcap, out)

    def _bwd_fake(logits, targets, row_max, row_sum, a, b, label_smoothing, softcap):
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)

    cross_entropy_fwd = define_op("fastgpt::cross_entropy_fwd", _fwd, _fwd_fake)
    define_op("fastgpt::cross_entropy_bwd", _bwd, _bwd_fake)

    def _setup_context(ctx, inputs, output):
        logits, targets, ignore_index, label_smoothing, softcap = inputs
        ctx.save_for_backward(logits, targets, output[2], output[3])
        ctx.mark_non_differentiable(output[2], output[3])
        ctx.opts = (ignore_index, label_smoothing, softcap)

    def _backward(ctx, g_rows, g_lse, _g_max, _g_sum):
        logits, targets, row_max, row_sum = ctx.saved_tensors
        ignore_index, label_smoothing, softcap = ctx.opts
        g_rows = torch.zeros_like(row_max) if g_rows is None else g_rows.to(row_max.dtype)
        g_lse = torch.zeros_like(row_max) if g_lse is None else g_lse.to(row_max.dtype)
        b = torch.where(targets != ignore_index, g_rows, 0.0)   # ignored rows have constant loss
        a = b + g_lse   # cross_entropy.softmax_coef, with autograd's g_lse = b * 2 * z_loss * lse
        dlogits = torch.ops.fastgpt.cross_entropy_bwd(logits, targets, row_max, row_sum, a, b,
                                                      label_smoothing, softcap)
        return dlogits, None, None, None, None

    cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy_triton(logits, targets, *, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None, return_z_loss=False):
    rows, lse, _, _ = torch.ops.fastgpt.cross_entropy_fwd(logits, targets, ignore_index,
                                                          label_smoothing, softcap or 0.0)
    valid = targets != ignore_index
    z_rows = None
    if z_loss or return_z_loss:   # through lse, autograd hands z-loss to the backward kernel
        rows, z_rows = add_z_loss(rows, lse, valid, z_loss)
    return reduce_rows(rows, z_rows, valid, reduction, return_z_loss)


def _supports(logits, targets, **kwargs) -> Optional[str]:
    reason = triton_device_reason(logits)
    if reason:
        return reason
    ok = DTYPES + ((torch.float64,) if logits.device.type == "cpu" else ())
    if logits.dtype not in ok:
        return f"logits dtype {logits.dtype} is not one of {', '.join(map(str, ok))}"
    return None


# under the Triton interpreter (a correctness tool: seconds per call) it is no candidate
registry.register("cross_entropy", "triton", cross_entropy_triton, supports=_supports,
                  available=triton_unavailable, measured=not interpreting())

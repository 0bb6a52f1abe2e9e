"""Linear+cross-entropy that never holds the full (N, V) logits: backends chunked, compile, triton.

Tokens are processed in chunks of R rows. For each chunk: logits = hidden[rows] @ W.T + b, then a
"step" turns the chunk into per-row losses and (when gradients are wanted) the gradient of the
loss with respect to the chunk's logits, written over the chunk. That gradient is used at once:

    dhidden[rows] = dlogits @ W        dW += dlogits.T @ hidden[rows]        db += dlogits.sum(0)

with dW, db, dhidden kept in fp32. So the forward pass does all three matmuls and the logits of
at most one chunk are alive at a time (Liger-Kernel's approach). For "mean"/"sum" the per-row
gradient weights (1/count or 1, 0 where ignored) are known up front; backward only multiplies
the stored gradients by grad_output, a scalar. For "none" grad_output is a vector known only in
backward, so backward recomputes the chunks with it (one extra matmul per chunk).

Chunk size: R = 2**24 // V rows, a chunk of at most 16M logits (64 MB in fp32; GPT-2 small,
N=8192, V=50304: R=333, 25 chunks). Smaller chunks cost time on CPU (R=125 was clearly slower:
every chunk re-reads and re-writes the fp32 dW), larger ones memory. When all N*V logits fit in
one chunk (every char-level preset) ``chunked`` simply runs the plain PyTorch graph: there is
nothing to save and it is the fastest eager path. Chunking over the vocabulary as well is not
needed: R shrinks as V grows, so a chunk stays bounded for any V. The budget is the backends'
keyword ``chunk_elements`` (tests shrink it so that small shapes chunk); ``chunk_rows`` sets R.

Steps (the three backends share everything else):
* ``chunked`` - eager PyTorch, in place over the chunk to keep one chunk-sized buffer;
* ``compile`` - the same math, functional, through torch.compile (fused elementwise);
* ``triton``  - the Triton cross-entropy kernels of fastgpt/kernels/cross_entropy.py, the
                gradient written over the chunk in place.

Under torch.compile the chunk loop is the custom op ``fastgpt::linear_cross_entropy_chunked``
(opaque to the compiler; autograd via register_autograd); eager calls take the same forward and
backward through a plain autograd.Function, which skips the op's per-call dispatch cost. The
z-loss part returned with ``return_z_loss=True`` is detached, as in fastgpt.ops.cross_entropy.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastgpt.ops import registry
from fastgpt.ops._triton import interpreting
from fastgpt.ops.cross_entropy import (acc_dtype, add_z_loss, apply_softcap, reduce_rows,
                                       row_losses, smoothed_target, softcap_grad, softmax_coef)
from fastgpt.ops.linear_cross_entropy import linear_cross_entropy_torch
from fastgpt.ops.cross_entropy_triton import (launch_bwd, launch_fwd, triton_device_reason,
                                              triton_unavailable)

CHUNK_ELEMENTS = 1 << 24


def auto_chunk_rows(V: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // V)


# --- steps: logits chunk (n, V) -> (rows, z_rows or None, dlogits or None); rows are per-row
# losses with the z-loss part (z_rows) included, 0 where ignored; dlogits is the gradient of
# sum_i coef_i * rows_i, or None when coef is None

def step_eager(x, t, ignore_index: int, coef: Optional[torch.Tensor], label_smoothing: float,
               z_loss: float, softcap: float):
    """Plain PyTorch, in place where it can: one chunk-sized buffer (two with softcap)."""
    valid = t != ignore_index
    t_safe = t.masked_fill(~valid, 0).unsqueeze(1)
    out_dtype = x.dtype
    z = x.to(acc_dtype(x.dtype))                  # x itself when it is already fp32/fp64
    del x
    th = None
    if softcap:   # the tanh is kept (a second buffer) only for the gradient
        z, th = apply_softcap(z, softcap, inplace=True, keep_tanh=coef is not None)
    # softmax as exp(z - m) / s with torch's pairwise row sum: CPU log_softmax sums a row of
    # 50257 with ~1e-5 relative error, a scale error of the whole row's gradient
    m = z.amax(dim=-1, keepdim=True)                                   # (n, 1)
    z_t = z.gather(1, t_safe)
    z_mean = z.mean(dim=-1, keepdim=True) if label_smoothing else None
    e = z.sub_(m).exp_()                                               # (n, V), over z
    del z
    s = e.sum(dim=-1, keepdim=True)
    log_s = s.log()
    rows = row_losses(z_t, z_mean, label_smoothing, m=m, log_s=log_s)
    rows = torch.where(valid, rows.squeeze(1), 0.0)
    z_rows = lse = None
    if z_loss:
        lse = (m + log_s).squeeze(1)
        rows, z_rows = add_z_loss(rows, lse, valid, z_loss)
    if coef is None:
        return rows, z_rows, None
    # the gradient over e's buffer: a * softmax, minus coef * the smoothed one-hot in place
    # (a scatter into the target column and one uniform subtraction, no (n, V) target tensor)
    on_target, uniform = smoothed_target(label_smoothing, e.shape[1])
    dz = e.mul_(softmax_coef(coef, lse, z_loss).unsqueeze(1) / s)
    dz.scatter_add_(1, t_safe, (coef * -on_target).unsqueeze(1))
    if label_smoothing:
        dz.sub_((coef * uniform).unsqueeze(1))
    if th is not None:
        dz.mul_(softcap_grad(th, inplace=True))
    return rows, z_rows, dz.to(out_dtype)


def _step_functional(x, t, ignore_index: int, coef: Optional[torch.Tensor],
                     label_smoothing: float, z_loss: float, softcap: float):
    """step_eager's math without in-place updates, for torch.compile: the smoothed one-hot is a
    where() that fuses into the gradient's one elementwise kernel (a scatter would not)."""
    valid = t != ignore_index
    z = x.to(acc_dtype(x.dtype))
    th = None
    if softcap:
        z, th = apply_softcap(z, softcap)
    t_safe = t.masked_fill(~valid, 0).unsqueeze(1)
    m = z.amax(dim=-1, keepdim=True)
    e = torch.exp(z - m)
    # summed in float64: Inductor's CPU row sums run serially per vector lane (~3e-6 off at
    # V=50257 in fp32), unlike eager torch's pairwise sum
    s = e.sum(dim=-1, keepdim=True, dtype=torch.float64).to(e.dtype)
    log_s = torch.log(s)
    z_mean = z.mean(dim=-1, keepdim=True) if label_smoothing else None
    rows = row_losses(z.gather(1, t_safe), z_mean, label_smoothing, m=m, log_s=log_s).squeeze(1)
    lse = (m + log_s).squeeze(1)
    rows = torch.where(valid, rows, 0.0)
    z_rows = None
    if z_loss:
        rows, z_rows = add_z_loss(rows, lse, valid, z_loss)
    if coef is None:
        return rows, z_rows, None
    V = z.shape[1]
    on_target, uniform = smoothed_target(label_smoothing, V)
    hit = torch.arange(V, device=z.device) == t_safe
    target = torch.where(hit, on_target, 0.0) + uniform
    dz = e * (softmax_coef(coef, lse, z_loss).unsqueeze(1) / s) - target * coef.unsqueeze(1)
    if th is not None:
        dz = dz * softcap_grad(th)
    return rows, z_rows, dz.to(x.dtype)


def step_compile(x, t, ignore_index, coef, label_smoothing, z_loss, softcap):
    return registry.compiled(_step_functional)(x, t, ignore_index, coef, label_smoothing, z_loss, softcap)


def step_triton(x, t, ignore_index, coef, label_smoothing, z_loss, softcap):
    rows, lse, row_max, row_sum = launch_fwd(x, t, ignore_index, label_smoothing, softcap)
    z_rows = None
    if z_loss:
        rows, z_rows = add_z_loss(rows, lse, t != ignore_index, z_loss)
    if coef is None:
        return rows, z_rows, None
    return rows, z_rows, launch_bwd(x, t, row_max, row_sum, softmax_coef(coef, lse, z_loss),
                                    coef, label_smoothing, softcap, out=x)


_STEP_FNS = {"chunked": step_eager, "compile": step_compile, "triton": step_triton}


def chunk_loop(hidden, weight, bias, targets, coef, ignore_index, label_smoothing, z_loss,
               softcap, step, chunk_rows, grad_hidden, grad_weight, grad_bias):
    """Per-row losses and z-loss parts (N,) (None without z-loss) and, when ``coef`` (N,) is
    given, the gradients of sum_i coef_i * loss_i for the inputs asked for (None for others)."""
    N, C = hidden.shape
    V = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    fn = _STEP_FNS[step]
    R = chunk_rows if chunk_rows > 0 else auto_chunk_rows(V)
    if N <= R:   # one chunk: no per-row buffers, no copies
        rows, z_rows, dx = fn(F.linear(hidden, weight, bias), targets, ignore_index, coef,
                              label_smoothing, z_loss, softcap)
        if dx is None:
            return rows, z_rows, None, None, None
        dh = (dx @ weight).to(acc) if grad_hidden else None
        dW = (dx.t() @ hidden).to(acc) if grad_weight else None
        db = dx.sum(0, dtype=acc) if grad_bias else None
        return rows, z_rows, dh, dW, db
    want = coef is not None
    dh = hidden.new_empty((N, C), dtype=acc) if want and grad_hidden else None
    dW = weight.new_zeros((V, C), dtype=acc) if want and grad_weight else None
    db = weight.new_zeros((V,), dtype=acc) if want and grad_bias else None
    rows = hidden.new_empty((N,), dtype=acc)
    z_rows = torch.empty_like(rows) if z_loss else None
    for s in range(0, N, R):
        e = min(s + R, N)
        r, zr, dx = fn(F.linear(hidden[s:e], weight, bias), targets[s:e], ignore_index,
                       None if coef is None else coef[s:e], label_smoothing, z_loss, softcap)
        rows[s:e] = r
        if zr is not None:
            z_rows[s:e] = zr
        if dx is not None:
            _accumulate(dx, hidden[s:e], weight, dh, dW, db, s, e)
        del r, zr, dx   # free this chunk before the next one is computed
    return rows, z_rows, dh, dW, db


def _accumulate(dx, h, weight, dh, dW, db, s, e):
    if dh is not None:
        dh[s:e] = dx @ weight                      # (n, C)
    if dW is not None:
        if dx.dtype == dW.dtype:
            dW.addmm_(dx.t(), h)                   # (V, C) += (V, n) @ (n, C)
        else:
            dW += dx.t() @ h
    if db is not None:
        db += dx.sum(0, dtype=db.dtype)


def _row_weights(targets, ignore_index: int, reduction: str, acc: torch.dtype):
    valid = (targets != ignore_index).to(acc)
    return valid / valid.sum().clamp_min(1) if reduction == "mean" else valid


def _forward(hidden, weight, bias, targets, ignore_index, reduction, label_smoothing, z_loss,
             softcap, step, chunk_rows, grad_hidden, grad_weight, grad_bias):
    """(loss, z-loss part) reduced as asked, and for "mean"/"sum" the fp32 gradients for
    grad_output = 1 of the inputs asked for (None otherwise)."""
    acc = acc_dtype(hidden.dtype)
    grads = reduction != "none" and (grad_hidden or grad_weight or grad_bias)
    coef = _row_weights(targets, ignore_index, reduction, acc) if grads else None
    rows, z_rows, dh, dW, db = chunk_loop(hidden, weight, bias, targets, coef, ignore_index,
                                          label_smoothing, z_loss, softcap, step, chunk_rows,
                                          grad_hidden, grad_weight, grad_bias)
    loss, z = reduce_rows(rows, z_rows, targets != ignore_index, reduction, True)
    return loss, z, dh, dW, db


def _save(ctx, inputs, grads):
    (hidden, weight, bias, targets, ignore_index, reduction, label_smoothing, z_loss, softcap,
     step, chunk_rows, grad_hidden, grad_weight, grad_bias) = inputs
    ctx.reduction = reduction
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    if reduction == "none":   # backward recomputes the chunks with the per-row grad_output
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.opts = (ignore_index, label_smoothing, z_loss, softcap, step, chunk_rows,
                    grad_hidden, grad_weight, grad_bias)
    else:
        ctx.save_for_backward(*(g if g is not None and g.numel() else None for g in grads))


def _backward(ctx, g_loss):
    if ctx.reduction == "none":
        hidden, weight, bias, targets = ctx.saved_tensors
        grads = torch.ops.fastgpt.linear_cross_entropy_chunked_bwd(
            hidden, weight, bias, targets, g_loss, *ctx.opts)
        grads = [g if g.numel() else None for g in grads]
    else:
        grads = [None if g is None else g * g_loss for g in ctx.saved_tensors]
    out = [None if g is None or dt is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
    return (*out, None, None, None, None, None, None, None, None, None, None, None)


class _LinearCrossEntropy(torch.autograd.Function):
    """Eager entry point: the same forward/backward as the custom op below, without its
    per-call dispatch cost (tens of microseconds, which the char-level presets notice)."""

    @staticmethod
    def forward(ctx, *inputs):
        loss, z, *grads = _forward(*inputs)
        _save(ctx, inputs, grads)
        ctx.mark_non_differentiable(z)
        return loss, z

    @staticmethod
    def backward(ctx, g_loss, g_z):
        return _backward(ctx, g_loss)


def _empty_if_none(grads, like, dtype):
    return tuple(like.new_empty((0,), dtype=dtype) if g is None else g for g in grads)


@torch.library.custom_op("fastgpt::linear_cross_entropy_chunked", mutates_args=())
def _lce(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
         targets: torch.Tensor, ignore_index: int, reduction: str, label_smoothing: float,
         z_loss: float, softcap: float, step: str, chunk_rows: int, grad_hidden: bool,
         grad_weight: bool, grad_bias: bool
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, z-loss part, dhidden, dweight, dbias); gradients empty when not computed."""
    loss, z, *grads = _forward(hidden, weight, bias, targets, ignore_index, reduction,
                               label_smoothing, z_loss, softcap, step, chunk_rows, grad_hidden,
                               grad_weight, grad_bias)
    return (loss, z, *_empty_if_none(grads, hidden, acc_dtype(hidden.dtype)))


@_lce.register_fake
def _(hidden, weight, bias, targets, ignore_index, reduction, label_smoothing, z_loss, softcap,
      step, chunk_rows, grad_hidden, grad_weight, grad_bias):
    acc = acc_dtype(hidden.dtype)
    shape = (hidden.shape[0],) if reduction == "none" else ()
    grads = reduction != "none"
    N, C = hidden.shape
    V = weight.shape[0]

    def out(want, size):
        return hidden.new_empty(size if grads and want else (0,), dtype=acc)
    return (hidden.new_empty(shape, dtype=acc), hidden.new_empty(shape, dtype=acc),
            out(grad_hidden, (N, C)), out(grad_weight, (V, C)), out(grad_bias, (V,)))


@torch.library.custom_op("fastgpt::linear_cross_entropy_chunked_bwd", mutates_args=())
def _lce_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             targets: torch.Tensor, grad_rows: torch.Tensor, ignore_index: int,
             label_smoothing: float, z_loss: float, softcap: float, step: str, chunk_rows: int,
             grad_hidden: bool, grad_weight: bool, grad_bias: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for reduction="none": recompute each chunk with the row weights grad_rows."""
    acc = acc_dtype(hidden.dtype)
    coef = torch.where(targets != ignore_index, grad_rows.to(acc), 0.0)
    _, _, *grads = chunk_loop(hidden, weight, bias, targets, coef, ignore_index,
                              label_smoothing, z_loss, softcap, step, chunk_rows,
                              grad_hidden, grad_weight, grad_bias)
    return _empty_if_none(grads, hidden, acc)


@_lce_bwd.register_fake
def _(hidden, weight, bias, targets, grad_rows, ignore_index, label_smoothing, z_loss, softcap,
      step, chunk_rows, grad_hidden, grad_weight, grad_bias):
    acc = acc_dtype(hidden.dtype)
    N, C = hidden.shape
    V = weight.shape[0]

    def out(want, size):
        return hidden.new_empty(size if want else (0,), dtype=acc)
    return out(grad_hidden, (N, C)), out(grad_weight, (V, C)), out(grad_bias, (V,))


def _setup_context(ctx, inputs, output):
    _save(ctx, inputs, output[2:])


_lce.register_autograd(lambda ctx, g_loss, *unused: _backward(ctx, g_loss),
                       setup_context=_setup_context)


def _make_backend(step: str):
    def linear_cross_entropy_chunked(hidden, weight, targets, *, bias=None, ignore_index=-100,
                                     reduction="mean", label_smoothing=0.0, z_loss=0.0,
                                     softcap=None, return_z_loss=False, chunk_rows=0,
                                     chunk_elements=CHUNK_ELEMENTS):
        N, V = hidden.shape[0], weight.shape[0]
        if step == "chunked" and chunk_rows <= 0 and N * V <= chunk_elements:
            # all logits fit in one chunk: nothing to save, and autograd's fused log_softmax
            # backward is the fastest eager path (the char-level presets land here)
            return linear_cross_entropy_torch(
                hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                softcap=softcap, return_z_loss=return_z_loss)
        if torch.is_autocast_enabled(hidden.device.type):
            # what autocast would do to F.linear (it does not reach inside custom ops)
            dt = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dt), weight.to(dt)
            bias = None if bias is None else bias.to(dt)
        grad = torch.is_grad_enabled()
        rows = chunk_rows if chunk_rows > 0 else auto_chunk_rows(V, chunk_elements)
        args = (hidden, weight, bias, targets, ignore_index, reduction, label_smoothing, z_loss,
                softcap or 0.0, step, rows, grad and hidden.requires_grad,
                grad and weight.requires_grad, grad and bias is not None and bias.requires_grad)
        if torch.compiler.is_compiling():
            loss, z = torch.ops.fastgpt.linear_cross_entropy_chunked(*args)[:2]
        else:
            loss, z = _LinearCrossEntropy.apply(*args)
        return (loss, z.detach()) if return_z_loss else loss
    linear_cross_entropy_chunked.__name__ = f"linear_cross_entropy_{step}"
    return linear_cross_entropy_chunked


def _same_dtypes(hidden, weight, targets, bias=None, **kwargs) -> Optional[str]:
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        return (f"needs hidden, weight and bias of one dtype; got {hidden.dtype}, {weight.dtype}"
                f"{'' if bias is None else ', ' + str(bias.dtype)}")
    return None


def _triton_supports(hidden, weight, targets, bias=None, **kwargs) -> Optional[str]:
    reason = triton_device_reason(hidden)
    if reason is None and hidden.device.type == "cuda" and hidden.dtype == torch.float64:
        reason = "float64 is not supported on GPU"
    return reason or _same_dtypes(hidden, weight, targets, bias)


linear_cross_entropy_chunked = _make_backend("chunked")
linear_cross_entropy_compile = _make_backend("compile")
linear_cross_entropy_triton = _make_backend("triton")

registry.register("linear_cross_entropy", "chunked", linear_cross_entropy_chunked,
                  supports=_same_dtypes)
registry.register("linear_cross_entropy", "compile", linear_cross_entropy_compile,
                  supports=_same_dtypes, measured=False)
# under the Triton interpreter (a correctness tool: seconds per call) it is no candidate
registry.register("linear_cross_entropy", "triton", linear_cross_entropy_triton,
                  supports=_triton_supports, available=triton_unavailable,
                  measured=not interpreting())

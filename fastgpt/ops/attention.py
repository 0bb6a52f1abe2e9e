"""Causal self-attention: the lecture's ladder of naive versions and the dispatch entry point.

All backends take q, k, v of shape (B, H, T, D) and return (B, H, T, D):

* ``loop``  - explicit Python loops over batch and time, the lecture's first version;
* ``tril``  - the lecture's matmul with a ``torch.tril`` mask, ``masked_fill(-inf)``, softmax;
* ``torch`` - the plain vectorised reference every fast kernel is tested against (in float64);
* ``sdpa``  - ``F.scaled_dot_product_attention(is_causal=True)``, nanoGPT's (``--exact``).

Fast backends register themselves from their own modules: ``triton`` and ``compile``, and
``ext`` (C++, attention_ext.py), the CPU default.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastgpt.errors import FastGPTError
from fastgpt.ops import measured, registry


def _scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def attention_loop(q, k, v, *, scale=None, dropout_p=0.0):
    scale = _scale(q, scale)
    B, H, T, D = q.shape
    out = torch.empty_like(q)
    for b in range(B):
        for t in range(T):
            # row t attends to positions 0..t only
            scores = (q[b, :, t:t + 1] @ k[b, :, :t + 1].transpose(-2, -1)) * scale  # (H, 1, t+1)
            weights = F.dropout(scores.softmax(dim=-1), p=dropout_p)
            out[b, :, t:t + 1] = weights @ v[b, :, :t + 1]  # (H, 1, D)
    return out


def attention_tril(q, k, v, *, scale=None, dropout_p=0.0):
    T = q.shape[-2]
    tril = torch.tril(torch.ones(T, T, device=q.device))
    wei = (q @ k.transpose(-2, -1)) * _scale(q, scale)       # (B, H, T, T)
    wei = wei.masked_fill(tril == 0, float("-inf"))
    wei = F.dropout(F.softmax(wei, dim=-1), p=dropout_p)
    return wei @ v


def attention_torch(q, k, v, *, scale=None, dropout_p=0.0):
    B, H, T, D = q.shape
    # scale and causal mask folded into one batched matmul: scores = mask + scale * q @ k^T
    mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    scores = torch.baddbmm(mask.expand(B * H, T, T), q.reshape(B * H, T, D),
                           k.reshape(B * H, T, D).transpose(1, 2), alpha=_scale(q, scale))
    probs = scores.softmax(dim=-1)                                     # (B*H, T, T)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.bmm(probs, v.reshape(B * H, T, D)).view(B, H, T, D)


def attention_sdpa(q, k, v, *, scale=None, dropout_p=0.0):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)


# the lecture's versions are references, never candidates of measured dispatch
registry.register("attention", "loop", attention_loop, measured=False)
registry.register("attention", "tril", attention_tril, measured=False)
registry.register("attention", "torch", attention_torch)
registry.register("attention", "sdpa", attention_sdpa)
# float32 on CPU: our fused kernel, 1.2x SDPA's speed fwd+bwd on an AVX2 + FMA CPU at the
# presets' shapes; SDPA where it cannot run (dropout, D > 128). `--exact` pins SDPA.
registry.set_default_order("attention", "cpu", ["ext", "sdpa"])
# bfloat16 on CPU: our fused kernel (attention_ext), then the plain batched matmuls; PyTorch's
# CPU flash kernel is 3-4x slower in bfloat16 than the batched matmuls at the presets' shapes
# (B=12, H=4, T=64, D=32, fwd+bwd; bench/bench_attention.py)
registry.set_default_order("attention", "cpu", ["ext", "torch", "sdpa"], dtype=torch.bfloat16)
registry.set_default_order("attention", "cuda", ["triton", "sdpa"])
registry.set_default_order("attention", "default", ["sdpa", "torch"])


def _workload_key(q, k, v, *, scale=None, dropout_p=0.0):
    B, H, T, D = q.shape
    return (("B", B), ("H", H), ("T", measured.bucket(T)), ("D", D), ("dropout", dropout_p > 0))


def _workload_inputs(key: dict, make: measured.InputMaker):
    shape = (key["B"], key["H"], key["T"], key["D"])
    # the kernels' cost does not depend on the dropout rate, only on whether there is dropout
    return (make.floats(shape), make.floats(shape), make.floats(shape)), {
        "dropout_p": 0.1 if key["dropout"] else 0.0}


registry.set_workload("attention", measured.Workload(_workload_key, _workload_inputs))


def _check(q, k, v, dropout_p):
    if q.dim() != 4:
        raise FastGPTError(f"causal_attention expects q, k, v of shape (B, H, T, D); got q with "
                           f"shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise FastGPTError(f"causal_attention needs q, k, v of one shape; got {tuple(q.shape)}, "
                           f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise FastGPTError(f"causal_attention needs q, k, v of one floating dtype; got "
                           f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise FastGPTError(f"dropout_p must be in [0, 1); got {dropout_p}")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     scale: Optional[float] = None, dropout_p: float = 0.0,
                     backend: Optional[str] = None, preferred: Optional[str] = None) -> torch.Tensor:
    """Causal softmax attention over (B, H, T, D) tensors; ``scale`` defaults to 1/sqrt(D).

    ``backend`` names a backend explicitly; ``preferred`` is the model config's choice (weaker
    than ``use_backends``). See fastgpt.ops.registry for the precedence rules.
    """
    _check(q, k, v, dropout_p)
    chosen = registry.choose("attention", q.device.type, (q, k, v),
                             {"scale": scale, "dropout_p": dropout_p},
                             backend=backend, preferred=preferred, dtype=q.dtype)
    return chosen(q, k, v, scale=scale, dropout_p=dropout_p)

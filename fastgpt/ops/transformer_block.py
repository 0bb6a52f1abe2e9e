"""One GPT block as an op: nanoGPT's pre-LayerNorm causal self-attention + GELU MLP.

    x1  = x + dropout(c_proj(attention(c_attn(ln_1(x)))))
    out = x1 + dropout(mlp_c_proj(gelu(c_fc(ln_2(x1)))))

``gelu_approximate`` is torch.nn.functional.gelu's: "none" (exact, nanoGPT's) or "tanh" (GPT-2's
own "gelu_new", for weights converted from Hugging Face by fastgpt.pretrained).

Backends:

* ``torch`` - the block written out with torch.nn.functional; attention goes through
              fastgpt.ops.causal_attention, which picks its own backend (``attention=`` is the
              model config's preference for it). The reference; its dropout is torch's.
* ``ext``   - fastgpt._C's C++ forward and backward (csrc/transformer_block_cpu.cpp): the same
              math as ``torch`` with the ``torch`` attention backend, as one op and one autograd
              node per block. At the baby preset's size this removes the per-op Python and
              autograd cost, a large share of a CPU training step. CPU, no incremental
              decoding, exact GELU only; dropout with its own hashed masks, applied inside
              the attention kernel and fused with the residual adds (csrc/dropout_cpu.h).

Incremental decoding (sampling with a KV cache, fastgpt/generate.py) is the same op:
``transformer_block_decode`` runs the block on the positions after ``past``, the keys and values
of earlier positions, optionally for the last position only, and returns the keys and values
so far too. It dispatches like ``transformer_block``, with those inputs as keyword arguments,
so a backend states in ``supports()`` whether it can decode; ``torch`` is written once for both.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from fastgpt.errors import FastGPTError
from fastgpt.ops import measured, registry
from fastgpt.ops.attention import causal_attention


class BlockWeights(NamedTuple):
    """A block's parameters (nn.Linear's (out, in) layout); biases may be None."""
    ln_1_weight: torch.Tensor
    ln_1_bias: Optional[torch.Tensor]
    c_attn_weight: torch.Tensor             # (3C, C): q, k, v stacked
    c_attn_bias: Optional[torch.Tensor]
    attn_c_proj_weight: torch.Tensor        # (C, C)
    attn_c_proj_bias: Optional[torch.Tensor]
    ln_2_weight: torch.Tensor
    ln_2_bias: Optional[torch.Tensor]
    c_fc_weight: torch.Tensor               # (F, C), F = 4C in GPT
    c_fc_bias: Optional[torch.Tensor]
    mlp_c_proj_weight: torch.Tensor         # (C, F)
    mlp_c_proj_bias: Optional[torch.Tensor]


KV = tuple[torch.Tensor, torch.Tensor]   # a block's keys and values, each (B, nh, T, hs)


def transformer_block_torch(x, w: BlockWeights, n_head: int, *, dropout_p: float = 0.0,
                            attention: Optional[str] = None, past: Optional[KV] = None,
                            last_only: bool = False, return_kv: bool = False,
                            gelu_approximate: str = "none"):
    B, T, C = x.shape
    h = F.layer_norm(x, (C,), w.ln_1_weight, w.ln_1_bias)
    qkv = F.linear(h, w.c_attn_weight, w.c_attn_bias).view(B, T, 3, n_head, C // n_head)
    q, k, v = qkv.unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))                         # (B, nh, T, hs)
    if past is not None:                         # decoding: the keys and values before x's
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    if last_only:                                # decoding: only the last position goes on
        q, x, T = q[:, :, -1:], x[:, -1:], 1
    if past is None and not last_only:           # every query row of every key: training
        y = causal_attention(q, k, v, dropout_p=dropout_p, preferred=attention)
    else:
        y = _attend_last_rows(q, k, v, dropout_p)
    y = F.linear(y.transpose(1, 2).reshape(B, T, C), w.attn_c_proj_weight, w.attn_c_proj_bias)
    x = x + (F.dropout(y, dropout_p) if dropout_p > 0 else y)
    h = F.layer_norm(x, (C,), w.ln_2_weight, w.ln_2_bias)
    y = F.linear(F.gelu(F.linear(h, w.c_fc_weight, w.c_fc_bias), approximate=gelu_approximate),
                 w.mlp_c_proj_weight, w.mlp_c_proj_bias)
    out = x + (F.dropout(y, dropout_p) if dropout_p > 0 else y)
    return (out, (k, v)) if return_kv else out


def _attend_last_rows(q, k, v, dropout_p):
    """Attention of the last T_q positions (q: (B, nh, T_q, hs)) over all T_k >= T_q so far.

    fastgpt.ops.causal_attention takes square inputs (as many query rows as keys), so decoding
    uses PyTorch's SDPA: one query row sees every key and needs no mask (the math the KV cache
    has always used, so sampled tokens stay as they were); several rows after a past get the
    causal mask shifted by T_k - T_q. Both within the accuracy rule (tests/test_sample.py).
    """
    T_q, T_k = q.shape[2], k.shape[2]
    mask = (None if T_q == 1 else
            torch.ones(T_q, T_k, dtype=torch.bool, device=q.device).tril(T_k - T_q))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


registry.register("transformer_block", "torch", transformer_block_torch)
registry.set_default_order("transformer_block", "default", ["torch"])


def _workload_key(x, weights, n_head, *, dropout_p=0.0, attention=None, gelu_approximate="none",
                  **decoding):
    if decoding:                 # transformer_block_decode: the KV cache's shapes vary per call
        return None
    B, T, C = x.shape
    # the GELU only when not the exact default: keys of exact-GELU blocks stay as they were
    gelu = (("gelu", gelu_approximate),) if gelu_approximate != "none" else ()
    return (("B", B), ("T", measured.bucket(T)), ("C", C), ("F", weights.c_fc_weight.shape[0]),
            ("n_head", n_head), ("bias", weights.c_attn_bias is not None),
            ("dropout", dropout_p > 0), ("attention", attention)) + gelu


def _workload_inputs(key: dict, make: measured.InputMaker):
    C, F = key["C"], key["F"]
    w = make.floats   # GPT-2's initialisation scale; LayerNorm weights near one

    def bias(n):
        return w((n,), 0.02) if key["bias"] else None
    weights = BlockWeights(w((C,), 0.02, 1.0), bias(C), w((3 * C, C), 0.02), bias(3 * C),
                           w((C, C), 0.02), bias(C), w((C,), 0.02, 1.0), bias(C),
                           w((F, C), 0.02), bias(F), w((C, F), 0.02), bias(C))
    return (w((key["B"], key["T"], C)), weights, key["n_head"]), {
        "dropout_p": 0.1 if key["dropout"] else 0.0, "attention": key["attention"],
        **({"gelu_approximate": key["gelu"]} if "gelu" in key else {})}


registry.set_workload("transformer_block", measured.Workload(_workload_key, _workload_inputs))


def _check(x: torch.Tensor, w: BlockWeights, n_head: int, dropout_p: float,
           gelu_approximate: str) -> None:
    if x.dim() != 3 or not x.is_floating_point():
        raise FastGPTError(f"transformer_block expects x of shape (B, T, C) and a floating dtype; "
                           f"got shape {tuple(x.shape)}, dtype {x.dtype}")
    C = x.shape[-1]
    if n_head < 1 or C % n_head:
        raise FastGPTError(f"transformer_block: n_head must be >= 1 and divide the channel count "
                           f"{C}; got {n_head}")
    if tuple(w.c_attn_weight.shape) != (3 * C, C):
        raise FastGPTError(f"transformer_block: c_attn_weight must have shape {(3 * C, C)} for x "
                           f"of shape {tuple(x.shape)}; got {tuple(w.c_attn_weight.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise FastGPTError(f"dropout_p must be in [0, 1); got {dropout_p}")
    if gelu_approximate not in ("none", "tanh"):
        raise FastGPTError(f"gelu_approximate must be 'none' (exact) or 'tanh'; got "
                           f"{gelu_approximate!r}")


def _check_past(x: torch.Tensor, n_head: int, past: Optional[KV]) -> None:
    if past is None:
        return
    B, _, C = x.shape
    if not (isinstance(past, (tuple, list)) and len(past) == 2
            and all(isinstance(t, torch.Tensor) for t in past)):
        raise FastGPTError(f"transformer_block_decode: past must be None or (keys, values), two "
                           f"tensors; got {type(past).__name__}")
    k, v = past
    want = (B, n_head, C // n_head)
    if k.dim() != 4 or (k.shape[0], k.shape[1], k.shape[3]) != want or v.shape != k.shape:
        raise FastGPTError(f"transformer_block_decode: past keys and values must both have shape "
                           f"(B, n_head, T_past, C // n_head) = ({B}, {n_head}, T_past, "
                           f"{C // n_head}) for x of shape {tuple(x.shape)}; got "
                           f"{tuple(k.shape)} and {tuple(v.shape)}")


def transformer_block(x: torch.Tensor, weights: BlockWeights, n_head: int, *,
                      dropout_p: float = 0.0, attention: Optional[str] = None,
                      backend: Optional[str] = None, preferred: Optional[str] = None,
                      gelu_approximate: str = "none") -> torch.Tensor:
    """One block on x of shape (B, T, C); returns (B, T, C).

    ``attention`` is the attention backend the model config prefers (used by ``torch``);
    ``backend`` / ``preferred`` choose this op's backend (see fastgpt.ops.registry);
    ``gelu_approximate`` the MLP's GELU ("none": exact, "tanh": GPT-2's).
    """
    _check(x, weights, n_head, dropout_p, gelu_approximate)
    kwargs = {"dropout_p": dropout_p, "attention": attention}
    if gelu_approximate != "none":   # only then: a backend that predates the option still runs
        kwargs["gelu_approximate"] = gelu_approximate
    chosen = registry.choose("transformer_block", x.device.type, (x, weights, n_head), kwargs,
                             backend=backend, preferred=preferred, dtype=x.dtype)
    return chosen(x, weights, n_head, **kwargs)


def _decode_kwargs(past: Optional[KV], last_only: bool, attention: Optional[str],
                   gelu_approximate: str) -> dict:
    kwargs = {"dropout_p": 0.0, "attention": attention, "past": past, "last_only": last_only,
              "return_kv": True}
    if gelu_approximate != "none":
        kwargs["gelu_approximate"] = gelu_approximate
    return kwargs


def transformer_block_decode(x: torch.Tensor, weights: BlockWeights, n_head: int, *,
                             past: Optional[KV] = None, last_only: bool = False,
                             attention: Optional[str] = None, backend: Optional[str] = None,
                             preferred: Optional[str] = None,
                             gelu_approximate: str = "none") -> tuple[torch.Tensor, KV]:
    """One block in eval mode (no dropout) on x (B, T, C), the positions after ``past``: the
    (keys, values) of this block at the T_past positions before, each (B, nh, T_past, hs), or
    None. Returns the output, (B, 1, C) for the last position only with ``last_only``, else
    (B, T, C), and the keys and values of all T_past + T positions.

    Same backend choice as ``transformer_block``; a backend that cannot decode (``ext``) is
    skipped by the automatic choice and raises when named.
    """
    _check(x, weights, n_head, 0.0, gelu_approximate)
    _check_past(x, n_head, past)
    kwargs = _decode_kwargs(past, last_only, attention, gelu_approximate)
    chosen = registry.choose("transformer_block", x.device.type, (x, weights, n_head), kwargs,
                             backend=backend, preferred=preferred, dtype=x.dtype)
    return chosen(x, weights, n_head, **kwargs)


def decode_unsupported(x: torch.Tensor, weights: BlockWeights, n_head: int, *,
                       attention: Optional[str] = None, backend: Optional[str] = None,
                       preferred: Optional[str] = None,
                       gelu_approximate: str = "none") -> Optional[str]:
    """None when ``transformer_block_decode`` runs inputs like these (metadata only); else why
    not: the block backend the user named cannot decode. The automatic choice always can
    (it ends at ``torch``). Lets a caller that has another way (full recomputation) take it
    instead of failing."""
    asked = registry.requested("transformer_block", backend, preferred)
    if asked is None:
        return None
    name, source = asked
    reason = registry.get("transformer_block", name).cannot_run(
        x, weights, n_head, **_decode_kwargs(None, True, attention, gelu_approximate))
    return None if reason is None else f"transformer_block backend {name!r} ({source}): {reason}"

"""One GPT block as an op: nanoGPT's pre-LayerNorm causal self-attention + GELU MLP.

    x1  = x + dropout(c_proj(attention(c_attn(ln_1(x)))))
    out = x1 + dropout(mlp_c_proj(gelu(c_fc(ln_2(x1)))))

Backends:

* ``torch`` - the block written out with torch.nn.functional; attention goes through
              fastgpt.ops.causal_attention, which picks its own backend (``attention=`` is the
              model config's preference for it). The reference, and the only one with dropout.
* ``ext``   - fastgpt._C's C++ forward and backward (csrc/transformer_block_cpu.cpp): the same
              math as ``torch`` with the ``torch`` attention backend, as one op and one autograd
              node per block. At the baby preset's size this removes the per-op Python and
              autograd cost, a large share of a CPU training step. CPU, no dropout.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from fastgpt.errors import FastGPTError
from fastgpt.ops import registry
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


def transformer_block_torch(x, w: BlockWeights, n_head: int, *, dropout_p: float = 0.0,
                            attention: Optional[str] = None):
    B, T, C = x.shape
    h = F.layer_norm(x, (C,), w.ln_1_weight, w.ln_1_bias)
    qkv = F.linear(h, w.c_attn_weight, w.c_attn_bias).view(B, T, 3, n_head, C // n_head)
    q, k, v = qkv.unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))                         # (B, nh, T, hs)
    y = causal_attention(q, k, v, dropout_p=dropout_p, preferred=attention)  # (B, nh, T, hs)
    y = F.linear(y.transpose(1, 2).reshape(B, T, C), w.attn_c_proj_weight, w.attn_c_proj_bias)
    x = x + (F.dropout(y, dropout_p) if dropout_p > 0 else y)
    h = F.layer_norm(x, (C,), w.ln_2_weight, w.ln_2_bias)
    y = F.linear(F.gelu(F.linear(h, w.c_fc_weight, w.c_fc_bias)), w.mlp_c_proj_weight,
                 w.mlp_c_proj_bias)
    return x + (F.dropout(y, dropout_p) if dropout_p > 0 else y)


registry.register("transformer_block", "torch", transformer_block_torch)
registry.set_default_order("transformer_block", "default", ["torch"])


def _check(x: torch.Tensor, w: BlockWeights, n_head: int, dropout_p: float) -> None:
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


def transformer_block(x: torch.Tensor, weights: BlockWeights, n_head: int, *,
                      dropout_p: float = 0.0, attention: Optional[str] = None,
                      backend: Optional[str] = None,
                      preferred: Optional[str] = None) -> torch.Tensor:
    """One block on x of shape (B, T, C); returns (B, T, C).

    ``attention`` is the attention backend the model config prefers (used by ``torch``);
    ``backend`` / ``preferred`` choose this op's backend (see fastgpt.ops.registry).
    """
    _check(x, weights, n_head, dropout_p)
    kwargs = {"dropout_p": dropout_p, "attention": attention}
    chosen = registry.choose("transformer_block", x.device.type, (x, weights, n_head), kwargs,
                             backend=backend, preferred=preferred, dtype=x.dtype)
    return chosen.fn(x, weights, n_head, **kwargs)

"""The ``ext`` transformer_block backend: fastgpt._C's C++ block (csrc/transformer_block_*.cpp).

The ops ``fastgpt::transformer_block`` (autograd registered in C++), ``transformer_block_train``
and ``transformer_block_backward`` are declared in csrc/library.cpp; this module adds their fake
kernels so torch.compile can trace them, and registers the backend. CPU only; dropout with its
own masks (hashes of a seed drawn from torch's CPU generator, csrc/dropout_cpu.h), so not
torch's random stream (``fastgpt train --exact`` keeps that); exact GELU only (GPT-2's tanh
approximation takes the ``torch`` block), no incremental decoding (past keys and values:
sampling takes the ``torch`` block), and attention is the ``ext`` attention
backend's kernel (csrc/attention_cpu.cpp), so another attention backend named by the user sends
the automatic choice to the ``torch`` block instead.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastgpt.ops import registry
from fastgpt.ops.attention_ext import saved_fake as attention_saved_fake
from fastgpt.ops.extension import available, on_load
from fastgpt.ops.transformer_block import KV, BlockWeights

_SAVED = 13   # what transformer_block_train returns: activations and the dropout seed (see
              # csrc/transformer_block_cpu.cpp)


def supports(x: torch.Tensor, weights: BlockWeights, n_head: int, *, dropout_p: float = 0.0,
             attention: Optional[str] = None, past: Optional[KV] = None, last_only: bool = False,
             return_kv: bool = False, gelu_approximate: str = "none") -> Optional[str]:
    if past is not None or last_only or return_kv:
        return ("the C++ block has no incremental decoding (past keys and values, last position "
                "only); the torch backend has it")
    if x.device.type != "cpu":
        return f"fastgpt._C has a CPU transformer_block only; got {x.device.type}"
    if torch.is_autocast_enabled("cpu"):
        # its matmuls would be autocast one by one inside the op, leaving mixed dtypes
        return "the C++ block does not run under torch.autocast; the torch backend does"
    if gelu_approximate != "none":
        return (f"the C++ block's GELU is exact (gelu_approximate={gelu_approximate!r} asked, "
                f"as GPT-2's weights need); the torch backend has it")
    for name, t in zip(BlockWeights._fields, weights):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            return f"{name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}"
    requested = registry.requested("attention", preferred=attention)
    if requested is not None and requested[0] != "ext":
        name, source = requested
        return (f"attention backend {name!r} was requested ({source}); the C++ block computes "
                f"attention with the 'ext' attention backend's kernel")
    return None


def transformer_block_ext(x: torch.Tensor, weights: BlockWeights, n_head: int, *,
                          dropout_p: float = 0.0, attention: Optional[str] = None,
                          past: Optional[KV] = None, last_only: bool = False,
                          return_kv: bool = False, gelu_approximate: str = "none") -> torch.Tensor:
    reason = available()
    if reason is not None:
        raise RuntimeError(reason)
    if gelu_approximate != "none":
        raise ValueError(f"the ext transformer_block's GELU is exact; got gelu_approximate="
                         f"{gelu_approximate!r}")
    if past is not None or last_only or return_kv:
        raise ValueError("the ext transformer_block has no incremental decoding; got "
                         f"past={'given' if past is not None else None}, last_only={last_only}, "
                         f"return_kv={return_kv}")
    # the OpOverload, not the packet: skips overload resolution per call
    return torch.ops.fastgpt.transformer_block.default(x, *weights, n_head, dropout_p)


@on_load
def _register_fake() -> None:
    def like(t):   # the kernels return fresh contiguous tensors
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastgpt::transformer_block")
    def _block_fake(x, *weights_and_n_head):
        return like(x)

    @torch.library.register_fake("fastgpt::transformer_block_train")
    def _train_fake(x, ln_1_weight, ln_1_bias, c_attn_weight, c_attn_bias, attn_c_proj_weight,
                    attn_c_proj_bias, ln_2_weight, ln_2_bias, c_fc_weight, c_fc_bias,
                    mlp_c_proj_weight, mlp_c_proj_bias, n_head, dropout_p=0.0):
        B, T, C = x.shape
        N, H, F = B * T, n_head, c_fc_weight.shape[0]
        new = x.new_empty
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32   # gelu'(h)
        # LayerNorm's mean and rstd: (N, 1), fp32 from our kernel (fp32/bf16), else aten's (x's dtype)
        stat = torch.float32 if x.dtype in (torch.float32, torch.bfloat16) else x.dtype
        saved = [new((N, C)), new((N, 1), dtype=stat), new((N, 1), dtype=stat), new((N, 3 * C)),
                 attention_saved_fake(x, B, H, T, C // H), new((N, C)), new((N, C)), new((N, C)),
                 new((N, 1), dtype=stat), new((N, 1), dtype=stat), new((N, F), dtype=acc),
                 new((N, F)), new((1,), dtype=torch.int64)]
        assert len(saved) == _SAVED
        return like(x), saved

    @torch.library.register_fake("fastgpt::transformer_block_backward")
    def _backward_fake(grad_out, saved, x, *weights_and_scalars):
        weights = weights_and_scalars[:12]   # then n_head, dropout_p
        return [like(x)] + [like(t) for t in weights if t is not None]


registry.register("transformer_block", "ext", transformer_block_ext, supports=supports,
                  available=available)
# The C++ block first in every dtype: in float32 on an AVX2 + FMA CPU it is 1.0-1.2x the torch
# block's speed (fwd+bwd, baby and shakespeare-char shapes; it was slower before its attention
# got AVX2-sized tiles). `fastgpt train --exact` pins the torch block and SDPA: nanoGPT's math.
registry.set_default_order("transformer_block", "cpu", ["ext", "torch"])

"""Activation checkpointing: trade compute for memory by recomputing activations in the backward.

Modes (``--activation-checkpointing``):

* ``none``      - every activation the backward needs is kept from the forward;
* ``block``     - each transformer block keeps only its input; the backward runs the block's
                  forward again to rebuild the rest (torch.utils.checkpoint, non-reentrant);
* ``selective`` - the same, but the outputs of the matrix multiplications (and of fused
                  attention kernels) are kept, so the recomputation is only the cheap
                  elementwise work: layer norms, GELU, dropout, residual adds. A block that runs
                  as one custom op (the C++ ``ext`` block on CPU) has no matmul visible to the
                  policy, so there ``selective`` recomputes the whole block, as ``block`` does.

Dropout masks come out the same in the recomputation: torch.utils.checkpoint restores the RNG
state (CPU and the inputs' device) before it reruns the forward. Only training forwards that
record a graph are checkpointed; estimates and sampling run the block as it is.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from fastgpt.errors import FastGPTError

MODES = ("none", "block", "selective")

_aten = torch.ops.aten
# what `selective` keeps: the matmuls and the fused attention kernels (their outputs are what
# costs FLOPs to rebuild; everything else in a block is elementwise or a reduction)
SAVED_OPS = frozenset({
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_cudnn_attention.default,
})


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise FastGPTError(f"unknown --activation-checkpointing {mode!r}; modes are: "
                           f"{', '.join(MODES)}")
    return mode


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_matmuls)


def run(mode: str, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)``, checkpointed as ``mode`` says when the call records a graph."""
    if mode == "none" or not torch.is_grad_enabled():
        return fn(x)
    if mode == "block":
        return checkpoint(fn, x, use_reentrant=False)
    return checkpoint(fn, x, use_reentrant=False, context_fn=_selective_contexts)


def apply(model: torch.nn.Module, mode: str) -> int:
    """Set ``mode`` on every module of ``model`` that checkpoints itself (the GPT's blocks:
    fastgpt.model.Block reads ``recompute``); the number of modules set."""
    check_mode(mode)
    blocks = [m for m in model.modules() if hasattr(m, "recompute")]
    for block in blocks:
        block.recompute = mode
    return len(blocks)


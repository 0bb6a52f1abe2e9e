"""Sampling from a model: ``generate`` (nanoGPT's loop: temperature, top-k) and, for a GPT in eval
mode, incremental decoding with a KV cache: the next-token logits without recomputing what
sampling has seen.

Sampling needs the logits of the last position only. While the context still fits block_size,
each block's keys and values of earlier positions do not change when a token is appended, so
they are kept (the KV cache) and a step runs the new token alone through the blocks. Once the
context is longer than block_size it is cropped to the last block_size tokens, as nanoGPT
does; every position then moves, its position embedding and so all its keys and values with
it, so that window is recomputed in full. Even then only the last block's keys and values are
needed for every position: its queries, attention output and MLP run on the last position only.

Each block runs through the transformer_block op (fastgpt.ops.transformer_block's
``transformer_block_decode``: the model's block with past keys and values, in eval mode), so the
block math is written once and a block backend that decodes serves sampling too. It gives the
same logits as ``model(idx)`` up to rounding (the matmuls see other shapes;
tests/test_sample.py holds it to fastgpt.tools.accuracy's accuracy rule), so sampled tokens
agree with full recomputation. A block backend the user named that cannot decode (the C++
``ext`` block) makes ``generate`` recompute the context for every token instead, as nanoGPT does.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from fastgpt import ops
from fastgpt.errors import FastGPTError
from fastgpt.model import GPT, check_tokens
from fastgpt.ops.transformer_block import decode_unsupported

log = logging.getLogger("fastgpt.generate")


class KVCache:
    """Next-token logits of a GPT in eval mode for a growing sequence of token ids.

    ``logits(idx)`` takes the whole sequence so far (B, T) each time and returns (B, V) for its
    last position. When ``idx`` is one token longer than the previous call's sequence it must
    extend it (as in a sampling loop: the cached positions are counted, not compared); any
    other length recomputes from scratch.
    """

    def __init__(self, model: GPT):
        self.model, self.cfg = model, model.config
        self.weights = [block.weights() for block in model.transformer.h]
        self.kv: list[Optional[tuple]] = [None] * len(self.weights)   # per block: (keys, values)
        self.seen = 0                  # positions whose keys and values self.kv holds

    @torch.no_grad()
    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        cfg, tr = self.cfg, self.model.transformer
        T = idx.shape[1]
        if T > cfg.block_size:        # the cropped window: every position moved, start over
            idx, T, self.seen = idx[:, -cfg.block_size:], cfg.block_size, 0
        # one token more than last time: it alone goes through the blocks
        start = self.seen if 0 < self.seen == T - 1 else 0
        new = idx[:, start:]
        check_tokens(new, cfg.vocab_size, cfg.block_size)
        # the model's embedding op, not weight[new]: on CUDA, check_tokens reads no values and
        # the op's bounds check is what stops a bad token id
        tok = ops.embedding(new, tr.wte.weight, preferred=cfg.embedding)
        x = tok + tr.wpe.weight[start:T]                                     # (B, T', C)
        last = len(self.weights) - 1
        for i, w in enumerate(self.weights):
            x, self.kv[i] = ops.transformer_block_decode(
                x, w, cfg.n_head, past=self.kv[i] if start else None, last_only=i == last,
                attention=cfg.attention, preferred=cfg.transformer_block,
                gelu_approximate=cfg.gelu_approximate)
        self.seen = T
        x = F.layer_norm(x, (cfg.n_embd,), tr.ln_f.weight, tr.ln_f.bias)
        return F.linear(x[:, -1], self.model.lm_head.weight)                 # (B, V)


@torch.no_grad()
def generate(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: Optional[int] = None,
             generator: Optional[torch.Generator] = None,
             vocab_size: Optional[int] = None) -> torch.Tensor:
    """Extend ``idx`` (B, T) by ``max_new_tokens`` sampled tokens; the context fed to the model
    is cropped to its last block_size tokens, as nanoGPT does. ``vocab_size`` (the tokenizer's)
    keeps a model's padding rows (GPT-2's 50,257 padded to 50,304) from ever being drawn."""
    if temperature <= 0:
        raise FastGPTError(f"temperature must be > 0; got {temperature}")
    if top_k is not None and top_k < 1:
        raise FastGPTError(f"top_k must be >= 1; got {top_k}")
    if max_new_tokens < 0:
        raise FastGPTError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    block_size = model.config.block_size
    # a GPT in eval mode keeps its keys and values between tokens (KVCache)
    cache = (KVCache(model) if isinstance(model, GPT) and not model.training and max_new_tokens
             and _decodes(model) else None)
    for _ in range(max_new_tokens):
        if cache is not None:
            logits = cache.logits(idx)
        else:
            logits, _ = model(idx[:, -block_size:])
            logits = logits[:, -1, :]
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        idx = torch.cat([idx, next_tokens(logits, temperature, top_k, generator)], dim=1)
    return idx


def _decodes(model: GPT) -> bool:
    """Whether the model's blocks can decode with a KV cache: no, when the block backend the
    user named (config, use_backends, FASTGPT_BACKENDS) cannot (logged); that backend still runs,
    on the whole context for every token."""
    cfg, tr = model.config, model.transformer
    if not len(tr.h):
        return True
    # metadata only: an input of the dtype and device the blocks see
    reason = decode_unsupported(tr.wpe.weight[None, :1], tr.h[0].weights(), cfg.n_head,
                                attention=cfg.attention, preferred=cfg.transformer_block,
                                gelu_approximate=cfg.gelu_approximate)
    if reason is not None:
        log.info("fastgpt: sampling without a KV cache (every token recomputes the context): "
                 "%s", reason)
    return reason is None


def next_tokens(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token per row (B, 1), drawn from last-position logits (B, V) as nanoGPT draws it."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)

"""The models: the lecture's bigram model and a GPT with nanoGPT's parameter names.

Parameter names follow nanoGPT (``transformer.wte``, ``transformer.h.N.attn.c_attn``, ...) with
the token embedding tied to ``lm_head``, so state dicts interchange with nanoGPT's. The hot ops
(each transformer block, and inside it attention; embedding; cross-entropy) go through
fastgpt.ops, which picks a backend.
Both models return ``(logits, loss)``: with targets, GPT returns the loss and no logits (the
loss op need not materialise them); without targets, logits of the last position only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from fastgpt import ops, recompute
from fastgpt.config import GPTConfig
from fastgpt.errors import FastGPTError


def check_tokens(idx: torch.Tensor, vocab_size: int, block_size: Optional[int]) -> None:
    """Reject input the model cannot embed, with a message naming the offending value."""
    if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
        raise FastGPTError(f"expected token ids of shape (B, T) and dtype int64; got shape "
                           f"{tuple(idx.shape)}, dtype {idx.dtype}")
    if block_size is not None and idx.shape[1] > block_size:
        raise FastGPTError(f"sequence length {idx.shape[1]} exceeds block_size {block_size}; "
                           f"crop the context to the last {block_size} tokens")
    # Value checks read tensor data: skip them while tracing, and on accelerators where they
    # would force a host sync every step (the embedding op there checks bounds itself).
    if not torch.compiler.is_compiling() and idx.device.type == "cpu" and idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise FastGPTError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")


class BigramLanguageModel(nn.Module):
    """Each token reads the logits of the next token straight from a (V, V) table."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.vocab_size)

    def forward(self, idx, targets=None):
        check_tokens(idx, self.config.vocab_size, None)
        logits = ops.embedding(idx, self.token_embedding_table.weight,
                               preferred=self.config.embedding)  # (B, T, V)
        if targets is None:
            return logits[:, -1:, :], None
        B, T, V = logits.shape
        loss = ops.cross_entropy(logits.view(B * T, V), targets.reshape(B * T),
                                 preferred=self.config.cross_entropy)
        return None, loss


class CausalSelfAttention(nn.Module):
    """A block's attention weights (nanoGPT's names); the math is in ops.transformer_block."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)


class MLP(nn.Module):
    """A block's MLP weights (nanoGPT's names); the math is in ops.transformer_block."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)


class Block(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(.)): one fastgpt.ops.transformer_block call.
    ``recompute`` is the activation checkpointing mode (fastgpt.recompute) of training steps."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.recompute = "none"
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def weights(self) -> ops.BlockWeights:
        attn, mlp = self.attn, self.mlp
        return ops.BlockWeights(self.ln_1.weight, self.ln_1.bias, attn.c_attn.weight,
                                attn.c_attn.bias, attn.c_proj.weight, attn.c_proj.bias,
                                self.ln_2.weight, self.ln_2.bias, mlp.c_fc.weight, mlp.c_fc.bias,
                                mlp.c_proj.weight, mlp.c_proj.bias)

    def forward(self, x):
        if self.training and self.recompute != "none":
            return recompute.run(self.recompute, self._block, x)
        return self._block(x)

    def _block(self, x):
        cfg = self.config
        return ops.transformer_block(x, self.weights(), cfg.n_head,
                                     dropout_p=cfg.dropout if self.training else 0.0,
                                     attention=cfg.attention, preferred=cfg.transformer_block,
                                     gelu_approximate=cfg.gelu_approximate)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None):
        cfg = self.config
        check_tokens(idx, cfg.vocab_size, cfg.block_size)
        B, T = idx.shape
        tok = ops.embedding(idx, self.transformer.wte.weight, preferred=cfg.embedding)  # (B, T, C)
        x = self.transformer.drop(tok + self.transformer.wpe.weight[:T])
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None     # (B, 1, V): all that sampling needs
        # the loss head reads fp32 hidden states and weights, so a bf16 model still reports an
        # fp32 loss (under autocast the op multiplies in the autocast dtype all the same)
        loss = ops.linear_cross_entropy(x.reshape(B * T, -1).float(), self.lm_head.weight.float(),
                                        targets.reshape(B * T), preferred=cfg.cross_entropy)
        return None, loss


def build_model(kind: str, config: GPTConfig) -> nn.Module:
    if kind == "gpt":
        return GPT(config)
    if kind == "bigram":
        return BigramLanguageModel(config)
    raise FastGPTError(f"unknown model {kind!r}; models are: gpt, bigram")

"""Model and training configuration, and the named presets.

``baby`` is exactly nanoGPT's documented CPU run of train_shakespeare_char; ``shakespeare-char``
is nanoGPT's GPU char config; ``gpt2-small`` gives GPT-2 124M shapes for benchmarks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from fastgpt.errors import FastGPTError
from fastgpt.ops.registry import canonical_op

GELU_APPROXIMATIONS = ("none", "tanh")   # torch.nn.functional.gelu's `approximate`


@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 65
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False            # biases in Linear and LayerNorm (nanoGPT's train.py default: False)
    # the MLP's GELU: "none" is exact (nanoGPT's nn.GELU()), "tanh" the tanh approximation
    # GPT-2 was trained with (Hugging Face's "gelu_new"; models from fastgpt.pretrained)
    gelu_approximate: str = "none"
    # Backend preferences for the dispatch layer; None lets fastgpt.ops choose.
    attention: Optional[str] = None
    cross_entropy: Optional[str] = None
    embedding: Optional[str] = None
    transformer_block: Optional[str] = None

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise FastGPTError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise FastGPTError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise FastGPTError(f"dropout must be in [0, 1); got {self.dropout}")
        if self.gelu_approximate not in GELU_APPROXIMATIONS:
            raise FastGPTError(f"gelu_approximate must be one of {', '.join(GELU_APPROXIMATIONS)}; "
                               f"got {self.gelu_approximate!r}")


@dataclass
class TrainConfig:
    batch_size: int = 12
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0        # 0 disables clipping
    gradient_accumulation_steps: int = 1
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10

    def __post_init__(self):
        for name in ("batch_size", "eval_interval", "eval_iters", "log_interval",
                     "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise FastGPTError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.max_iters < 0:
            raise FastGPTError(f"max_iters must be >= 0; got {self.max_iters}")
        if self.learning_rate <= 0:
            raise FastGPTError(f"learning_rate must be > 0; got {self.learning_rate}")


PRESETS: dict[str, dict] = {
    "baby": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=False,
        batch_size=12, max_iters=2000, lr_decay_iters=2000, learning_rate=1e-3, min_lr=1e-4,
        warmup_iters=100, beta2=0.99, eval_iters=20, eval_interval=250,
    ),
    "shakespeare-char": dict(
        n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, bias=False,
        batch_size=64, max_iters=5000, lr_decay_iters=5000, learning_rate=1e-3, min_lr=1e-4,
        warmup_iters=100, beta2=0.99, eval_iters=200, eval_interval=250,
    ),
    "gpt2-small": dict(
        n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, dropout=0.0,
        bias=True, batch_size=12, max_iters=600000, lr_decay_iters=600000, learning_rate=6e-4,
        min_lr=6e-5, warmup_iters=2000, beta2=0.95, eval_iters=200, eval_interval=2000,
    ),
}

# The GPTConfig fields holding a backend preference (None: fastgpt.ops chooses), one per op the
# models call; ``cross_entropy`` is the loss op's: the bigram's cross_entropy, GPT's
# linear_cross_entropy.
BACKEND_FIELDS = ("attention", "cross_entropy", "embedding", "transformer_block")


def backend_field(op: str) -> str:
    """The BACKEND_FIELDS entry for an op name or alias (``block``, ``cross-entropy``, ...)."""
    op = canonical_op(op)
    return "cross_entropy" if op == "linear_cross_entropy" else op


def tokens_per_iter(m: GPTConfig, t: TrainConfig) -> int:
    """Tokens one optimizer step trains on: batch x block x accumulation steps."""
    return t.batch_size * m.block_size * t.gradient_accumulation_steps


def default_preset(device_type: str) -> str:
    """The preset `fastgpt train` runs without --preset: nanoGPT's CPU run, or its GPU config."""
    return "shakespeare-char" if device_type == "cuda" else "baby"


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig))
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def preset(name: str, **overrides) -> tuple[GPTConfig, TrainConfig]:
    """The (model, training) configs of a named preset, with field overrides applied."""
    if name not in PRESETS:
        raise FastGPTError(f"unknown preset {name!r}; presets are: {', '.join(PRESETS)}")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(values) - set(MODEL_FIELDS) - set(TRAIN_FIELDS)
    if unknown:
        raise FastGPTError(f"unknown config fields {sorted(unknown)}")
    model = GPTConfig(**{k: v for k, v in values.items() if k in MODEL_FIELDS})
    train = TrainConfig(**{k: v for k, v in values.items() if k in TRAIN_FIELDS})
    return model, train

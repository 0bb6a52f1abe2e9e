"""Text generation from a trained model, and `fastgpt sample` on a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from fastgpt.checkpoint import load_checkpoint
from fastgpt.config import GPTConfig
from fastgpt.data import CharTokenizer
from fastgpt.errors import FastGPTError
from fastgpt.kv_cache import KVCache
from fastgpt.model import GPT, build_model


@torch.no_grad()
def generate(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: Optional[int] = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Extend ``idx`` (B, T) by ``max_new_tokens`` sampled tokens; the context fed to the model
    is cropped to its last block_size tokens, as nanoGPT does."""
    if temperature <= 0:
        raise FastGPTError(f"temperature must be > 0; got {temperature}")
    if top_k is not None and top_k < 1:
        raise FastGPTError(f"top_k must be >= 1; got {top_k}")
    if max_new_tokens < 0:
        raise FastGPTError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    block_size = model.config.block_size
    # a GPT in eval mode keeps its keys and values between tokens (fastgpt.kv_cache)
    cache = (KVCache(model)
             if isinstance(model, GPT) and not model.training and max_new_tokens else None)
    for _ in range(max_new_tokens):
        if cache is not None:
            logits = cache.logits(idx)
        else:
            logits, _ = model(idx[:, -block_size:])
            logits = logits[:, -1, :]
        idx = torch.cat([idx, next_tokens(logits, temperature, top_k, generator)], dim=1)
    return idx


def next_tokens(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token per row (B, 1), drawn from last-position logits (B, V) as nanoGPT draws it."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


@dataclass
class SampleOptions:
    out_dir: str = "out"
    prompt: str = "\n"
    num_samples: int = 1
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: Optional[int] = 200
    seed: int = 1337
    device: str = "auto"


def sample_from_checkpoint(opts: SampleOptions) -> list[str]:
    """Load the run in ``opts.out_dir`` and return ``num_samples`` continuations of the prompt."""
    from fastgpt.train import resolve_device

    if opts.num_samples < 1:
        raise FastGPTError(f"num_samples must be >= 1; got {opts.num_samples}")
    device = resolve_device(opts.device)
    state = load_checkpoint(Path(opts.out_dir))
    tokenizer = CharTokenizer(state["vocab"])
    if not opts.prompt:
        raise FastGPTError("the prompt is empty; give at least one character")
    prompt_ids = tokenizer.encode(opts.prompt)
    model = build_model(state["model_kind"], GPTConfig(**state["model_args"]))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    idx = torch.tensor([prompt_ids] * opts.num_samples, dtype=torch.long, device=device)
    out = generate(model, idx, opts.max_new_tokens, opts.temperature, opts.top_k, gen)
    return [tokenizer.decode(row.tolist()) for row in out]

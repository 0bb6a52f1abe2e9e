"""`fastgpt sample`: text from the model of a run directory's checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from fastgpt.checkpoint import load_checkpoint
from fastgpt.config import GPTConfig
from fastgpt.device import resolve_device
from fastgpt.errors import FastGPTError
from fastgpt.generate import generate
from fastgpt.model import build_model
from fastgpt.run_data import spec_of_checkpoint
from fastgpt.tokenizers import load_tokenizer


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
    if opts.num_samples < 1:
        raise FastGPTError(f"num_samples must be >= 1; got {opts.num_samples}")
    device = resolve_device(opts.device)
    state = load_checkpoint(Path(opts.out_dir))
    tokenizer = load_tokenizer(spec_of_checkpoint(state))   # the run's: characters or BPE
    if not opts.prompt:
        raise FastGPTError("the prompt is empty; give at least one character")
    prompt_ids = tokenizer.encode(opts.prompt)
    if not prompt_ids:
        raise FastGPTError(f"the prompt {opts.prompt!r} encodes to no tokens")
    model = build_model(state["model_kind"], GPTConfig(**state["model_args"]))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    idx = torch.tensor([prompt_ids] * opts.num_samples, dtype=torch.long, device=device)
    out = generate(model, idx, opts.max_new_tokens, opts.temperature, opts.top_k, gen,
                   vocab_size=tokenizer.vocab_size)
    return [tokenizer.decode(row.tolist()) for row in out]

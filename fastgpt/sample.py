"""`fastgpt sample`: text from the model of a run directory's checkpoint, or straight from GPT-2
weights (``init_from``: a Hugging Face folder or a name, see fastgpt.pretrained)."""

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
from fastgpt.pretrained import load_pretrained
from fastgpt.run_data import spec_of_checkpoint
from fastgpt.tokenizers import Tokenizer, load_tokenizer


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
    init_from: Optional[str] = None       # sample from these GPT-2 weights instead of out_dir's


def sample_from_checkpoint(opts: SampleOptions) -> list[str]:
    """Load the run in ``opts.out_dir`` (or the model ``opts.init_from`` names) and return
    ``num_samples`` continuations of the prompt."""
    if opts.num_samples < 1:
        raise FastGPTError(f"num_samples must be >= 1; got {opts.num_samples}")
    device = resolve_device(opts.device)
    model, tokenizer = (_run_model(opts.out_dir) if opts.init_from is None
                        else _pretrained_model(opts.init_from))
    if not opts.prompt:
        raise FastGPTError("the prompt is empty; give at least one character")
    prompt_ids = tokenizer.encode(opts.prompt)
    if not prompt_ids:
        raise FastGPTError(f"the prompt {opts.prompt!r} encodes to no tokens")
    model.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    idx = torch.tensor([prompt_ids] * opts.num_samples, dtype=torch.long, device=device)
    out = generate(model, idx, opts.max_new_tokens, opts.temperature, opts.top_k, gen,
                   vocab_size=tokenizer.vocab_size)
    return [tokenizer.decode(row.tolist()) for row in out]


def _run_model(out_dir: str) -> tuple[torch.nn.Module, Tokenizer]:
    """The model of a run directory's checkpoint and the run's tokenizer."""
    state = load_checkpoint(Path(out_dir))
    tokenizer = load_tokenizer(spec_of_checkpoint(state))   # the run's: characters or BPE
    model = build_model(state["model_kind"], GPTConfig(**state["model_args"]))
    model.load_state_dict(state["model"])
    return model, tokenizer


def _pretrained_model(source: str) -> tuple[torch.nn.Module, Tokenizer]:
    """A converted GPT-2 and its tokenizer: from the source folder's own files where it holds
    them, else from its spec (GPT-2's through tiktoken)."""
    pre = load_pretrained(source)
    if pre.tokenizer is not None:
        return pre.model, pre.tokenizer
    if pre.spec is None:
        raise FastGPTError(f"{source!r} holds no tokenizer (fastgpt_tokenizer.json, vocab.json + "
                           f"merges.txt or tokenizer.json in {str(pre.folder)!r}) and its "
                           f"vocabulary of {pre.source_vocab_size} tokens is not GPT-2's: "
                           f"prompts cannot be encoded")
    return pre.model, load_tokenizer(pre.spec)

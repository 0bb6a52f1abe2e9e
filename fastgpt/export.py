"""`fastgpt export`: a run's GPT as a Hugging Face GPT-2 folder.

``transformers.GPT2LMHeadModel.from_pretrained(folder)`` loads what this writes with no missing
or unexpected keys, and fastgpt's ``--init-from folder`` reads it back:

- ``config.json``: GPT-2's config for the run's shape (``n_positions`` = block_size; GELU
  ``gelu_new`` for GPT-2's tanh approximation, ``gelu`` for fastgpt's exact one; the dropout
  as the run's), the vocabulary the tokenizer's (a padded model's extra rows are dropped:
  nothing samples them) and the end-of-text token as bos/eos.
- ``model.safetensors``: the fp32 weights in Hugging Face's names and layout (Conv1D weights
  transposed to (in, out)); the head is tied to ``wte``, so it is not stored. A run trained
  without biases (``bias=False``, nanoGPT's default) gets zero biases, which GPT-2 needs and
  which change nothing.
- the tokenizer, in forms ``transformers.AutoTokenizer`` loads: a GPT-2-format BPE (GPT-2's own
  or another in its format) as ``vocab.json`` + ``merges.txt`` + ``tokenizer.json``; a trained
  ``bpe:N`` as its ``tokenizer.json``; a character vocabulary as a ``tokenizer.json`` of one
  token per character. ``fastgpt_tokenizer.json`` keeps the run's spec for fastgpt. GPT-2's own
  vocabulary needs tiktoken's files (or ``--tokenizer-file``); without them the model is
  exported and the result says why no tokenizer was written.

Every input is read and every file built before anything is written; each file is written
atomically, and a folder that already holds a model is replaced only with ``overwrite``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from fastgpt.checkpoint import load_checkpoint, write_atomically
from fastgpt.config import GPTConfig
from fastgpt.errors import FastGPTError
from fastgpt.pretrained import (CONV1D, ENDOFTEXT, LAYER_NORM_EPS, SPEC_NAME, bytes_to_unicode,
                                hf_shapes)
from fastgpt.run_data import spec_of_checkpoint
from fastgpt.tokenizers import GPT2_VOCAB_SIZE, Tokenizer, load_tokenizer

MODEL_FILES = ("config.json", "model.safetensors")


@dataclass
class ExportOptions:
    out_dir: str = "out"                   # the run directory holding ckpt.pt
    hf_dir: str = "hf"                     # the Hugging Face folder to write
    tokenizer_file: Optional[str] = None   # GPT-2's vocab.bpe + encoder.json, if tiktoken has none
    overwrite: bool = False


@dataclass
class ExportResult:
    hf_dir: str
    files: list[str]
    vocab_size: int
    notes: list[str] = field(default_factory=list)   # e.g. why no tokenizer files were written


def export(opts: ExportOptions) -> ExportResult:
    """Write the GPT of the run in ``opts.out_dir`` as a Hugging Face GPT-2 folder."""
    state = load_checkpoint(Path(opts.out_dir))
    if state["model_kind"] != "gpt":
        raise FastGPTError(f"the run in {opts.out_dir!r} trained a {state['model_kind']} model; "
                           f"only GPT models export to GPT-2's layout")
    cfg = GPTConfig(**state["model_args"])
    spec = spec_of_checkpoint(state)
    notes = []
    try:
        tokenizer = _spec_tokenizer(spec, opts.tokenizer_file)
    except FastGPTError as e:   # GPT-2's own vocabulary, offline without its files
        tokenizer = None
        notes.append(f"no tokenizer files written: {e}")
    vocab = tokenizer.vocab_size if tokenizer is not None else GPT2_VOCAB_SIZE
    eot = tokenizer.eot_id if tokenizer is not None else GPT2_VOCAB_SIZE - 1
    files = {"config.json": _json(hf_config(cfg, vocab, eot))}
    if tokenizer is not None:
        files.update(tokenizer_files(tokenizer, cfg.block_size))
    files[SPEC_NAME] = _json({k: v for k, v in spec.items() if k != "file"})
    tensors = hf_tensors(state["model"], cfg, vocab)
    written = write_folder(Path(opts.hf_dir), files, tensors, opts.overwrite)
    return ExportResult(opts.hf_dir, written, vocab, notes)


def save_hf(model: torch.nn.Module, folder: str | Path, *, vocab_size: Optional[int] = None,
            eot_id: Optional[int] = None, overwrite: bool = False) -> list[str]:
    """Write a fastgpt GPT as a Hugging Face GPT-2 folder (config.json + model.safetensors, no
    tokenizer); ``vocab_size``: the rows to keep (a padded model's real vocabulary)."""
    cfg = model.config
    vocab = vocab_size or cfg.vocab_size
    files = {"config.json": _json(hf_config(cfg, vocab, eot_id))}
    return write_folder(Path(folder), files, hf_tensors(model.state_dict(), cfg, vocab), overwrite)


def _spec_tokenizer(spec: dict, tokenizer_file: Optional[str]) -> Tokenizer:
    return load_tokenizer(spec, tokenizer_file if spec.get("kind") == "gpt2" else None)


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def hf_config(cfg: GPTConfig, vocab_size: int, eot_id: Optional[int]) -> dict:
    """GPT-2's config.json for a fastgpt GPTConfig (see the module docstring)."""
    if vocab_size > cfg.vocab_size:
        raise FastGPTError(f"the tokenizer has {vocab_size} tokens, more than the model's "
                           f"vocabulary of {cfg.vocab_size}")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new" if cfg.gelu_approximate == "tanh" else "gelu",
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS, "initializer_range": 0.02,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "dtype": "float32",
    }


def hf_tensors(state: dict[str, torch.Tensor], cfg: GPTConfig,
               vocab_size: int) -> dict[str, torch.Tensor]:
    """A fastgpt GPT state dict -> Hugging Face GPT-2 tensors (``transformer.`` names, Conv1D
    weights (in, out), zero biases where the model has none), fp32 and contiguous."""
    shapes = hf_shapes(dict(n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab_size=vocab_size,
                            n_positions=cfg.block_size))
    out = {}
    for key, shape in shapes.items():
        t = state.get(f"transformer.{key}")
        if t is None:   # a bias of a bias=False model: GPT-2's layers always add one
            if not key.endswith(".bias"):
                raise FastGPTError(f"the model has no tensor transformer.{key}")
            t = torch.zeros(shape)
        t = t.detach().float().cpu()
        if key.endswith(CONV1D):
            t = t.t()                                   # nn.Linear's (out, in) -> (in, out)
        if key == "wte.weight":
            t = t[:vocab_size]                          # padding rows: never sampled, dropped
        if tuple(t.shape) != shape:
            raise FastGPTError(f"tensor {key!r} has shape {tuple(t.shape)} in the model; GPT-2's "
                               f"layout needs {shape}")
        out[f"transformer.{key}"] = t.contiguous().clone()
    return out


# --- tokenizers ---------------------------------------------------------------------------------

def tokenizer_files(tokenizer: Tokenizer, block_size: int) -> dict[str, bytes]:
    """The files that make ``tokenizer`` loadable by transformers.AutoTokenizer."""
    kind = tokenizer.spec["kind"]
    special = {"model_max_length": block_size}
    if tokenizer.eot_id is not None:
        special.update(bos_token=ENDOFTEXT, eos_token=ENDOFTEXT)
    if kind == "gpt2":
        vocab, merges = gpt2_vocab_and_merges(tokenizer.encoding._mergeable_ranks)
        vocab[ENDOFTEXT] = tokenizer.eot_id
        hf = _byte_level_bpe(vocab, merges)
        return {"vocab.json": _json(vocab),
                "merges.txt": ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
                .encode("utf-8"),
                "tokenizer.json": hf.to_str().encode("utf-8"),
                "tokenizer_config.json": _json({"tokenizer_class": "GPT2Tokenizer",
                                                "unk_token": ENDOFTEXT, **special,
                                                "add_prefix_space": False})}
    if kind == "bpe":
        text = tokenizer.spec["json"]
    else:   # char: one token per character, decoded by joining them
        hf = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(tokenizer.chars)},
                                    merges=[]))
        hf.decoder = decoders.Fuse()
        text = hf.to_str()
    return {"tokenizer.json": text.encode("utf-8"),
            "tokenizer_config.json": _json({"tokenizer_class": "PreTrainedTokenizerFast",
                                            **special})}


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> HFTokenizer:
    """GPT-2's tokenizer as Hugging Face ``tokenizers`` builds it: byte-level BPE, GPT-2's
    regex, no prefix space, ``<|endoftext|>`` special."""
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.add_special_tokens([AddedToken(ENDOFTEXT, special=True)])
    return hf


def gpt2_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int],
                                                            list[tuple[str, str]]]:
    """A GPT-2-format rank table -> vocab.json's {token: id} and merges.txt's pairs, in rank
    order: each token of several bytes is the merge of the two parts BPE with the lower ranks
    splits it into (tiktoken keeps ranks only; GPT-2's files keep the merges)."""
    char = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(char[b] for b in token)
    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        vocab[text(token)] = rank
        if len(token) > 1:
            parts = _bpe_parts(ranks, token, rank)
            if len(parts) != 2:
                raise FastGPTError(f"token {token!r} (rank {rank}) is not the merge of two "
                                   f"tokens of lower rank; the rank table is not a BPE")
            merges.append((text(parts[0]), text(parts[1])))
    return vocab, merges


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """``token`` split into bytes and merged, lowest rank first, with ranks below max_rank."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        pairs = [(ranks.get(a + b, max_rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank >= max_rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


# --- writing --------------------------------------------------------------------------------------

def write_folder(folder: Path, files: dict[str, bytes], tensors: dict[str, torch.Tensor],
                 overwrite: bool) -> list[str]:
    """Write the files and model.safetensors into ``folder``, each atomically; returns the
    names written."""
    if folder.exists() and not folder.is_dir():
        raise FastGPTError(f"{str(folder)!r} exists and is not a folder")
    held = [n for n in MODEL_FILES if (folder / n).exists()]
    if held and not overwrite:
        raise FastGPTError(f"{str(folder)!r} already holds a model ({', '.join(held)}); pass "
                           f"--overwrite to replace it, or choose another folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            write_atomically(folder / name, lambda f, data=data: f.write(data))
        tmp = folder / f".model.safetensors.tmp-{os.getpid()}"
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, folder / "model.safetensors")
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise FastGPTError(f"cannot write {str(folder)!r}: {e.strerror or e}") from None
    return sorted([*files, "model.safetensors"])

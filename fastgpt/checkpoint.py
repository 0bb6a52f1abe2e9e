"""Checkpoints that lose nothing: atomic writes and safe, validated loads.

A checkpoint is written to a temporary file in the same directory, fsynced and renamed over the
old one, so a crash at any moment leaves either the old or the new file, never half of one.
Loading uses ``weights_only=True``: a checkpoint holds tensors and plain data and can never run
code. Keys follow nanoGPT's (``model``, ``optimizer``, ``model_args``, ``iter_num``,
``best_val_loss``) so the model weights interchange with nanoGPT.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from fastgpt.errors import FastGPTError

CHECKPOINT_NAME = "ckpt.pt"
FORMAT = "fastgpt-checkpoint-1"
REQUIRED_KEYS = ("format", "model", "model_kind", "model_args", "train_args", "iter_num")


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Run ``write`` on a temporary file beside ``path``, fsync it and rename it over ``path``:
    a crash at any moment leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # make the rename itself durable
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | Path, state: dict) -> None:
    write_atomically(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint file ``path``, or the one in the run directory ``path``."""
    path = Path(path)
    if path.is_dir() or (path.name != CHECKPOINT_NAME and not path.exists()):
        path = path / CHECKPOINT_NAME   # a run directory, even one that does not exist (yet)
    if not path.exists():
        raise FastGPTError(f"no checkpoint at {str(path)!r}; train first (fastgpt train "
                           f"--out-dir {str(path.parent)!r}) or point --out-dir at a run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, disallowed globals: all mean "not usable"
        raise FastGPTError(f"checkpoint {str(path)!r} is truncated or corrupt and cannot be "
                           f"loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise FastGPTError(f"{str(path)!r} is not a fastgpt checkpoint (format "
                           f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}, "
                           f"expected {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if "tokenizer" not in state and "vocab" not in state:   # before token shards: "vocab" alone
        missing.append("tokenizer")
    if missing:
        raise FastGPTError(f"checkpoint {str(path)!r} lacks {missing}; it is incomplete")
    return state

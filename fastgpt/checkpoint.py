"""Checkpoints that lose nothing: atomic writes and safe, validated loads.

A checkpoint is written to a temporary file in the same directory, fsynced and renamed over the
old one, so a crash at any moment leaves either the old or the new file, never half of one.
Loading uses ``weights_only=True``: a checkpoint holds tensors and plain data and can never run
code. Keys follow nanoGPT's (``model``, ``optimizer``, ``model_args``, ``iter_num``,
``best_val_loss``) so the model weights interchange with nanoGPT.

A run trained with ``--fsdp`` keeps its checkpoint as a sharded directory instead, ``ckpt.dcp``
(written by fastgpt.sharded_checkpoint: each rank's shards in torch.distributed.checkpoint's
format, the rest of the state in ``fastgpt.pt``). ``load_checkpoint`` reads either: a sharded
one is consolidated into the single-file form in this process (no process group needed), so
sampling, export and a single-process or DDP resume read both alike.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import torch

from fastgpt.errors import FastGPTError

CHECKPOINT_NAME = "ckpt.pt"
SHARDED_NAME = "ckpt.dcp"      # a link to the current sharded checkpoint's directory
META_NAME = "fastgpt.pt"       # a sharded checkpoint's state besides model and optimizer
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


def checkpoint_in(out_dir: str | Path) -> Optional[Path]:
    """The checkpoint a run directory holds: ckpt.dcp (sharded), ckpt.pt, or None."""
    out_dir = Path(out_dir)
    for name in (SHARDED_NAME, CHECKPOINT_NAME):
        if (out_dir / name).exists():
            return out_dir / name
    return None


def load_checkpoint(path: str | Path, consolidate: bool = True) -> dict:
    """The checkpoint ``path`` (ckpt.pt or ckpt.dcp), or the one in the run directory ``path``.

    A sharded checkpoint comes consolidated (full tensors, the optimizer keyed by index as
    torch.optim's state_dict is), or, with ``consolidate=False``, without ``model`` and
    ``optimizer`` and with ``sharded``: its directory, for fastgpt.sharded_checkpoint to load.
    """
    path = Path(path)
    if path.name != SHARDED_NAME and path.is_dir():
        path = checkpoint_in(path) or path / CHECKPOINT_NAME
    elif path.name not in (CHECKPOINT_NAME, SHARDED_NAME) and not path.exists():
        path = path / CHECKPOINT_NAME   # a run directory that does not exist (yet)
    if not path.exists():
        raise FastGPTError(f"no checkpoint at {str(path)!r}; train first (fastgpt train "
                           f"--out-dir {str(path.parent)!r}) or point --out-dir at a run")
    if path.name == SHARDED_NAME:
        state = _load_file(path / META_NAME)
        state["sharded"] = str(path)
        if consolidate:
            state.update(_consolidate(path))
    else:
        state = _load_file(path)
    return _checked(state, path)


def _load_file(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, disallowed globals: all mean "not usable"
        raise FastGPTError(f"checkpoint {str(path)!r} is truncated or corrupt and cannot be "
                           f"loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise FastGPTError(f"{str(path)!r} is not a fastgpt checkpoint (format "
                           f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}, "
                           f"expected {FORMAT!r})")
    return state


def _checked(state: dict, path: Path) -> dict:
    # a sharded checkpoint read without consolidating holds no model: its shards hold it
    unread = {"model"} if "sharded" in state and "model" not in state else set()
    missing = [k for k in REQUIRED_KEYS if k not in state and k not in unread]
    if "tokenizer" not in state and "vocab" not in state:   # before token shards: "vocab" alone
        missing.append("tokenizer")
    if missing:
        raise FastGPTError(f"checkpoint {str(path)!r} lacks {missing}; it is incomplete")
    return state


def _consolidate(path: Path) -> dict:
    """A sharded checkpoint's model and optimizer as full tensors, in this process."""
    # imported here: torch.distributed.checkpoint takes over a second to import
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory(prefix="fastgpt-dcp-") as tmp:
        try:
            dcp_to_torch_save(path, Path(tmp) / "full.pt")
        except Exception as e:   # a missing .metadata or shard file
            raise FastGPTError(f"sharded checkpoint {str(path)!r} cannot be read "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        full = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)
    return {"model": full["model"], "optimizer": optimizer_by_index(full["optimizer"])}


def optimizer_by_index(state: dict) -> dict:
    """An optimizer state dict keyed by parameter name (torch.distributed.checkpoint's form) in
    torch.optim's form, keyed by the parameter's position over the groups."""
    index = {name: i for i, name in
             enumerate(n for g in state["param_groups"] for n in g["params"])}
    return {"state": {index[name]: v for name, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                             for g in state["param_groups"]]}

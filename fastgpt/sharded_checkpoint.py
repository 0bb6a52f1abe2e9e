"""Sharded checkpoints of ``--fsdp`` runs, in torch.distributed.checkpoint's (DCP) format.

Every rank writes its own shards of the model and the optimizer state (no rank ever holds the
whole model); rank 0 adds ``fastgpt.pt``, the rest of the run's state (iteration, configuration,
tokenizer, RNG streams, scaler), which is small. The run directory's ``ckpt.dcp`` is a link to
the current checkpoint's directory (``.ckpt.dcp.<iteration>.<id>``):

1. all ranks write the new checkpoint into a fresh directory;
2. rank 0 writes fastgpt.pt there (atomically), then swaps the link to it with one rename;
3. the previous directory is removed.

A crash before step 2 leaves the link on the previous checkpoint, which stays loadable; a crash
after it leaves the new one. DCP reshards on load, so a checkpoint written by N ranks resumes
under M; fastgpt.checkpoint.load_checkpoint consolidates one in a single process (sampling,
export, a single-process or DDP resume).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fastgpt import distributed
from fastgpt.checkpoint import (CHECKPOINT_NAME, FORMAT, META_NAME, SHARDED_NAME,
                                write_atomically)

PREFIX = f".{SHARDED_NAME}."
# torch.distributed.checkpoint is imported where it is used: importing it takes over a second,
# which every run paid at start-up, sharded or not


def save_sharded(out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 meta: dict, world: distributed.World) -> None:
    """Write the sharded checkpoint of iteration ``meta["iter_num"]``; every rank calls this."""
    name = distributed.all_gather(f"{PREFIX}{meta['iter_num']:08d}.{time.time_ns():x}",
                                  world)[0]   # rank 0's name, on every rank
    target = out_dir / name
    model_state, optimizer_state = _state(model, optimizer)
    import torch.distributed.checkpoint as dcp
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=target)
    if world.is_main:
        write_atomically(target / META_NAME, lambda f: torch.save({"format": FORMAT, **meta}, f))
        _point_at(out_dir, name)
        (out_dir / CHECKPOINT_NAME).unlink(missing_ok=True)   # superseded by this one
        remove_stale(out_dir, keep=name)
    dist.barrier()


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The sharded model's and optimizer's state dicts (parameter names as keys)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    fresh = not optimizer.state
    model_state, optimizer_state = get_state_dict(model, optimizer)
    if fresh:
        # before the first step, get_state_dict creates the state by a step with zero gradients
        # and learning rate 0, which counts as a step in AdamW's bias correction: undo it, so
        # the optimizer and the checkpoint hold a state equal to a fresh one (zero moments,
        # step 0)
        optimizer.state.clear()
        for state in optimizer_state["state"].values():
            if "step" in state:
                state["step"] = torch.zeros_like(state["step"])
    return model_state, optimizer_state


def _point_at(out_dir: Path, name: str) -> None:
    """Make ``ckpt.dcp`` a link to ``name`` with one rename (atomic)."""
    link = out_dir / SHARDED_NAME
    if link.is_dir() and not link.is_symlink():   # a copy that followed the link: set it aside
        link.rename(out_dir / f"{PREFIX}copied.{time.time_ns():x}")
    tmp = out_dir / f".{SHARDED_NAME}.link-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(name, tmp)
    os.replace(tmp, link)
    dir_fd = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale(out_dir: Path, keep: str | None = None) -> None:
    """Remove the sharded checkpoint directories other than ``keep`` (None: all of them, and
    the link): those a crash left half written, and those superseded."""
    if keep is None:
        (out_dir / SHARDED_NAME).unlink(missing_ok=True)
    for path in out_dir.glob(f"{PREFIX}*"):
        if path.name != keep and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def load_sharded(path: str | Path, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint into a sharded model and its optimizer (every rank calls this;
    DCP reads each rank's part, whatever the world size that wrote it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=Path(path).resolve())
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def load_full_optimizer(state: dict, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> None:
    """Load a single-file checkpoint's optimizer state (keyed by index, full tensors) into the
    optimizer of a sharded model: each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_optimizer_state_dict)
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for g in optimizer.param_groups for p in g["params"]]
    by_name = {"state": {order[i]: v for i, v in state["state"].items()},
               "param_groups": [{**g, "params": [order[i] for i in g["params"]]}
                                for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=by_name,
                             options=StateDictOptions(full_state_dict=True))

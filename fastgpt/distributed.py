"""Multi-process training on PyTorch's distributed engine, as launched by torchrun.

fastgpt never starts processes or invents a rendezvous: ``torchrun --nproc_per_node=N -m fastgpt
train ...`` sets RANK, LOCAL_RANK and WORLD_SIZE, and this module joins the process group those
name (NCCL on CUDA, gloo on CPU), puts each rank on its own GPU (cuda:LOCAL_RANK), and offers the
few collectives the training loop needs. With WORLD_SIZE unset or 1 everything here is a no-op and
training runs exactly as a plain single process.

How a global batch splits: ``batch_size`` is the global number of sequences per micro-step, for
any number of ranks. Every rank draws the same global batch from one generator seeded by the run's
seed and keeps its contiguous slice of ``batch_size // world_size`` rows, so a one-process run with
the same settings sees exactly the union of the ranks' batches, and the learning-rate schedule,
tokens per step and loss curve do not depend on the world size. ``gradient_accumulation_steps``
is not split: every rank runs all micro-steps (DDP's all-reduce is skipped with ``no_sync`` on all
but the last one).

Failure: an exception on one rank tears down this process (the process group is destroyed on the
way out and the exit status is non-zero), and torchrun then stops the other ranks. Decisions that
must be the same on every rank (a NaN loss, the val loss) are taken on all-reduced values, so all
ranks stop together at the same iteration.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import os
import traceback
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from fastgpt.errors import FastGPTError

# A rank that waits this long in a collective gives up (torch's NCCL default; gloo's is 30 min).
TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    """Where this process stands among the ranks torchrun started."""
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """The ranks torchrun set up (RANK, LOCAL_RANK, WORLD_SIZE); a single process without it."""
    def read(name: str, default: int) -> int:
        value = os.environ.get(name)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except ValueError:
            raise FastGPTError(f"environment variable {name}={value!r} is not an integer; "
                               f"launch with torchrun, which sets it") from None

    size = read("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    rank, local_rank = read("RANK", -1), read("LOCAL_RANK", -1)
    if not 0 <= rank < size or local_rank < 0:
        raise FastGPTError(f"WORLD_SIZE={size} but RANK={os.environ.get('RANK')!r}, LOCAL_RANK="
                           f"{os.environ.get('LOCAL_RANK')!r}; launch with torchrun, which sets "
                           f"all three")
    return World(rank=rank, local_rank=local_rank, size=size)


def rank_device(device: torch.device, world: World) -> torch.device:
    """Each rank's device: cuda:LOCAL_RANK on CUDA, the CPU otherwise."""
    if not world.enabled or device.type != "cuda":
        return device
    if device.index is not None:
        raise FastGPTError(f"--device {device} names one GPU, but under torchrun each rank uses "
                           f"cuda:LOCAL_RANK; pass --device cuda (or auto) and choose GPUs with "
                           f"CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise FastGPTError(f"LOCAL_RANK {world.local_rank} needs GPU {world.local_rank}, but "
                           f"{count} GPU(s) are visible; use --nproc_per_node <= {count}")
    return torch.device("cuda", world.local_rank)


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the duration of a run and always leave it.

    Leaving on an exception matters: the process then exits non-zero at once, which is torchrun's
    signal to stop every other rank instead of leaving them waiting in a collective.
    """
    if not world.enabled:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    try:
        yield
    except BaseException as e:
        # The failed run's frames still hold its DDP model. Free it while the group exists: if
        # DDP's reducer held the last reference, gloo's teardown would wait, holding the GIL, for
        # a worker thread that needs the GIL to drop an in-flight all-reduce (a hang at exit).
        traceback.clear_frames(e.__traceback__)
        gc.collect()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def rank_rows(batch_size: int, world: World) -> slice:
    """This rank's rows of a global batch of ``batch_size`` sequences."""
    if batch_size % world.size:
        lower = batch_size - batch_size % world.size
        raise FastGPTError(f"--batch-size {batch_size} is the global batch per micro-step and must "
                           f"split evenly over the {world.size} ranks (WORLD_SIZE); use a "
                           f"multiple of {world.size}, e.g. {max(lower, world.size)} or "
                           f"{lower + world.size}")
    per_rank = batch_size // world.size
    return slice(world.rank * per_rank, (world.rank + 1) * per_rank)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A seed for one rank's own randomness (dropout), distinct for every (seed, rank, step)."""
    digest = hashlib.sha256(f"fastgpt:{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1   # fits torch.manual_seed's int64


def mean(t: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of ``t`` over all ranks (``t`` itself in a single process). Every rank gets it."""
    if not world.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / world.size


def all_gather(obj: Any, world: World) -> list:
    """One picklable object from every rank, in rank order, on every rank."""
    if not world.enabled:
        return [obj]
    out: list = [None] * world.size
    dist.all_gather_object(out, obj)
    return out

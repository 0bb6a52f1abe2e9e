"""Training data from token shards (llm.c's format, what ``fastgpt prepare`` writes): random
windows of block_size + 1 tokens drawn across memory-mapped shards.

- ``--data`` names a prepared directory (its ``*_train_*.bin`` / ``*_val_*.bin`` and meta.json)
  or a glob pattern of ``.bin`` shards (llm.c's and modded-nanogpt's FineWeb shards, which come
  without meta.json: version-1 shards imply GPT-2's tokenizer, fastgpt.tokenizers.infer_spec).
- A window lies inside one shard. Starts are uniform over every window of every shard of the
  split: the i-th start of the shards' concatenated window ranges, found by a binary search,
  drawn from the run's batch generator, so the data order is fixed by the seed and a checkpoint
  (which holds the generator's state) resumes it bit for bit.
- Memory and speed: a window is read with one ``os.pread`` from the shard's file (each shard's
  header checked and its file opened once), never through a long-lived memory map, so no pages
  the run touched stay mapped (nanoGPT's fix for its loader's growing memory: it re-creates its
  memmap per batch): resident memory does not grow with the corpus, and a batch costs a few
  system calls instead of a map per shard.
- Evaluation uses fixed windows: a generator seeded per split, the same at every evaluation,
  so successive val losses compare the model, not the windows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fastgpt.errors import FastGPTError
from fastgpt.shards import (HEADER_BYTES, find_shards, open_shard, read_meta, shard_format,
                            shard_token_count)

def is_shard_data(data: str | None) -> bool:
    """Whether ``--data`` names token shards (a directory or a .bin pattern), not a text file."""
    return data is not None and (Path(data).is_dir() or data.endswith(".bin"))


def data_spec(data: str, shards: dict[str, list[Path]]) -> dict:
    """The tokenizer spec of the shards: meta.json's, else the one their format implies."""
    folder = Path(data) if Path(data).is_dir() else Path(data).parent
    meta = read_meta(folder)
    if meta is not None and "tokenizer" in meta:
        return meta["tokenizer"]
    first = (shards["train"] + shards["val"])[0]
    # version 1 holds uint16 tokens: GPT-2's vocabulary, as llm.c and modded-nanogpt write it
    if shard_format(first) == 1:
        return {"kind": "gpt2"}
    raise FastGPTError(f"no meta.json beside {data!r} says which tokenizer made its shards, and "
                       f"their uint32 tokens (version 2) imply none fastgpt knows; prepare the "
                       f"corpus with `fastgpt prepare`")


class ShardDataset:
    """Random windows from the train and val shards of ``data`` (see the module docstring)."""

    fixed_eval_windows = True
    EVAL_SEED = {"train": 1000, "val": 1001}   # the generators of the fixed evaluation windows

    def __init__(self, data: str, block_size: int):
        shards = find_shards(data)
        need = block_size + 1
        self.paths: dict[str, list[Path]] = {}
        self.ends: dict[str, torch.Tensor] = {}     # cumulative window counts per shard
        for split, paths in shards.items():
            windows = [(p, shard_token_count(p) - block_size) for p in paths]
            usable = [(p, n) for p, n in windows if n > 0]
            if not usable:
                raise FastGPTError(
                    f"{data!r} has no {split} shard of at least {need} tokens (block_size + 1)"
                    + (f"; its {len(paths)} {split} shard(s) are shorter: use a smaller "
                       f"--block-size" if paths else
                       f": name {split} shards too (<prefix>_{split}_NNNNNN.bin)"))
            self.paths[split] = [p for p, _ in usable]
            self.ends[split] = torch.tensor([n for _, n in usable]).cumsum(0)
        self.block_size = block_size
        self._files: dict[Path, tuple[int, np.dtype]] = {}   # shard -> (descriptor, token dtype)

    def _file(self, path: Path) -> tuple[int, np.dtype]:
        """The shard's open file and token dtype; the first use checks the whole file's format
        (open_shard: header, size) once."""
        if path not in self._files:
            dtype = open_shard(path).dtype      # checks header and size; the map is dropped
            self._files[path] = (os.open(path, os.O_RDONLY), dtype)
        return self._files[path]

    def batch(self, split: str, batch_size: int, generator: torch.Generator,
              device: torch.device | str = "cpu",
              rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T) and next-token targets y (B, T) from random windows; ``rows`` keeps a rank's
        share while the generator draws the whole batch (as fastgpt.data.TextDataset)."""
        ends = self.ends[split]
        starts = torch.randint(int(ends[-1]), (batch_size,), generator=generator)[rows]
        shard = torch.searchsorted(ends, starts, right=True)
        offsets = starts - torch.where(shard > 0, ends[(shard - 1).clamp(min=0)], 0)
        n = self.block_size + 1
        windows = np.empty((len(starts), n), dtype=np.int64)
        for row, (s, offset) in enumerate(zip(shard.tolist(), offsets.tolist())):
            fd, dtype = self._file(self.paths[split][s])
            size = n * dtype.itemsize
            windows[row] = np.frombuffer(os.pread(fd, size, HEADER_BYTES + offset * dtype.itemsize),
                                         dtype=dtype)
        window = torch.from_numpy(windows)
        x, y = window[:, :-1], window[:, 1:]
        if torch.device(device).type == "cuda":
            return (x.pin_memory().to(device, non_blocking=True),
                    y.pin_memory().to(device, non_blocking=True))
        return x.contiguous(), y.contiguous()

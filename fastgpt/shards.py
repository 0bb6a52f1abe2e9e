"""Token shards in llm.c's format, so FineWeb shards from llm.c and modded-nanogpt load as they are.

A shard is a header of 256 little-endian int32 (1024 bytes): [0] the magic 20240520, [1] the
version, [2] the token count, the rest zero; then the tokens, little-endian: version 1 = uint16
(vocabularies up to 65,536, GPT-2's 50,257 among them), version 2 = uint32 (larger ones; llm.c
writes LLaMA-3's so). Shards are read through a read-only memmap: resident memory never grows
with the corpus. ``fastgpt prepare`` names them ``<prefix>_val_NNNNNN.bin`` and
``<prefix>_train_NNNNNN.bin`` (llm.c's and modded-nanogpt's ``fineweb_train_000001.bin``) beside a
``meta.json`` that names the tokenizer.

A shard is written under a temporary hidden name in its folder and renamed when complete, so no
half-written shard ever carries a ``.bin`` name. This module stays a leaf (numpy and
fastgpt.errors only): fastgpt.data builds on it.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np

from fastgpt.errors import FastGPTError

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}   # version -> token dtype
MAX_VOCAB = {version: 1 << (8 * dtype.itemsize) for version, dtype in TOKEN_DTYPES.items()}
META_NAME = "meta.json"


def shard_version(vocab_size: int) -> int:
    """The format version whose token type holds ids ``0 .. vocab_size - 1``."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) \
            or vocab_size < 1:
        raise FastGPTError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    for version in sorted(TOKEN_DTYPES):
        if vocab_size <= MAX_VOCAB[version]:
            return version
    raise FastGPTError(f"a vocabulary of {vocab_size:,} tokens does not fit llm.c's shard format "
                       f"(uint32 tokens: at most {MAX_VOCAB[2]:,})")


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Write ``tokens`` (a 1-D integer array, each in ``[0, vocab_size)``) as a shard at ``path``."""
    path = Path(path)
    version = shard_version(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise FastGPTError(f"a shard holds a non-empty 1-D array of integer token ids, got "
                           f"shape {tokens.shape} of {tokens.dtype} for {path}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise FastGPTError(f"token id {bad} is outside the vocabulary of {vocab_size} tokens "
                           f"(ids 0..{vocab_size - 1}); not writing {path}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, version, tokens.size)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            # no copy when the buffer already holds the token type (prepare's does)
            tokens.astype(TOKEN_DTYPES[version], copy=False).tofile(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:   # an interrupt included: never leave the temporary file behind
        tmp.unlink(missing_ok=True)
        raise


def _read_header(path: Path) -> tuple[int, int, int]:
    """(version, token count, file size) of a shard, each checked; FastGPTError names the file."""
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file"
        raise FastGPTError(f"token shard {str(path)!r} {what}")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise FastGPTError(f"token shard {str(path)!r} is {size} bytes, shorter than the "
                           f"{HEADER_BYTES}-byte header of llm.c's format")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, count = (int(v) for v in header[:3])
    if magic != MAGIC:
        raise FastGPTError(f"token shard {str(path)!r} has magic number {magic} in its header, "
                           f"not llm.c's {MAGIC}: it is not a token shard")
    if version not in TOKEN_DTYPES:
        raise FastGPTError(f"token shard {str(path)!r} has format version {version}; "
                           f"known versions: 1 (uint16 tokens), 2 (uint32 tokens)")
    if count <= 0:
        raise FastGPTError(f"token shard {str(path)!r} holds no tokens (count {count} "
                           f"in its header)")
    return version, count, size


def shard_token_count(path: str | Path) -> int:
    """The number of tokens a shard holds, read from its header alone."""
    return _read_header(Path(path))[1]


def shard_format(path: str | Path) -> int:
    """A shard's format version (1: uint16 tokens, 2: uint32), read from its header alone."""
    return _read_header(Path(path))[0]


def open_shard(path: str | Path) -> np.memmap:
    """The tokens of a shard as a read-only memmap (uint16 for version 1, uint32 for 2)."""
    path = Path(path)
    version, count, size = _read_header(path)
    dtype = TOKEN_DTYPES[version]
    expected = HEADER_BYTES + count * dtype.itemsize
    if size != expected:
        raise FastGPTError(
            f"token shard {str(path)!r} is {size:,} bytes, but its header promises {count:,} "
            f"{dtype.name} tokens = {expected:,} bytes: the file is "
            f"{'truncated' if size < expected else 'longer than its header says'}")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def find_shards(data: str | Path) -> dict[str, list[Path]]:
    """{"train": [...], "val": [...]} shard paths, sorted, from a directory (its
    ``*_train_*.bin`` and ``*_val_*.bin``) or a glob pattern of ``.bin`` files, where a name
    holding ``_val_`` is validation and any other training. A split may be empty (a pattern of
    train shards alone): the caller decides; no shard at all is an error."""
    text = str(data)
    if Path(text).is_dir():
        folder = Path(text)
        found = {"train": sorted(folder.glob("*_train_*.bin")),
                 "val": sorted(folder.glob("*_val_*.bin"))}
    else:
        matches = sorted(Path(p) for p in glob.glob(text) if p.endswith(".bin"))
        found = {"train": [p for p in matches if "_val_" not in p.name],
                 "val": [p for p in matches if "_val_" in p.name]}
    if not found["train"] and not found["val"]:
        raise FastGPTError(
            f"no token shards at {text!r}: give a directory holding <prefix>_train_NNNNNN.bin "
            f"and <prefix>_val_NNNNNN.bin shards (fastgpt prepare writes them), or a glob "
            f"pattern of .bin files such as 'fineweb10B/fineweb_train_*.bin'")
    return found


def read_meta(directory: str | Path) -> dict | None:
    """The ``meta.json`` that ``fastgpt prepare`` writes beside its shards, or None without one
    (llm.c's and modded-nanogpt's shards come without)."""
    path = Path(directory) / META_NAME
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FastGPTError(f"{str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise FastGPTError(f"{str(path)!r} holds a {type(meta).__name__}, not a JSON object")
    return meta

"""llm.c's token shard format: round trips, a shard from an independent writer, bad files."""

import os

import numpy as np
import pytest

from fastgpt import shards
from fastgpt.errors import FastGPTError
from fastgpt.shards import (MAGIC, find_shards, open_shard, read_meta, shard_token_count,
                            shard_version, write_shard)


def _independent_shard(path, tokens, version=1, magic=MAGIC, count=None):
    """llm.c's layout written by hand: 256 int32 (magic, version, count), then the tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1] = magic, version
    header[2] = len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16 if version == 1 else np.uint32).tobytes())


@pytest.mark.parametrize("vocab_size,version,dtype", [(65, 1, np.uint16), (50257, 1, np.uint16),
                                                      (65536, 1, np.uint16),
                                                      (65537, 2, np.uint32),
                                                      (128256, 2, np.uint32)])
def test_round_trip_picks_the_version_from_the_vocabulary(tmp_path, vocab_size, version, dtype):
    tokens = np.random.default_rng(0).integers(0, vocab_size, 1001)
    tokens[0] = vocab_size - 1
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, tokens, vocab_size)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [MAGIC, version, 1001] and not header[3:].any()
    got = open_shard(path)
    assert got.dtype == dtype and np.array_equal(got, tokens)
    assert shard_token_count(path) == 1001
    assert path.stat().st_size == 1024 + 1001 * np.dtype(dtype).itemsize
    with pytest.raises(ValueError):   # read-only
        got[0] = 1


def test_a_shard_from_an_independent_writer_opens(tmp_path):
    tokens = [50256, 15496, 11, 995, 0, 65535]
    path = tmp_path / "fineweb_val_000000.bin"
    _independent_shard(path, tokens)
    assert open_shard(path).tolist() == tokens
    _independent_shard(tmp_path / "v2.bin", [128000, 1, 2], version=2)
    assert open_shard(tmp_path / "v2.bin").tolist() == [128000, 1, 2]


def test_vocabulary_beyond_uint32_is_refused():
    assert shard_version(2 ** 32) == 2
    with pytest.raises(FastGPTError, match="does not fit llm.c's shard format"):
        shard_version(2 ** 32 + 1)
    with pytest.raises(FastGPTError, match="positive integer"):
        shard_version(0)


@pytest.mark.parametrize("tokens,match", [([1, 2, 65], "token id 65 is outside the vocabulary "
                                                        "of 65 tokens"),
                                          ([-1, 2], "token id -1 is outside"),
                                          ([], "non-empty 1-D array"),
                                          ([[1, 2]], "non-empty 1-D array"),
                                          ([1.5], "integer token ids")])
def test_bad_tokens_write_nothing(tmp_path, tokens, match):
    with pytest.raises(FastGPTError, match=match):
        write_shard(tmp_path / "a.bin", np.array(tokens), 65)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_write_leaves_no_bin_and_keeps_the_old_shard(tmp_path, monkeypatch):
    path = tmp_path / "d_train_000001.bin"
    write_shard(path, np.arange(10), 65)

    def interrupted(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(shards.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_shard(path, np.arange(20), 65)
    with pytest.raises(KeyboardInterrupt):
        write_shard(tmp_path / "d_train_000002.bin", np.arange(20), 65)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]   # no temporary file either
    assert open_shard(path).tolist() == list(range(10))


def test_corrupt_files_say_what_is_wrong(tmp_path):
    cases = {}
    _independent_shard(tmp_path / "magic.bin", [1, 2, 3], magic=20240521)
    cases["magic.bin"] = "magic number 20240521 in its header, not llm.c's 20240520"
    _independent_shard(tmp_path / "version.bin", [1, 2, 3], version=7)
    cases["version.bin"] = "format version 7; known versions: 1 (uint16 tokens), 2 (uint32"
    _independent_shard(tmp_path / "truncated.bin", [1, 2, 3], count=4)
    cases["truncated.bin"] = "is 1,030 bytes, but its header promises 4 uint16 tokens = 1,032 " \
                             "bytes: the file is truncated"
    _independent_shard(tmp_path / "long.bin", [1, 2, 3], count=2)
    cases["long.bin"] = "longer than its header says"
    _independent_shard(tmp_path / "empty.bin", [], count=0)
    cases["empty.bin"] = "holds no tokens (count 0 in its header)"
    (tmp_path / "short.bin").write_bytes(b"\x00" * 100)
    cases["short.bin"] = "is 100 bytes, shorter than the 1024-byte header"
    cases["missing.bin"] = "does not exist"
    for name, match in cases.items():
        with pytest.raises(FastGPTError) as e:
            open_shard(tmp_path / name)
        assert name in str(e.value) and match in str(e.value), str(e.value)
    with pytest.raises(FastGPTError, match="magic number"):
        shard_token_count(tmp_path / "magic.bin")


def _touch_shards(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        write_shard(folder / name, np.arange(3), 65)


def test_find_shards_in_a_folder_and_by_glob(tmp_path):
    _touch_shards(tmp_path / "fw", "fineweb_train_000002.bin", "fineweb_val_000000.bin",
                  "fineweb_train_000001.bin")
    (tmp_path / "fw" / ".fineweb_train_000003.bin.tmp-12").write_bytes(b"half")
    (tmp_path / "fw" / "notes.txt").write_text("x")
    found = find_shards(tmp_path / "fw")
    assert [p.name for p in found["train"]] == ["fineweb_train_000001.bin",
                                                "fineweb_train_000002.bin"]
    assert [p.name for p in found["val"]] == ["fineweb_val_000000.bin"]
    by_glob = find_shards(str(tmp_path / "fw" / "fineweb_train_*.bin"))
    assert by_glob == {"train": found["train"], "val": []}
    assert find_shards(str(tmp_path / "fw" / "*.bin")) == found


@pytest.mark.parametrize("where", ["empty", "nothing_*.bin", "missing"])
def test_find_shards_without_a_match_is_an_error(tmp_path, where):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FastGPTError, match="no token shards at .*give a directory holding "
                                           "<prefix>_train_NNNNNN.bin"):
        find_shards(str(tmp_path / where))


def test_read_meta(tmp_path):
    assert read_meta(tmp_path) is None
    (tmp_path / "meta.json").write_text('{"vocab_size": 65}')
    assert read_meta(tmp_path) == {"vocab_size": 65}
    (tmp_path / "meta.json").write_text('{"vocab_size": ')
    with pytest.raises(FastGPTError, match="meta.json' is not valid JSON"):
        read_meta(tmp_path)
    assert os.path.exists(tmp_path / "meta.json")

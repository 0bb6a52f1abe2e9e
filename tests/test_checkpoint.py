"""Checkpoints: atomic writes, safe loads, clear errors on damage."""

import os
import pickle

import pytest
import torch

from fastgpt.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from fastgpt.errors import FastGPTError

STATE = {"model": {"w": torch.arange(4.0)}, "model_kind": "gpt", "model_args": {},
         "train_args": {}, "vocab": "ab", "iter_num": 3}


def test_round_trip(tmp_path):
    save_checkpoint(tmp_path / "ckpt.pt", STATE)
    loaded = load_checkpoint(tmp_path)
    assert loaded["format"] == FORMAT and loaded["iter_num"] == 3
    assert torch.equal(loaded["model"]["w"], STATE["model"]["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]    # no temp files left


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, STATE)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(FastGPTError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_checkpoint_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = tmp_path / "ckpt.pt"
    torch.save({"format": FORMAT, "payload": Evil()}, path)
    with pytest.raises(FastGPTError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(FastGPTError, match="no checkpoint at"):
        load_checkpoint(tmp_path)
    torch.save({"model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(FastGPTError, match="not a fastgpt checkpoint"):
        load_checkpoint(tmp_path)


def test_failed_write_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, STATE)
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError)):
        save_checkpoint(path, {**STATE, "bad": lambda: 0})     # cannot be pickled
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]

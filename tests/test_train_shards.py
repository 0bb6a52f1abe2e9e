"""Training on token shards: fastgpt prepare's (bpe:512, char) and llm.c's own format written by
an independent writer; windows across shards, fixed evaluation windows, a bit-for-bit resume,
the tokenizer carried by the checkpoint into `fastgpt sample`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastgpt.checkpoint import load_checkpoint
from fastgpt.cli import main
from fastgpt.data import bundled_text_path
from fastgpt.errors import FastGPTError
from fastgpt.prepare import PrepareOptions, prepare
from fastgpt.sample import SampleOptions, sample_from_checkpoint
from fastgpt.shard_dataset import ShardDataset
from fastgpt.train import RunOptions, train

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, eval_iters=2,
            eval_interval=25, log_interval=25, warmup_iters=5, lr_decay_iters=50,
            learning_rate=3e-3, dropout=0.0)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The bundled Shakespeare prepared with bpe:512 and char (small shards: several each)."""
    root = tmp_path_factory.mktemp("prepared")
    for tok in ("bpe:512", "char"):
        prepare(PrepareOptions(inputs=[str(bundled_text_path())], tokenizer=tok,
                               out_dir=str(root / tok.replace(":", "")), shard_tokens=200_000,
                               progress=False))
    return root


def run(data, out_dir, **kw):
    overrides = {**TINY, **kw.pop("overrides", {})}
    return train(RunOptions(data=str(data), out_dir=str(out_dir), preset="baby", progress=False,
                            dtype="float32", header=False, overrides=overrides, **kw))


def losses(out_dir, kind="eval"):
    rows = [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: (r["train_loss"], r["val_loss"]) for r in rows if r["kind"] == kind}


@pytest.mark.parametrize("tok", ["bpe512", "char"])
def test_training_on_prepared_shards_learns_and_samples_text(prepared, tmp_path, tok):
    data = prepared / tok
    assert len(list(data.glob("*_train_*.bin"))) >= 2        # windows come from several shards
    result = run(data, tmp_path / "run", overrides={"max_iters": 50}, sample_chars=60)
    evals = losses(tmp_path / "run")
    assert evals[50][1] < evals[0][1] - 0.5, evals               # val loss fell
    state = load_checkpoint(tmp_path / "run")
    assert state["tokenizer"] == json.loads((data / "meta.json").read_text())["tokenizer"]
    assert isinstance(result.sample, str) and len(result.sample) >= 20
    assert sum(c.isalpha() for c in result.sample) > len(result.sample) / 3, result.sample
    # fastgpt sample decodes with the checkpoint's tokenizer
    text, = sample_from_checkpoint(SampleOptions(out_dir=str(tmp_path / "run"), prompt="ROMEO:",
                                                 max_new_tokens=20, device="cpu"))
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_a_glob_of_shards_trains_like_the_directory(prepared, tmp_path):
    run(prepared / "bpe512", tmp_path / "dir", overrides={"max_iters": 4}, sample_chars=0)
    run(f"{prepared / 'bpe512'}/*.bin", tmp_path / "glob", overrides={"max_iters": 4},
        sample_chars=0)
    assert losses(tmp_path / "dir") == losses(tmp_path / "glob")


def test_a_resume_from_shards_equals_the_uninterrupted_run(prepared, tmp_path):
    data = prepared / "bpe512"
    every = {"eval_interval": 10, "log_interval": 1}
    run(data, tmp_path / "full", overrides={"max_iters": 30, **every}, sample_chars=0)
    run(data, tmp_path / "part", overrides={"max_iters": 20, **every}, sample_chars=0)
    run(data, tmp_path / "part", resume=True, overrides={"max_iters": 30, **every}, sample_chars=0)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    assert losses(tmp_path / "part", "train") == losses(tmp_path / "full", "train")
    a, b = load_checkpoint(tmp_path / "part")["model"], load_checkpoint(tmp_path / "full")["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_evaluation_windows_are_fixed_and_training_windows_follow_the_seed(prepared):
    ds = ShardDataset(str(prepared / "char"), block_size=16)
    gen = lambda seed: torch.Generator().manual_seed(seed)     # noqa: E731
    x1, y1 = ds.batch("val", 64, gen(ds.EVAL_SEED["val"]))
    x2, _ = ds.batch("val", 64, gen(ds.EVAL_SEED["val"]))
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    a, _ = ds.batch("train", 64, gen(1))
    b, _ = ds.batch("train", 64, gen(2))
    assert not torch.equal(a, b)
    # the rank's rows of the same draw (DDP)
    part, _ = ds.batch("train", 64, gen(1), rows=slice(16, 32))
    assert torch.equal(part, a[16:32])
    # windows are the shards' tokens: each window is a slice of one shard
    text = bundled_text_path().read_text()
    chars = json.loads((prepared / "char" / "meta.json").read_text())["tokenizer"]["chars"]
    for row in a[:8]:
        assert "".join(chars[i] for i in row.tolist()) in text


def write_llmc_shard(path, tokens, version=1):
    """llm.c's format from its description, independently of fastgpt.shards: 256 int32
    (magic 20240520, version, count), then the tokens as uint16 (version 1) or uint32 (2)."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, version, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16 if version == 1 else np.uint32).tobytes())


def test_llm_c_shards_without_meta_train_as_gpt2(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))   # offline, no files
    rng = np.random.default_rng(0)
    folder = tmp_path / "fineweb10B"
    folder.mkdir()
    write_llmc_shard(folder / "fineweb_val_000000.bin", rng.integers(0, 50257, 5000))
    for i in (1, 2):
        write_llmc_shard(folder / f"fineweb_train_00000{i}.bin", rng.integers(0, 50257, 20000))
    result = run(f"{folder}/fineweb_*.bin", tmp_path / "run",
                 overrides={"max_iters": 3, "n_layer": 1, "n_embd": 16}, sample_chars=10)
    state = load_checkpoint(tmp_path / "run")
    assert state["tokenizer"] == {"kind": "gpt2"}
    assert state["model_args"]["vocab_size"] == 50304                # padded, as nanoGPT's
    assert result.sample == "" and np.isfinite(result.val_loss)
    assert any("without GPT-2's vocabulary files" in r.message for r in caplog.records)


def test_bad_shard_data_is_a_one_line_error(prepared, tmp_path, capsys):
    with pytest.raises(FastGPTError, match="has no (train|val) shard of at least 100001 tokens .* use a smaller --block-size"):
        run(prepared / "char", tmp_path / "big", overrides={"block_size": 100_000})
    with pytest.raises(FastGPTError, match="has no val shard .*name val shards too"):
        run(f"{prepared / 'char'}/*_train_*.bin", tmp_path / "noval")
    assert main(["train", "--data", str(tmp_path / "nothing-here.bin"), "--out-dir",
                 str(tmp_path / "x")]) == 2
    assert "no token shards at" in capsys.readouterr().err
    assert not (tmp_path / "big").exists() and not (tmp_path / "x").exists()


def test_resuming_with_other_data_is_refused(prepared, tmp_path):
    run(prepared / "char", tmp_path / "run", overrides={"max_iters": 2}, sample_chars=0)
    with pytest.raises(FastGPTError, match=r"the data's tokenizer \(bpe, vocabulary 512 tokens\) "
                                           r"differs from the checkpoint's \(char\)"):
        run(prepared / "bpe512", tmp_path / "run", resume=True, overrides={"max_iters": 4})

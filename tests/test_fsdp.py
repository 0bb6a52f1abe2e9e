"""FSDP (--fsdp), activation checkpointing and sharded checkpoints, on CPU with gloo and two
processes: the same losses as one process, a resume that continues bit for bit (and under
another world size), and a sharded checkpoint that one process reads."""

import json
import logging
import shutil

import pytest
import torch

from fastgpt.checkpoint import SHARDED_NAME, load_checkpoint
from fastgpt.cli import main
from fastgpt.errors import FastGPTError
from test_distributed import TINY, flags, metrics, torchrun
from fastgpt.train import RunOptions, train

# eval every 5: a run stopped at 10 evaluates (and draws eval batches) where the full one does
STEPS = dict(eval_interval=5, max_iters=20)


def run_here(out_dir, dtype="float32", **kw):
    return train(RunOptions(out_dir=str(out_dir), preset="baby", progress=False, sample_chars=0,
                            dtype=dtype, overrides={**TINY, **STEPS, **kw.pop("overrides", {})},
                            **kw))


def losses(out_dir) -> dict:
    return {k: metrics(out_dir, k) for k in ("train", "eval")}


def assert_losses(got, want, rel, from_iter=0):
    for kind in ("train", "eval"):
        w = {i: v for i, v in want[kind].items() if i >= from_iter}
        g = {i: v for i, v in got[kind].items() if i >= from_iter}
        assert sorted(g) == sorted(w), kind
        for i in w:
            assert g[i] == pytest.approx(w[i], rel=rel, abs=rel), (kind, i)


def launch(out_dir, *extra):
    done = torchrun(out_dir, *extra)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    run_here(root / "one")
    full = launch(root / "fsdp", *flags(**STEPS), "--fsdp")
    launch(root / "half", *flags(**{**STEPS, "max_iters": 10}), "--fsdp")
    return root, full


def test_fsdp_matches_one_process_fp32(runs):
    root, done = runs
    assert_losses(losses(root / "fsdp"), losses(root / "one"), rel=1e-5)
    assert "FSDP: weights, gradients and optimizer state sharded over 2 processes" in done.stdout
    assert "optimizer torch.optim.AdamW over the sharded parameters" in done.stdout
    assert (root / "fsdp" / SHARDED_NAME).is_symlink()
    assert not (root / "fsdp" / "ckpt.pt").exists()


def test_sharded_checkpoint_consolidates_in_one_process(runs):
    root, _ = runs
    full, single = load_checkpoint(root / "fsdp"), load_checkpoint(root / "one")
    assert full["iter_num"] == single["iter_num"] == 20 and full["world_size"] == 2
    assert set(full["model"]) == set(single["model"])
    for k, v in single["model"].items():
        torch.testing.assert_close(full["model"][k], v, rtol=1e-5, atol=1e-6)
    assert full["optimizer"]["param_groups"][0]["params"] == \
        single["optimizer"]["param_groups"][0]["params"]
    from fastgpt.sample import SampleOptions, sample_from_checkpoint
    text, = sample_from_checkpoint(SampleOptions(out_dir=str(root / "fsdp"), prompt="AB",
                                                 max_new_tokens=5, device="cpu"))
    assert text.startswith("AB") and len(text) == 7
    from fastgpt.export import ExportOptions, export
    result = export(ExportOptions(out_dir=str(root / "fsdp"), hf_dir=str(root / "hf")))
    assert "model.safetensors" in result.files


def test_fsdp_resume_is_bitwise_and_a_crashed_save_is_ignored(runs):
    """Resumed at 10 (with selective activation checkpointing, which changes no bit) the run
    equals the uninterrupted one exactly; a directory a crashed save left is never read and is
    removed by the next save."""
    root, _ = runs
    shutil.copytree(root / "half", root / "resumed", symlinks=True)
    crashed = root / "resumed" / f".{SHARDED_NAME}.00000015.dead"
    crashed.mkdir()
    (crashed / "__0_0.distcp").write_bytes(b"half a shard")
    assert load_checkpoint(root / "resumed")["iter_num"] == 10
    launch(root / "resumed", "--fsdp", "--resume", "--max-iters", "20",
           "--activation-checkpointing", "selective")
    assert_losses(losses(root / "resumed"), losses(root / "fsdp"), rel=0.0)
    assert not crashed.exists()
    assert len(list((root / "resumed").glob(f".{SHARDED_NAME}.*"))) == 1


def test_sharded_checkpoint_resumes_in_one_process(runs):
    """Two ranks -> one process: the data order continues, the losses within float rounding."""
    root, _ = runs
    shutil.copytree(root / "half", root / "two_then_one", symlinks=True)
    run_here(root / "two_then_one", resume=True)
    assert_losses(losses(root / "two_then_one"), losses(root / "one"), rel=1e-5, from_iter=10)
    # the run's checkpoint is now a single file; the sharded one it replaced is gone
    assert not (root / "two_then_one" / SHARDED_NAME).exists()
    assert load_checkpoint(root / "two_then_one")["iter_num"] == 20


def test_fsdp_bf16_follows_the_one_process_run(tmp_path, runs):
    """bf16 parameters for compute (FSDP's mixed precision) against one process's bf16 working
    copy: the same curve within bf16's rounding (~3 significant digits)."""
    root, _ = runs
    run_here(tmp_path / "one", dtype="bfloat16")
    launch(tmp_path / "fsdp", *flags(**STEPS), "--fsdp", "--dtype", "bfloat16")
    assert_losses(losses(tmp_path / "fsdp"), losses(tmp_path / "one"), rel=5e-3)


@pytest.mark.parametrize("mode", ["block", "selective"])
def test_activation_checkpointing_changes_no_bit(tmp_path, runs, mode):
    root, _ = runs
    run_here(tmp_path, activation_checkpointing=mode)
    assert_losses(losses(tmp_path), losses(root / "one"), rel=0.0)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["activation_checkpointing"] == mode


def test_activation_checkpointing_with_ddp(tmp_path, runs):
    root, _ = runs
    launch(tmp_path, *flags(**STEPS), "--activation-checkpointing", "block")
    assert_losses(losses(tmp_path), losses(root / "one"), rel=1e-5)


def test_fsdp_in_one_process_trains_unsharded(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fastgpt"):
        run_here(tmp_path, fsdp=True, overrides={"max_iters": 2})
    assert "--fsdp with one process: there is nothing to shard over" in caplog.text
    assert (tmp_path / "ckpt.pt").exists()


def test_unknown_checkpointing_mode_is_one_line(tmp_path, capsys):
    assert main(["train", "--out-dir", str(tmp_path), "--activation-checkpointing", "all"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("fastgpt: error: unknown --activation-checkpointing 'all'; modes "
                           "are: none, block, selective")
    with pytest.raises(FastGPTError):
        run_here(tmp_path, activation_checkpointing="everything")


def test_single_file_checkpoint_resumes_sharded(tmp_path, runs):
    """One process -> two FSDP ranks: each rank takes its shards of the full checkpoint's
    weights and AdamW state; the losses go on within float rounding."""
    root, _ = runs
    run_here(tmp_path / "one_then_fsdp", overrides={"max_iters": 10})
    launch(tmp_path / "one_then_fsdp", "--fsdp", "--resume", "--max-iters", "20")
    assert_losses(losses(tmp_path / "one_then_fsdp"), losses(root / "one"), rel=1e-5,
                  from_iter=10)
    assert (tmp_path / "one_then_fsdp" / SHARDED_NAME).is_symlink()
    assert not (tmp_path / "one_then_fsdp" / "ckpt.pt").exists()


def test_fsdp_under_torch_compile(tmp_path, runs):
    """--compile --fsdp: the compiled model (torch.compile over the sharded one) trains the
    same curve as the eager sharded run."""
    root, _ = runs
    launch(tmp_path, *flags(**STEPS), "--fsdp", "--compile")
    assert_losses(losses(tmp_path), losses(root / "fsdp"), rel=1e-5)


def test_fsdp_keeping_gathered_weights_trains_the_same(tmp_path, runs):
    """--no-fsdp-reshard-after-forward keeps each block's gathered weights from the forward to
    the backward: more memory, the same curve."""
    root, _ = runs
    launch(tmp_path, *flags(**STEPS), "--fsdp", "--no-fsdp-reshard-after-forward")
    assert_losses(losses(tmp_path), losses(root / "fsdp"), rel=1e-5)


def test_fsdp_batch_must_split_over_the_ranks(tmp_path):
    done = torchrun(tmp_path / "run", *flags(batch_size=3, max_iters=2), "--fsdp")
    assert done.returncode != 0
    assert ("--batch-size 3 is the global batch per micro-step and must split evenly over the "
            "2 ranks") in done.stderr
    assert not (tmp_path / "run").exists()

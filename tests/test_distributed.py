"""Training under torchrun on CPU (gloo): the same losses as one process, checkpoints that move
between world sizes, and a failing rank that takes the whole job down.

Run as a script (``torchrun ... tests/test_distributed.py train ...``) this file is the fastgpt
command plus one test-only backend that fails on one rank (see the bottom of the file).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgpt import distributed
from fastgpt.checkpoint import load_checkpoint
from fastgpt.errors import FastGPTError
from fastgpt.train import RunOptions, train

# dropout 0: a rank's dropout masks cannot equal one process's, everything else can;
# two micro-steps: the first runs under DDP's no_sync
TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_iters=2,
            eval_interval=3, log_interval=1, warmup_iters=2, lr_decay_iters=30, dropout=0.0,
            gradient_accumulation_steps=2)
FAULTY = "fail_on_one_rank"


def flags(**kw) -> list[str]:
    return [a for k, v in {**TINY, **kw}.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def torchrun(out_dir, *extra, script=("-m", "fastgpt"), env=None, timeout=300):
    """The job's result; a hang (e.g. a rank left waiting in an all-reduce, which gloo gives up
    on only after 30 minutes) raises TimeoutExpired after ``timeout`` seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           *script, "train", "--preset", "baby", "--out-dir", str(out_dir), "--no-progress",
           "--sample-chars", "0", "--dtype", "float32", *extra]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})}) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM: torchrun stops its ranks (each in a session of its own) before exiting
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_here(out_dir, **kw):
    overrides = {**TINY, **kw.pop("overrides", {})}
    return train(RunOptions(out_dir=str(out_dir), preset="baby", progress=False, sample_chars=0,
                            dtype="float32", overrides=overrides, **kw))


def metrics(out_dir, kind):
    rows = [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: (r["train_loss"], r["val_loss"] or 0.0) for r in rows if r["kind"] == kind}


def assert_same_run(got_dir, want_dir, from_iter=0):
    for kind in ("train", "eval"):
        got, want = metrics(got_dir, kind), metrics(want_dir, kind)
        want = {i: v for i, v in want.items() if i >= from_iter}
        assert sorted(got) == sorted(want), kind
        for i in want:
            assert got[i] == pytest.approx(want[i], rel=1e-5, abs=1e-6), (kind, i)
    a, b = load_checkpoint(got_dir)["model"], load_checkpoint(want_dir)["model"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 6 iterations in one process and in two ranks (batch 4 = 2 rows per rank)."""
    root = tmp_path_factory.mktemp("dist")
    run_here(root / "one", overrides={"max_iters": 6})
    # profiled steps 1-2: the profiler must not change the run
    done = torchrun(root / "two", *flags(max_iters=6), "--profile", "--profile-wait", "1",
                    "--profile-steps", "2")
    assert done.returncode == 0, done.stderr
    return root, done


def test_two_ranks_match_one_process(runs):
    root, done = runs
    assert_same_run(root / "two", root / "one")
    assert done.stdout.count("iter 3: train loss") == 1      # only rank 0 reports
    assert {p.name for p in (root / "two").iterdir()} == {
        "ckpt.pt", "metrics.jsonl", "loss.png",
        "trace.rank0.json", "trace.rank1.json", "profile.txt"}   # a trace per rank, one table
    state = load_checkpoint(root / "two")
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert set(load_checkpoint(root / "one")) | {"world_size", "rng_ranks"} == set(state)
    from fastgpt.sample import SampleOptions, sample_from_checkpoint
    text, = sample_from_checkpoint(SampleOptions(out_dir=str(root / "two"), prompt="AB",
                                                 max_new_tokens=5, device="cpu"))
    assert text.startswith("AB") and len(text) == 7


def test_throughput_is_global_and_mfu_per_rank(runs):
    """tokens/s counts both ranks' tokens once; TFLOP/s and MFU are one rank's share."""
    root, _ = runs
    got = [json.loads(line) for line in (root / "two" / "metrics.jsonl").read_text().splitlines()]
    run_row = next(r for r in got if r["kind"] == "run")
    assert run_row["world_size"] == 2
    for r in (r for r in got if r["kind"] == "train"):
        per_rank = run_row["flops_per_token"] * r["tokens_per_s"] / 2 / 1e12
        assert r["tflops"] == pytest.approx(per_rank)
        assert r["mfu"] == pytest.approx(per_rank / run_row["peak_tflops"])
    for rank in (0, 1):
        events = json.loads((root / "two" / f"trace.rank{rank}.json").read_text())["traceEvents"]
        assert any(e.get("name") == "fastgpt.optimizer" for e in events)


def test_checkpoints_resume_across_world_sizes(runs):
    root, _ = runs
    run_here(root / "full", overrides={"max_iters": 12})
    # two ranks -> one process
    shutil.copytree(root / "two", root / "two_then_one")
    run_here(root / "two_then_one", resume=True, overrides={"max_iters": 12})
    assert_same_run(root / "two_then_one", root / "full")
    # one process -> two ranks
    shutil.copytree(root / "one", root / "one_then_two")
    done = torchrun(root / "one_then_two", "--resume", "--max-iters", "12")
    assert done.returncode == 0, done.stderr
    assert "resuming a 1-process run with 2 process(es)" in done.stderr
    assert_same_run(root / "one_then_two", root / "full")


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_one_failing_rank_stops_the_whole_job(tmp_path, mode):
    # rank 1's 7th loss call (iteration 2's second micro-step) fails while rank 0 waits in
    # DDP's all-reduce; had rank 0 been left waiting there, torchrun's timeout would fail the test
    done = torchrun(tmp_path, *flags(max_iters=50, cross_entropy=FAULTY),
                    script=(__file__,), env={"FAIL_RANK": "1", "FAIL_MODE": mode, "FAIL_AT": "7"})
    assert done.returncode != 0, done.stderr
    if mode == "raise":
        assert "injected failure on rank 1" in done.stderr
    else:
        # the NaN is seen through the all-reduced losses: both ranks stop by themselves
        assert done.stderr.count("fastgpt: error: loss became nan at iteration 2") == 2, done.stderr
    assert load_checkpoint(tmp_path)["iter_num"] == 0   # the last good checkpoint survives


def test_ranks_take_rank_0_s_measured_choices(tmp_path):
    # measured dispatch: rank 0 measures (a line per signature) and rank 1 waits for its answer
    # in the process group's store instead of measuring (it would log too), so both run the same
    done = torchrun(tmp_path / "run", *flags(max_iters=2),
                    env={"FASTGPT_DISPATCH": "measure", "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    lines = [l for l in done.stderr.splitlines() if l.startswith("fastgpt: dispatch ")]
    signatures = [l.partition(" on ")[0] for l in lines]
    assert any(" attention float32 " in s and "(train)" in s for s in signatures), done.stderr
    assert len(signatures) == len(set(signatures)), done.stderr
    cache = json.loads((tmp_path / "cache" / "fastgpt" / "dispatch.json").read_text())
    assert len(cache["entries"]) == len(lines)


def test_global_batch_must_split_over_ranks():
    assert distributed.rank_rows(12, distributed.World(rank=2, local_rank=0, size=4)) == slice(6, 9)
    with pytest.raises(FastGPTError, match=r"--batch-size 6 is the global batch per micro-step "
                                           r"and must split evenly over the 4 ranks.*e\.g\. 4 or 8"):
        distributed.rank_rows(6, distributed.World(rank=0, local_rank=0, size=4))


def test_world_from_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.world_from_env().enabled
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.world_from_env() == distributed.World()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.world_from_env() == distributed.World(rank=1, local_rank=1, size=2)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(FastGPTError, match="WORLD_SIZE=2 but RANK='2'"):
        distributed.world_from_env()
    seeds = {distributed.rank_seed(s, r, i) for s in (0, 1) for r in (0, 1) for i in (0, 6)}
    assert len(seeds) == 8 and all(0 <= s < 2 ** 63 for s in seeds)


def _register_faulty_backend() -> None:
    """A loss backend that raises, or turns NaN, on rank FAIL_RANK from its FAIL_AT-th call."""
    from fastgpt import ops
    calls = []

    def fn(hidden, weight, targets, **kw):
        calls.append(1)
        loss = ops.linear_cross_entropy(hidden, weight, targets, backend="torch", **kw)
        if os.environ["RANK"] == os.environ["FAIL_RANK"] and len(calls) >= int(os.environ["FAIL_AT"]):
            if os.environ["FAIL_MODE"] == "raise":
                raise RuntimeError(f"injected failure on rank {os.environ['RANK']}")
            return loss * float("nan")
        return loss

    ops.registry.register("linear_cross_entropy", FAULTY, fn)


if __name__ == "__main__":
    from fastgpt.cli import main
    _register_faulty_backend()
    sys.exit(main(sys.argv[1:]))

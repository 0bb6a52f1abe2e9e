"""Training runs: exact resume, surviving SIGKILL, stopping on a NaN loss."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastgpt import ops, optim, precision
from fastgpt.checkpoint import load_checkpoint
from fastgpt.config import GPTConfig, TrainConfig
from fastgpt.errors import FastGPTError
from fastgpt.model import build_model
from fastgpt.ops import registry
from fastgpt.precision import Stepper
from fastgpt.train import RunOptions, plot_losses, train

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_iters=2,
            eval_interval=4, log_interval=1, warmup_iters=2, lr_decay_iters=30, dropout=0.1)


def run(out_dir, dtype="float32", **kw):
    overrides = {**TINY, **kw.pop("overrides", {})}
    opts = RunOptions(out_dir=str(out_dir), preset="baby", progress=False, sample_chars=0,
                      dtype=dtype, overrides=overrides, **kw)
    return train(opts)


def step_losses(out_dir):
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["train_loss"] for r in rows if r["kind"] == "train"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_equals_uninterrupted(tmp_path, dtype):
    full = run(tmp_path / "full", dtype, overrides={"max_iters": 12})
    run(tmp_path / "part", dtype, overrides={"max_iters": 8})   # stops on an eval, as a kill would
    resumed = run(tmp_path / "part", dtype, resume=True, overrides={"max_iters": 12})
    assert step_losses(tmp_path / "part") == step_losses(tmp_path / "full")   # bitwise
    assert resumed.val_loss == full.val_loss
    a = load_checkpoint(tmp_path / "full")["model"]
    b = load_checkpoint(tmp_path / "part")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "loss.png").stat().st_size > 0


def history(out_dir):
    """(kind, iter, train loss, val loss) of every metrics row, in file order."""
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["iter"], r["train_loss"], r["val_loss"]) for r in rows
            if r["kind"] != "run"]


def test_a_run_says_what_it_is(tmp_path, capsys):
    run(tmp_path, overrides={"max_iters": 4})
    run(tmp_path, resume=True, overrides={"max_iters": 8})
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, again = (r for r in rows if r["kind"] == "run")
    assert rows[0] == first                          # the records open with what the run is
    assert first["preset"] == "baby" and first["model"] == "gpt" and first["iter"] == 0
    assert first["dtype"] == "float32" and first["dtype_reason"] == "asked for"
    assert first["exact"] is False and load_checkpoint(tmp_path)["exact"] is False
    assert first["tokens_per_iter"] == TINY["batch_size"] * TINY["block_size"]
    assert first["params"] == sum(p.numel() for p in build_model(
        "gpt", GPTConfig(**load_checkpoint(tmp_path)["model_args"])).parameters())
    # dropout 0.1 runs in the C++ block, which computes attention itself
    assert first["backends"].keys() == {"embedding", "transformer_block", "linear_cross_entropy"}
    assert first["backends"]["transformer_block"] == "ext"
    assert first["resumed_from"] is None
    assert again["resumed_from"] == 4 and again["checkpoint_time"]
    out = capsys.readouterr().out
    assert out.count("fastgpt train: gpt model") == 2 and "resuming from iteration 4" in out
    assert "backends: embedding=" in out and "dtype float32 (asked for)" in out


def run_rows(out_dir):
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "run"]


EXACT = "--exact: nanoGPT's fp32 math step for step"


def test_exact_trains_in_float32_with_the_torch_block_and_sdpa(tmp_path, monkeypatch, capsys):
    """--exact is float32 even where auto picks bfloat16 (here a CPU said to have native bf16),
    with the torch block and sdpa attention: the losses of float32 with those two named. The
    run row, the header and the checkpoint say so; a resume without --exact keeps it."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    kw = {"max_iters": 4, "dropout": 0.0}
    run(tmp_path / "exact", "auto", exact=True, overrides=kw)
    run(tmp_path / "named", "float32", overrides={**kw, "transformer_block": "torch",
                                                  "attention": "sdpa"})
    assert step_losses(tmp_path / "exact") == step_losses(tmp_path / "named")   # bitwise
    (row,) = run_rows(tmp_path / "exact")
    assert (row["dtype"], row["dtype_reason"], row["exact"]) == ("float32", EXACT, True)
    assert row["backends"]["transformer_block"] == "torch" and row["backends"]["attention"] == "sdpa"
    assert f"dtype float32 ({EXACT})" in capsys.readouterr().out
    state = load_checkpoint(tmp_path / "exact")
    assert state["exact"] is True and state["dtype"] == "float32"
    assert (state["model_args"]["transformer_block"], state["model_args"]["attention"]) == \
        ("torch", "sdpa")
    run(tmp_path / "exact", "auto", resume=True, overrides={"max_iters": 8})   # auto: bf16 here
    again = run_rows(tmp_path / "exact")[1]
    assert (again["dtype"], again["exact"], again["backends"]) == ("float32", True, row["backends"])
    assert again["dtype_reason"] == ("--exact, as the run it resumes: nanoGPT's fp32 math step "
                                     "for step")
    assert load_checkpoint(tmp_path / "exact")["exact"] is True
    with pytest.raises(FastGPTError, match=r"^the run in .* trains with --exact \(float32, "
                                           r"nanoGPT's fp32 math\); --dtype bfloat16 conflicts "
                                           r"with it: resume without --dtype \(or with float32\)$"):
        run(tmp_path / "exact", "bfloat16", resume=True, overrides={"max_iters": 12})


def test_exact_on_resume_pins_the_backends_of_a_run_that_was_not(tmp_path):
    run(tmp_path, overrides={"max_iters": 4, "attention": "tril"})
    run(tmp_path, exact=True, resume=True, overrides={"max_iters": 8})
    first, again = run_rows(tmp_path)
    assert first["backends"]["attention"] == "tril" and not first["exact"]
    assert again["backends"]["attention"] == "sdpa" and again["exact"]
    assert load_checkpoint(tmp_path)["model_args"]["attention"] == "sdpa"


@pytest.mark.parametrize("dtype,overrides,message", [
    ("bfloat16", {}, "--exact trains in float32 (nanoGPT's fp32 math); --dtype bfloat16 "
                     "conflicts with it: drop --dtype (or use float32)"),
    ("auto", {"transformer_block": "ext"},
     "--exact pins --transformer-block torch (nanoGPT's fp32 math); --transformer-block ext "
     "conflicts with it: drop --transformer-block (or use torch)"),
    ("float32", {"attention": "tril"},
     "--exact pins --attention sdpa (nanoGPT's fp32 math); --attention tril conflicts with it: "
     "drop --attention (or use sdpa)"),
])
def test_exact_with_a_conflicting_flag_stops_before_anything(tmp_path, dtype, overrides, message):
    with pytest.raises(FastGPTError) as e:
        run(tmp_path / "run", dtype, exact=True, overrides=overrides)
    assert str(e.value) == message
    assert not (tmp_path / "run").exists()


def test_resume_drops_the_rows_past_the_checkpoint(tmp_path):
    # a run killed between checkpoints leaves rows past its last one; resuming runs those
    # iterations again, and the log must read as one uninterrupted history
    full = tmp_path / "full"
    run(full, overrides={"max_iters": 12})
    out = tmp_path / "killed"
    run(out, overrides={"max_iters": 8})
    at_8 = (out / "ckpt.pt").read_bytes()
    run(out, resume=True, overrides={"max_iters": 12})   # rows 8..12 written ...
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "iter": 13, "train_lo')  # ... and a row the kill cut short
    (out / "ckpt.pt").write_bytes(at_8)                     # ... but the last checkpoint is 8's
    run(out, resume=True, overrides={"max_iters": 12})
    assert history(out) == history(full)


@pytest.mark.parametrize("first,then", [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_resume_in_the_other_dtype(tmp_path, first, then):
    """On CPU, bf16 steps with fastgpt.optim.FlatAdamW and float32 with torch.optim.AdamW: each
    continues the other's optimizer state."""
    run(tmp_path, first, overrides={"max_iters": 4})
    resumed = run(tmp_path, then, resume=True, overrides={"max_iters": 8})
    state = load_checkpoint(tmp_path)
    opt = state["optimizer"]
    assert state["dtype"] == then and resumed.iter_num == 8
    assert len(opt["state"]) == sum(len(g["params"]) for g in opt["param_groups"])
    assert {float(s["step"]) for s in opt["state"].values()} == {8.0}   # 4 + 4 steps
    assert all(g["fused"] and g["lr"] > 0 for g in opt["param_groups"])


def test_bf16_without_the_extension_matches_flat_adamw(tmp_path, monkeypatch):
    """Without fastgpt._C the bf16 step falls back to torch.optim.AdamW and the same losses."""
    from fastgpt import optim
    steps = []                        # FlatAdamW steps: which optimizer each run used
    flat_step = optim.FlatAdamW.step
    monkeypatch.setattr(optim.FlatAdamW, "step",
                        lambda self, *a, **k: steps.append(1) or flat_step(self, *a, **k))
    kw = dict(overrides={"max_iters": 12, "dropout": 0.0})
    run(tmp_path / "flat", "bfloat16", **kw)
    assert len(steps) == 12
    monkeypatch.setattr(optim, "unavailable", lambda: "pretend it is not built")
    run(tmp_path / "torch", "bfloat16", **kw)
    assert len(steps) == 12           # the second run stepped with torch.optim.AdamW
    a, b = step_losses(tmp_path / "flat"), step_losses(tmp_path / "torch")
    assert a.keys() == b.keys() and max(abs(a[i] - b[i]) for i in a) < 1e-3 * a[0]
    assert b[11] < b[0]


def _stepper_run(dtype, steps=2, exact=False):
    """A tiny GPT stepped ``steps`` times by a Stepper (grad_clip small enough to clip)."""
    torch.manual_seed(0)
    model = build_model("gpt", GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8,
                                         vocab_size=11))
    stepper = Stepper(model, "cpu", dtype, TrainConfig(grad_clip=0.1), exact=exact)
    x = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        _, loss = stepper.model(x, x)
        stepper.backward(loss)
        stepper.step()
    return model, stepper


def _torch_adamw_with_clipping(steps=2):
    """_stepper_run's model stepped by torch.optim.AdamW(fused) + clip_grad_norm_ (nanoGPT's)."""
    torch.manual_seed(0)
    ref = build_model("gpt", GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    opt = optim.make_optimizer(ref, 1e-3, 0.1, (0.9, 0.99))
    x = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        ref(x, x)[1].backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return ref


def test_stepper_in_float32_exact_is_torch_adamw_with_clipping():
    model, stepper = _stepper_run(torch.float32, exact=True)
    assert stepper.model is model and stepper.flat is None
    ref = _torch_adamw_with_clipping()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))   # bitwise
    assert all(p.grad is None for p in model.parameters())
    assert set(stepper.state_dict()) == {"optimizer", "scaler"}   # the checkpoint's keys


@pytest.mark.parametrize("extension", [True, False])
def test_stepper_in_float32_takes_flat_adamw(monkeypatch, extension):
    """FlatAdamW without a working copy: torch's AdamW + clip_grad_norm_ up to the clip
    factor's last bits (its norm is summed in double); torch's AdamW without the extension."""
    if not extension:
        monkeypatch.setattr(optim, "unavailable", lambda: "pretend it is not built")
    model, stepper = _stepper_run(torch.float32)
    assert stepper.model is model and (stepper.flat is not None) == extension
    assert stepper.optimizer_name == ("fastgpt FlatAdamW (fp32)" if extension
                                      else "torch.optim.AdamW (fused)")
    ref = _torch_adamw_with_clipping()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())
    assert set(stepper.state_dict()) == {"optimizer", "scaler"}


@pytest.mark.parametrize("extension", [True, False])
def test_stepper_in_bf16_steps_the_masters_and_refreshes_the_copy(monkeypatch, extension):
    if not extension:
        monkeypatch.setattr(optim, "unavailable", lambda: "pretend it is not built")
    model, stepper = _stepper_run(torch.bfloat16)
    assert (stepper.flat is not None) == extension
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for master, work in zip(model.parameters(), stepper.model.parameters()):
        assert work.dtype == torch.bfloat16 and torch.equal(work, master.to(torch.bfloat16))
        assert work.grad is None and master.grad is None


def test_sigkill_mid_run_then_resume(tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "fastgpt", "train", "--preset", "baby", "--out-dir", str(out),
            "--no-progress", "--sample-chars", "0", "--max-iters", "400", "--dtype", "float32"]
    for k, v in TINY.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = out / "ckpt.pt"
    seen_iters = set()
    deadline = time.time() + 600      # catches a hang; the checkpoints come within seconds
    try:
        while time.time() < deadline and len(seen_iters) < 3 and proc.poll() is None:
            if ckpt.exists():
                seen_iters.add(load_checkpoint(ckpt)["iter_num"])   # always loadable mid-run
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(seen_iters) >= 2, proc.stderr.read().decode()
    last = load_checkpoint(ckpt)["iter_num"]
    assert last > 0
    resumed = run(out, resume=True, overrides={"max_iters": last + 8})
    full = run(tmp_path / "full", overrides={"max_iters": last + 8})
    losses, expected = step_losses(out), step_losses(tmp_path / "full")
    assert {i: losses[i] for i in expected if i >= last} == {i: v for i, v in expected.items() if i >= last}
    assert resumed.val_loss == full.val_loss
    assert history(out) == history(tmp_path / "full")   # no row twice, none out of order


@pytest.fixture
def nan_backend():
    """A linear_cross_entropy backend whose loss turns NaN from its 11th call on."""
    calls = []

    def fn(hidden, weight, targets, **kw):
        calls.append(1)
        loss = ops.linear_cross_entropy(hidden, weight, targets, backend="torch", **kw)
        return loss * float("nan") if len(calls) >= 11 else loss

    registry.register("linear_cross_entropy", "nan_after_10", fn)
    yield "nan_after_10"
    del registry._BACKENDS["linear_cross_entropy"]["nan_after_10"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, nan_backend):
    # call 1: the header's probe step; then one call per split per eval: calls 2-3 eval at 0;
    # 4-7 steps 0-3; 8-9 eval at 4; 10 step 4; 11 step 5 -> NaN
    with pytest.raises(FastGPTError, match=r"loss became nan at iteration 5.*iteration 4\) is kept"):
        run(tmp_path, overrides={"max_iters": 20, "cross_entropy": nan_backend, "dropout": 0.0})
    state = load_checkpoint(tmp_path)
    assert state["iter_num"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_resume_and_fresh_run_guards(tmp_path):
    with pytest.raises(FastGPTError, match="--resume given but .* does not exist"):
        run(tmp_path, resume=True)
    run(tmp_path, overrides={"max_iters": 2})
    with pytest.raises(FastGPTError, match="already exists; pass --resume"):
        run(tmp_path, overrides={"max_iters": 2})
    (tmp_path / "ckpt.pt").write_bytes(b"garbage")
    with pytest.raises(FastGPTError, match="truncated or corrupt"):
        run(tmp_path, resume=True)
    assert (tmp_path / "ckpt.pt").read_bytes() == b"garbage"    # a failed run overwrites nothing


def test_bf16_training_tracks_float32(tmp_path):
    """The CPU bf16 path (bf16 working copy, fp32 master weights) keeps the loss curve of fp32."""
    kw = dict(overrides={"max_iters": 60, "n_embd": 32, "eval_interval": 60, "dropout": 0.0,
                         "learning_rate": 3e-3})
    ref = run(tmp_path / "fp32", "float32", **kw)
    fast = run(tmp_path / "bf16", "bfloat16", **kw)
    a, b = step_losses(tmp_path / "fp32"), step_losses(tmp_path / "bf16")
    assert max(abs(a[i] - b[i]) for i in a) < 0.05 * a[0]
    assert abs(fast.val_loss - ref.val_loss) < 0.02 * ref.val_loss
    assert ref.val_loss < 0.85 * a[0]            # it did learn
    state = load_checkpoint(tmp_path / "bf16")
    assert state["dtype"] == "bfloat16"
    assert all(t.dtype == torch.float32 for t in state["model"].values())   # fp32 masters saved


def test_loss_plot_leaves_the_matplotlib_backend_alone(tmp_path):
    # a notebook's inline backend must survive train(): the plot draws a Figure, no pyplot
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps(dict(kind="eval", iter=0, train_loss=4.2, val_loss=4.3)) + "\n"
                       + json.dumps(dict(kind="train", iter=9, train_loss=3.9, val_loss=None)) + "\n")
    code = ("import sys, matplotlib; matplotlib.use('svg'); from pathlib import Path; "
            "from fastgpt.train import plot_losses; "
            f"plot_losses(Path({str(metrics)!r}), Path({str(tmp_path / 'loss.png')!r})); "
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "False"]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("enabled", [True, False])
def test_loss_plot_restores_the_garbage_collector(tmp_path, enabled):
    import gc
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps(dict(kind="eval", iter=0, train_loss=4.2, val_loss=4.3)) + "\n")
    (gc.enable if enabled else gc.disable)()
    try:
        plot_losses(metrics, tmp_path / "loss.png")
        assert gc.isenabled() == enabled
    finally:
        gc.enable()
    assert (tmp_path / "loss.png").stat().st_size > 0

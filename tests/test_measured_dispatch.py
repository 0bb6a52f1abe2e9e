"""Measured dispatch (fastgpt.ops.measured), exercised on the CPU with FASTGPT_DISPATCH=measure:
real timings, an injected timer that decides the winner, a backend that raises or returns
garbage, a corrupt cache, torch.compile, the cache across processes, and `fastgpt dispatch`."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from fastgpt import ops
from fastgpt.cli import main
from fastgpt.config import GPTConfig
from fastgpt.model import GPT
from fastgpt.train import RunOptions, train
from fastgpt.errors import FastGPTError
from fastgpt.ops import measured, registry
from fastgpt.ops.attention import attention_torch

SHAPE = (2, 3, 24, 16)        # bucket: T=32


@pytest.fixture(autouse=True)
def measure(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTGPT_DISPATCH", "measure")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTGPT_BACKENDS", raising=False)
    measured.forget()
    yield
    measured.forget()


@pytest.fixture
def timings(monkeypatch):
    """An injected timer: backend name -> seconds; records which backends were timed."""
    speeds, timed = {}, []

    def timer(name, run, device):
        outs = run()                          # real tensors, also under torch.compile's trace
        assert all(type(o) is torch.Tensor for o in outs)
        timed.append(name)
        return speeds.get(name, 1e-3)
    monkeypatch.setattr(measured, "timer", timer)
    return speeds, timed


@pytest.fixture
def extra_backend():
    """Register attention backends for one test: extra_backend(name, fn)."""
    added = []

    def add(name, fn):
        registry.register("attention", name, fn)
        added.append(name)
    yield add
    registry.unregister("attention", added)


def qkv(requires_grad=True):
    return [torch.randn(SHAPE, requires_grad=requires_grad) for _ in range(3)]


def entries():
    return list(measured.read_cache().values())


def test_mode_defaults_and_bad_values(monkeypatch):
    monkeypatch.delenv("FASTGPT_DISPATCH")
    assert (measured.mode("cuda"), measured.mode("cpu")) == ("measure", "static")
    monkeypatch.setenv("FASTGPT_DISPATCH", "static")
    assert measured.mode("cuda") == "static"
    monkeypatch.setenv("FASTGPT_DISPATCH", "fastest")
    with pytest.raises(FastGPTError, match="FASTGPT_DISPATCH='fastest': expected one of static, "
                                           "measure"):
        measured.mode("cpu")


def test_real_timings_pick_a_candidate_once_and_cache_it(caplog):
    caplog.set_level(logging.INFO, logger="fastgpt.ops")
    q, k, v = qkv()
    out = ops.causal_attention(q, k, v)
    out.sum().backward()
    entry, = entries()
    assert (entry["op"], entry["dtype"], entry["shape"], entry["mode"]) == \
        ("attention", "float32", "B=2 H=3 T=32 D=16 dropout=False", "train")
    candidates = [n for n in ops.available_backends("attention")
                  if registry.get("attention", n).measured
                  and registry.get("attention", n).cannot_run(q, k, v) is None]
    assert {"sdpa", "torch"} <= set(candidates) and "tril" not in candidates
    assert sorted(entry["times_ms"]) == sorted(candidates) and not entry["failed"]
    assert entry["chosen"] == min(entry["times_ms"], key=entry["times_ms"].get)
    assert all(ms > 0 for ms in entry["times_ms"].values())
    lines = [r.message for r in caplog.records if "dispatch attention" in r.message]
    assert len(lines) == 1 and f"-> {entry['chosen']} (measured in " in lines[0]
    # the same signature (T=20 is in the same bucket) is not measured again; inference is another
    ops.causal_attention(*(t[:, :, :20] for t in (q, k, v)))
    assert len(entries()) == 1
    with torch.no_grad():
        ops.causal_attention(q, k, v)
    assert sorted(e["mode"] for e in entries()) == ["inference", "train"]


def test_the_injected_timer_decides_and_the_choice_is_used(timings):
    speeds, timed = timings
    speeds["torch"] = 1e-5
    with registry.recording_choices() as chosen:
        ops.causal_attention(*qkv())
    assert chosen == {"attention": "torch"} and "sdpa" in timed
    entry, = entries()
    assert entry["chosen"] == "torch" and entry["times_ms"]["torch"] == pytest.approx(0.01)
    # a new process (here: forgetting this one's choices) reads the cache: no timing at all
    measured.forget()
    timed.clear()
    speeds["torch"] = 5.0
    with registry.recording_choices() as chosen:
        ops.causal_attention(*qkv())
    assert chosen == {"attention": "torch"} and timed == []


def test_a_backend_that_raises_is_dropped_with_a_warning(timings, extra_backend, caplog):
    speeds, _ = timings
    speeds["broken"] = 0.0                      # it would win, had it run

    def broken(q, k, v, **kw):
        raise RuntimeError("out of resource: shared memory, Required: 232448")
    extra_backend("broken", broken)
    with registry.recording_choices() as chosen:
        ops.causal_attention(*qkv())
    assert chosen["attention"] != "broken"
    entry, = entries()
    assert entry["failed"] == {"broken": "RuntimeError: out of resource: shared memory, "
                                         "Required: 232448"}
    warning, = [r.message for r in caplog.records if "drops" in r.message]
    assert "dispatch drops attention backend 'broken' for float32 B=2 H=3 T=32" in warning
    # a backend the user names still raises
    with pytest.raises(RuntimeError, match="out of resource"):
        ops.causal_attention(*qkv(), backend="broken")


def test_a_wrong_result_is_dropped(timings, extra_backend):
    speeds, _ = timings
    speeds["garbage"] = speeds["nan"] = 0.0
    extra_backend("garbage", lambda q, k, v, **kw: attention_torch(q, k, v, **kw).transpose(2, 3)
                  .reshape(q.shape))
    extra_backend("nan", lambda q, k, v, **kw: attention_torch(q, k, v, **kw) * float("nan"))
    with registry.recording_choices() as chosen:
        ops.causal_attention(*qkv())
    assert chosen["attention"] not in ("garbage", "nan")
    failed = entries()[0]["failed"]
    assert failed["garbage"].startswith("FastGPTError: wrong result: tensor 0 differs from the "
                                        "reference by")
    assert failed["nan"] == "FastGPTError: wrong result: tensor 0 is not finite"


def test_gradients_are_checked_too(timings, extra_backend):
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            return attention_torch(q, k, v)

        @staticmethod
        def backward(ctx, g):
            return g, g, g                     # not attention's gradients
    timings[0]["wrong_grad"] = 0.0
    extra_backend("wrong_grad", lambda q, k, v, **kw: WrongGrad.apply(q, k, v))
    with registry.recording_choices() as chosen:
        ops.causal_attention(*qkv())
    assert chosen["attention"] != "wrong_grad"
    assert "differs from the reference" in entries()[0]["failed"]["wrong_grad"]
    # inference has no gradients: there it is as good as any
    measured.forget()
    with torch.no_grad(), registry.recording_choices() as chosen:
        ops.causal_attention(*qkv(requires_grad=False))
    assert chosen["attention"] == "wrong_grad"


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "something-else"}),
                                     json.dumps([1, 2])])
def test_a_corrupt_or_foreign_cache_is_ignored_and_rewritten(timings, caplog, content):
    path = measured.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    ops.causal_attention(*qkv())
    warning, = [r.message for r in caplog.records if "ignoring the dispatch cache" in r.message]
    assert str(path) in warning and "it will be rewritten" in warning
    assert json.loads(path.read_text())["format"] == "fastgpt-dispatch-cache" and len(entries()) == 1


def test_other_versions_and_other_candidates_are_measured_again(timings, extra_backend):
    _, timed = timings
    ops.causal_attention(*qkv())
    data = json.loads(measured.cache_path().read_text())
    (sig, entry), = data["entries"].items()
    # an entry of another torch is kept in the file but not used
    data["entries"]["torch 0.0 | attention"] = {**entry, "versions": "torch 0.0"}
    measured.cache_path().write_text(json.dumps(data))
    assert list(measured.read_cache()) == [sig]
    # a backend installed since: the cached entry does not cover it, so measure again
    measured.forget()
    extra_backend("newcomer", attention_torch)
    timed.clear()
    ops.causal_attention(*qkv())
    assert "newcomer" in timed and "newcomer" in measured.read_cache()[sig]["times_ms"]
    assert len(json.loads(measured.cache_path().read_text())["entries"]) == 2


def test_under_compile_the_measurement_runs_eagerly_and_the_graph_holds_the_choice(
        timings, extra_backend):
    speeds, timed = timings
    calls = []

    def marked(q, k, v, **kw):
        calls.append(1)          # in the compiled graph: a side effect replayed on each call
        return attention_torch(q, k, v, **kw)
    extra_backend("marked", marked)
    speeds["marked"] = 0.0
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: ops.causal_attention(q, k, v), fullgraph=True)
    q, k, v = qkv()
    out = fn(q, k, v)
    out.sum().backward()
    assert "marked" in timed and entries()[0]["chosen"] == "marked"
    # measured eagerly (the check and the timer's run: 2 calls), then the graph's first call
    assert len(calls) == 3
    fn(q, k, v)
    assert len(calls) == 4
    torch.testing.assert_close(out, attention_torch(q, k, v))


def test_the_measurement_leaves_the_rng_streams_alone(timings):
    torch.manual_seed(3)
    ops.causal_attention(*qkv())          # measures
    after_measuring = torch.rand(3)
    torch.manual_seed(3)
    ops.causal_attention(*qkv())          # cached in this process
    assert torch.equal(torch.rand(3), after_measuring)


def test_every_op_measures_on_inputs_of_its_bucket(timings, monkeypatch):
    speeds, timed = timings
    monkeypatch.setattr(ops.registry, "_BACKENDS", {op: dict(b) for op, b in
                                                    registry._BACKENDS.items()})
    for op in ("cross_entropy", "linear_cross_entropy", "embedding", "transformer_block"):
        registry.register(op, "twin", registry.get(op, "torch").fn)
    C, V, N = 16, 37, 40
    w = torch.randn(V, C, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    ops.cross_entropy(torch.randn(N, V, requires_grad=True), targets)
    ops.linear_cross_entropy(torch.randn(N, C, requires_grad=True), w, targets)
    ops.embedding(torch.randint(0, V, (2, 20)), w)
    block = GPT(GPTConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=C, block_size=32)).transformer.h[0]
    block(torch.randn(2, 20, C, requires_grad=True))
    shapes = {e["op"]: e["shape"] for e in entries()}
    assert shapes == {
        "cross_entropy": "N=64 V=37 ignore_index=-100 label_smoothing=0.0 reduction=mean "
                         "return_z_loss=False softcap=None z_loss=0.0",
        "linear_cross_entropy": "N=64 C=16 V=37 bias=False ignore_index=-100 label_smoothing=0.0 "
                                "reduction=mean return_z_loss=False softcap=None z_loss=0.0",
        "embedding": "indices=(2, 32) V=37 C=16 padding_idx=None",
        "transformer_block": "B=2 T=32 C=16 F=64 n_head=2 bias=False dropout=False attention=None",
        # the block's torch backend calls attention, which measures its own signature
        "attention": "B=2 H=2 T=32 D=8 dropout=False"}
    assert all(not e["failed"] for e in entries()), entries()


def test_the_dispatch_command_prints_and_clears_the_cache(timings, capsys):
    ops.causal_attention(*qkv())
    assert main(["dispatch"]) == 0
    out = capsys.readouterr().out
    assert f"# 1 cached choice(s) in {measured.cache_path()}" in out
    assert "B=2 H=3 T=32 D=16 dropout=False  train" in out and "sdpa 1 ms" in out
    assert main(["dispatch", "--clear"]) == 0
    assert "removed 1 cached choice(s)" in capsys.readouterr().out
    assert entries() == []


def test_a_training_run_measures_once_then_reuses_the_cache(tmp_path):
    """`FASTGPT_DISPATCH=measure fastgpt train`: the first run logs and caches its choices, the
    second measures nothing."""
    env = {**os.environ, "FASTGPT_DISPATCH": "measure"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "fastgpt", "train", "--max-iters", "4", "--eval-interval", "4",
           "--eval-iters", "2", "--n-layer", "1", "--no-progress", "--sample-chars", "20",
           "--dtype", "float32"]
    first = subprocess.run(cmd + ["--out-dir", str(tmp_path / "a")], env=env, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    measuring = [l for l in first.stderr.splitlines() if l.startswith("fastgpt: dispatch ")]
    assert any(" attention float32 " in l and "(train)" in l for l in measuring), first.stderr
    assert any("(inference)" in l for l in measuring)            # the evaluation's signatures
    cached = measured.read_cache()
    assert len(cached) == len(measuring)
    second = subprocess.run(cmd + ["--out-dir", str(tmp_path / "b")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "fastgpt: dispatch " not in second.stderr
    assert measured.read_cache() == cached


def test_training_completes_when_a_fast_backend_raises(timings, extra_backend, tmp_path, caplog):
    speeds, _ = timings
    speeds["broken"] = 0.0

    def broken(q, k, v, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    extra_backend("broken", broken)
    result = train(RunOptions(out_dir=str(tmp_path / "run"), preset="baby", progress=False,
                              sample_chars=0, dtype="float32", header=False,
                              overrides={"max_iters": 2, "eval_iters": 1, "n_layer": 1,
                                         "transformer_block": "torch"}))
    assert result.iter_num == 2 and result.val_loss < 5
    dropped = [r.message for r in caplog.records if "drops attention backend 'broken'" in r.message]
    assert dropped and all("illegal memory access" in m for m in dropped)

"""`fastgpt train --profile` (trace, per-op table), the FLOP count and MFU, TensorBoard scalars."""

import json
import logging
import math

import pytest
import torch

from fastgpt import flops, ops, peaks, profiling
from fastgpt.cli import main
from fastgpt.config import GPTConfig
from fastgpt.errors import FastGPTError
from fastgpt.model import GPT, BigramLanguageModel
from fastgpt.ops import labels, measured, registry
from fastgpt.train import RunOptions, train

TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_iters=2,
            eval_interval=100, log_interval=1, warmup_iters=2, lr_decay_iters=30, dropout=0.0)


def run(out_dir, **kw):
    overrides = {**TINY, **kw.pop("overrides", {})}
    return train(RunOptions(out_dir=str(out_dir), preset="baby", progress=False, sample_chars=0,
                            dtype=kw.pop("dtype", "float32"), overrides=overrides, **kw))


def rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """A float32 run with the torch block (so attention is a call of its own), steps 2..4 profiled."""
    out = tmp_path_factory.mktemp("profiled")
    run(out, profile=True, profile_wait=2, profile_steps=3,
        overrides={"max_iters": 6, "transformer_block": "torch"})
    return out


def test_trace_is_chrome_json_with_every_backend_s_label(profiled):
    events = json.loads((profiled / "trace.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    backends = next(r for r in rows(profiled) if r["kind"] == "run")["backends"]
    assert set(backends) == {"embedding", "transformer_block", "attention", "linear_cross_entropy"}
    for op, name in backends.items():
        assert f"fastgpt.{op}[{name}]" in names, (op, name)
    assert {"fastgpt.optimizer", "fastgpt.data"} <= names
    steps = [e for e in events if str(e.get("name", "")).startswith("ProfilerStep#")]
    assert len(steps) == 3                        # --profile-steps
    assert any(e.get("args", {}).get("Input Dims") for e in events)      # shapes recorded
    assert any(e.get("name") == "[memory]" for e in events)              # memory recorded


def test_profile_table_lists_the_step_s_parts(profiled):
    text = (profiled / "profile.txt").read_text()
    table = text.split("top 15 ops")[0]
    for label in ("fastgpt.attention[", "fastgpt.transformer_block[torch]",
                  "fastgpt.linear_cross_entropy[", "fastgpt.optimizer", "fastgpt.embedding[",
                  "other"):
        assert label in table, label
    assert "mean step:" in table and "over 3 steps" in table
    shares = [float(line.rsplit(None, 1)[1].rstrip("%")) for line in table.splitlines()
              if line.startswith(("fastgpt.", "other"))]
    assert sum(shares) == pytest.approx(100.0, abs=0.5)    # exclusive parts of the step
    assert "Self CPU" in text.split("top 15 ops")[1]          # torch's kernel table follows


def test_breakdown_puts_backward_with_the_op_that_made_it():
    """Backward nodes go to the label whose forward created them (by sequence number); a matmul
    outside any label is "other"; nested labels are exclusive; the parts add up to the step."""
    q, k, v = (torch.randn(2, 2, 32, 16, requires_grad=True) for _ in range(3))
    w = torch.randn(16, 16, requires_grad=True)
    with torch.profiler.profile(schedule=torch.profiler.schedule(wait=0, warmup=1, active=2,
                                                                 repeat=1)) as prof:
        for _ in range(3):
            with labels.labelled("fastgpt.outer"):
                out = ops.causal_attention(q @ w, k, v, backend="torch")
            out.square().sum().backward()
            prof.step()
    b = profiling.breakdown(prof.events())
    assert b.steps == 2
    attn, outer = b.by_label["fastgpt.attention[torch]"], b.by_label["fastgpt.outer"]
    assert attn.forward_us > 0 and attn.backward_us > 0
    # q @ w ran inside the outer label only: its MmBackward0 is the outer label's
    assert outer.backward_us > 0
    total = sum(s.total_us for s in b.by_label.values())
    assert total == pytest.approx(b.step_us, rel=1e-6)
    assert b.by_label["other"].backward_us > 0             # square, sum: no label


def test_labels_cost_one_check_without_a_profiler(monkeypatch):
    """Outside a profile no record_function range is opened (each costs ~15 us)."""
    def forbidden(name):
        raise AssertionError(f"record_function({name!r}) opened without a profiler")
    monkeypatch.setattr(torch.profiler, "record_function", forbidden)
    q = torch.randn(1, 1, 4, 8)
    ops.causal_attention(q, q, q)
    with labels.labelled("fastgpt.data"):
        pass


def test_labelled_ops_compile_fullgraph_while_profiling():
    f = torch.compile(lambda q: ops.causal_attention(q, q, q, backend="torch"), fullgraph=True)
    q = torch.randn(1, 2, 8, 16)
    with torch.profiler.profile():
        out = f(q)
    torch.testing.assert_close(out, registry.get("attention", "torch").fn(q, q, q))


def test_profile_window_must_fit_the_run(tmp_path):
    with pytest.raises(FastGPTError, match=r"--profile-wait 10 \+ --profile-steps 5 = 15 steps, "
                                           r"but the run has 6 steps left"):
        run(tmp_path / "out", profile=True, overrides={"max_iters": 6})
    assert not (tmp_path / "out").exists()          # checked before anything is created
    with pytest.raises(FastGPTError, match="need wait >= 0 and steps >= 1"):
        run(tmp_path / "out", profile=True, profile_steps=0, overrides={"max_iters": 6})


def test_cli_profile_flags(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out-dir", str(out), "--max-iters", "3", "--n-layer", "1",
                 "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "2",
                 "--eval-iters", "1", "--dtype", "float32", "--sample-chars", "0",
                 "--no-progress", "--profile", "--profile-wait", "1", "--profile-steps", "1"]) == 0
    said = capsys.readouterr().out
    assert f"profile of iterations 1..1: {out / 'trace.json'}, {out / 'profile.txt'}" in said
    assert "FLOPs per token (fastgpt.flops)" in said and "MFU against measured" in said


# --- FLOPs and MFU ----------------------------------------------------------------------------

def test_flops_per_token_matches_a_hand_count():
    m = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=4, vocab_size=10, bias=True)
    # parameters but the position table: wte (tied head) 10*8 = 80; per layer ln_1 + ln_2
    # 2*(8+8) = 32, c_attn 8*24+24 = 216, attn c_proj 8*8+8 = 72, c_fc 8*32+32 = 288,
    # mlp c_proj 32*8+8 = 264 -> 872; ln_f 16: 80 + 2*872 + 16 = 1840
    n = 1840
    # attention: per layer 2 matmuls x 2 FLOPs x C x T = 4*8*4 = 128 forward, causal half 64,
    # forward + backward x3 = 192; 2 layers 384
    assert flops.flops_per_token(GPT(m)) == 6 * n + 384
    assert GPT(m).num_params() == n
    assert flops.flops_per_token(BigramLanguageModel(m)) == 0


def test_mfu_divides_by_the_device_s_data_sheet_peak(monkeypatch):
    fake = peaks.DevicePeaks("Fake", fp32=10.0, tf32=None, bf16=100.0, fp16=100.0,
                             bandwidth_gbs=1.0, source="test")
    monkeypatch.setattr(peaks, "PEAKS", (("Fake GPU 9000", fake),))
    monkeypatch.setattr(flops, "describe", lambda device: "NVIDIA Fake GPU 9000")
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    fpt = flops.flops_per_token(model)
    rates = flops.throughput(model, torch.device("cuda"), torch.bfloat16, world_size=4)
    assert rates.peak_tflops == 100.0 and "data sheet" in rates.peak_source
    tok_s = 1e9
    assert rates.tflops(tok_s) == pytest.approx(fpt * tok_s / 4 / 1e12)     # per device, once
    assert rates.mfu(tok_s) == pytest.approx(fpt * tok_s / 4 / 1e12 / 100.0)
    monkeypatch.setattr(flops, "describe", lambda device: "NVIDIA Unknown 1")
    unknown = flops.throughput(model, torch.device("cuda"), torch.bfloat16)
    assert unknown.mfu(tok_s) is None and unknown.tflops(tok_s) > 0
    assert "MFU unknown" in unknown.peak_source and "NVIDIA Unknown 1" in unknown.peak_source


def test_cpu_peak_is_a_measured_matmul_rate():
    rate = flops.cpu_matmul_peak_tflops(torch.float32, seconds=0.05)
    assert 1e-4 < rate < 100         # TFLOP/s of a real matmul on some CPU
    rates = flops.throughput(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8,
                                           vocab_size=32)), torch.device("cpu"), torch.float32)
    assert rates.peak_source.startswith("measured: 1 s matmul probe in float32")


def test_train_rows_report_tflops_and_mfu(profiled):
    got = rows(profiled)
    run_row = next(r for r in got if r["kind"] == "run")
    train_rows = [r for r in got if r["kind"] == "train"]
    assert len(train_rows) == 6
    for r in train_rows:
        assert r["tflops"] == pytest.approx(run_row["flops_per_token"] * r["tokens_per_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops"] / run_row["peak_tflops"])
        assert r["grad_norm"] > 0 and math.isfinite(r["grad_norm"])


# --- TensorBoard ------------------------------------------------------------------------------

def test_tensorboard_holds_every_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, tb = tmp_path / "run", tmp_path / "tb"
    run(out, tensorboard=str(tb), overrides={"max_iters": 4, "eval_interval": 2})
    acc = EventAccumulator(str(tb))
    acc.Reload()
    got = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    train_rows = {r["iter"]: r for r in rows(out) if r["kind"] == "train"}
    eval_rows = {r["iter"]: r for r in rows(out) if r["kind"] == "eval"}
    for tag, key in (("train/loss", "train_loss"), ("train/lr", "lr"),
                     ("train/grad_norm", "grad_norm"), ("perf/tokens_per_s", "tokens_per_s"),
                     ("perf/tflops", "tflops"), ("perf/mfu", "mfu")):
        assert got[tag] == pytest.approx({i: r[key] for i, r in train_rows.items()}), tag
    assert got["estimate/val_loss"] == pytest.approx({i: r["val_loss"]
                                                      for i, r in eval_rows.items()})
    assert got["estimate/train_loss"] == pytest.approx({i: r["train_loss"]
                                                        for i, r in eval_rows.items()})
    assert sorted(eval_rows) == [0, 2, 4]


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(FastGPTError, match=r"--tensorboard needs the tensorboard package .*"
                                           r"pip install tensorboard"):
        run(tmp_path / "out", tensorboard=str(tmp_path / "tb"), overrides={"max_iters": 2})
    assert not (tmp_path / "out").exists()


def test_the_cpu_probe_leaves_the_run_s_random_stream_alone():
    """A probe the process measures once must not shift the dropout masks of the run that paid
    for it: a second run in the same process (cached probe) would differ from the first."""
    torch.manual_seed(5)
    flops.probe(torch.float64, seconds=0.01)
    after = torch.rand(3)
    torch.manual_seed(5)
    torch.testing.assert_close(after, torch.rand(3))


# --- the CPU probe's cache --------------------------------------------------------------------

@pytest.fixture
def probes(monkeypatch, tmp_path):
    """A cache folder of this test's own, no peak this process has seen, and a probe that counts
    its calls and returns a new figure each time (so a figure read back shows which call made it)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(flops, "_SEEN", {})
    calls = []

    def fake_probe(dtype, seconds=flops.PROBE_SECONDS):
        calls.append((dtype, torch.get_num_threads()))
        return 0.5 + len(calls), 256
    monkeypatch.setattr(flops, "probe", fake_probe)
    return calls


def new_process(monkeypatch):
    """What a later process sees: the cache file, none of this process's figures."""
    monkeypatch.setattr(flops, "_SEEN", {})


def test_the_probe_runs_once_then_its_figure_is_read_from_the_cache(probes, monkeypatch, tmp_path):
    assert flops.peak_cache_path() == tmp_path / "cache" / "fastgpt" / "cpu_matmul_peak.json"
    assert flops.peak_cache_path().parent == measured.cache_path().parent   # beside dispatch's
    assert flops.cpu_matmul_peak(torch.float32) == (1.5, False)
    assert flops.cpu_matmul_peak(torch.float32) == (1.5, True)
    new_process(monkeypatch)
    assert flops.cpu_matmul_peak(torch.float32) == (1.5, True)      # from the file, not timed
    assert flops.cpu_matmul_peak_tflops(torch.float32) == 1.5
    assert len(probes) == 1
    (entry,) = json.loads(flops.peak_cache_path().read_text())["entries"].values()
    assert entry["tflops"] == 1.5 and entry["dtype"] == "float32"
    assert entry["threads"] == torch.get_num_threads() and entry["torch"] == torch.__version__


def test_another_dtype_thread_count_torch_or_cpu_measures_again(probes, monkeypatch):
    threads = torch.get_num_threads()
    assert flops.cpu_matmul_peak_tflops(torch.float32) == 1.5
    assert flops.cpu_matmul_peak_tflops(torch.bfloat16) == 2.5
    try:
        torch.set_num_threads(threads + 1)
        assert flops.cpu_matmul_peak_tflops(torch.float32) == 3.5
    finally:
        torch.set_num_threads(threads)
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "9.9.9")
        assert flops.cpu_matmul_peak_tflops(torch.float32) == 4.5
    new_process(monkeypatch)
    monkeypatch.setattr(flops, "probe", lambda dtype, seconds=1.0: pytest.fail("measured"))
    assert flops.cpu_matmul_peak_tflops(torch.float32) == 1.5      # each key kept its figure
    assert flops.cpu_matmul_peak_tflops(torch.bfloat16) == 2.5
    monkeypatch.setattr(flops, "cpu_model", lambda: "Another CPU")
    monkeypatch.setattr(flops, "probe", lambda dtype, seconds=1.0: (7.0, 256))
    assert flops.cpu_matmul_peak_tflops(torch.float32) == 7.0
    assert len(flops.read_peak_cache()) == 5
    assert [c[1] for c in probes] == [threads, threads, threads + 1, threads]


@pytest.mark.parametrize("content,why", [
    ("{not json", "JSONDecodeError"),
    ("[1, 2]", "not a fastgpt-cpu-matmul-peak file"),
])
def test_a_corrupt_cache_is_ignored_with_a_warning_and_rewritten(probes, caplog, content, why):
    path = flops.peak_cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="fastgpt"):
        assert flops.cpu_matmul_peak(torch.float32) == (1.5, False)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"fastgpt: ignoring the CPU matmul peak cache {path}: ")
    assert why in warning and warning.endswith("it will be rewritten")
    data = json.loads(path.read_text())                       # rewritten, with the new figure
    assert data["format"] == "fastgpt-cpu-matmul-peak"
    assert [e["tflops"] for e in data["entries"].values()] == [1.5]


def test_an_entry_without_a_rate_is_measured_again(probes, monkeypatch):
    flops.cpu_matmul_peak(torch.float32)
    path = flops.peak_cache_path()
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        entry["tflops"] = -1
    path.write_text(json.dumps(data))
    new_process(monkeypatch)
    assert flops.cpu_matmul_peak(torch.float32) == (2.5, False)


def test_an_unwritable_cache_warns_and_measures_once_per_process(probes, monkeypatch, tmp_path,
                                                                 caplog):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))   # no folder can go there
    with caplog.at_level(logging.WARNING, logger="fastgpt"):
        assert flops.cpu_matmul_peak(torch.float32) == (1.5, False)
        assert flops.cpu_matmul_peak(torch.float32) == (1.5, True)
    assert len(probes) == 1
    assert any("cannot write the CPU matmul peak cache" in r.getMessage() for r in caplog.records)


def test_the_header_says_a_peak_was_cached(probes):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    first = flops.throughput(model, torch.device("cpu"), torch.float32)
    again = flops.throughput(model, torch.device("cpu"), torch.float32)
    assert first.peak_source == "measured: 1 s matmul probe in float32, 1.5 TFLOP/s"
    assert again.peak_source == ("measured: 1 s matmul probe in float32, 1.5 TFLOP/s (cached; "
                                 "`fastgpt dispatch --clear` measures again)")
    assert again.peak_tflops == 1.5 and len(probes) == 1


def test_dispatch_lists_and_clears_the_cached_peaks(probes, capsys):
    flops.cpu_matmul_peak(torch.float32)
    assert main(["dispatch"]) == 0
    out = capsys.readouterr().out
    assert f"# 1 cached CPU matmul peak(s) in {flops.peak_cache_path()}" in out
    assert f"{flops.peak_key(torch.float32)}: 1.5 TFLOP/s" in out
    assert main(["dispatch", "--clear"]) == 0
    out = capsys.readouterr().out
    assert "removed 0 cached choice(s)" in out
    assert f"removed 1 cached CPU matmul peak(s) from {flops.peak_cache_path()}" in out
    assert not flops.peak_cache_path().exists()
    assert flops.cpu_matmul_peak(torch.float32) == (2.5, False)    # measured again
    with pytest.raises(SystemExit):
        main(["dispatch", "--help"])
    assert "cached CPU matmul peaks" in " ".join(capsys.readouterr().out.split())

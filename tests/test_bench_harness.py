"""`fastgpt bench`: the shared harness on tiny grids (table, CSV, PNG), and `bench train`; rows
streamed as they are measured, the progress bar, the memory skip and the default sizes.

Timings are never asserted: only that every command produces well-formed output.
"""

import argparse
import csv
import dataclasses
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgpt import cli
from fastgpt.device import cpu_has_native_bf16
from fastgpt.tools.bench import harness
from fastgpt.tools.bench.suites import SUITES, build, check_providers, memory
from fastgpt.tools.bench.train_steps import parse_config
from fastgpt.tools.bench.harness import (CSV_FIELDS, Built, Case, Row, TableStream, format_table,
                                         run_cases, summarize)
from fastgpt.tools.environment import environment
from fastgpt.errors import FastGPTError

FAST = ["--device", "cpu", "--min-run-time", "0.01"]


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_summarize_and_environment():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s["median"] == 3.0 and 1.0 <= s["p20"] <= s["median"] <= s["p80"] <= 5.0
    assert summarize([7.0]) == {"median": 7.0, "p20": 7.0, "p80": 7.0}
    env = environment("cpu")
    assert set(env) >= {"device", "cpu", "cpu_flags", "threads", "torch", "triton", "git_sha",
                        "date"}
    assert env["threads"] == torch.get_num_threads()


def test_bench_attention_table_csv_plot(tmp_path, capsys):
    out_csv, plots = tmp_path / "bench.csv", tmp_path / "plots"
    argv = ["bench", "attention", *FAST, "--T", "8", "16", "--D", "16", "--B", "1", "--H", "2",
            "--providers", "tril,sdpa,torch", "--modes", "fwd,fwd+bwd",
            "--csv", str(out_csv), "--plot", str(plots)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "attention fwd float32" in text and "attention fwd+bwd float32" in text
    assert "TFLOP/s" in text and "vs tril" in text
    rows = _csv(out_csv)
    assert len(rows) == 2 * 2 * 3
    assert list(rows[0])[-len(CSV_FIELDS):] == CSV_FIELDS
    assert {r["provider"] for r in rows} == {"tril", "sdpa", "torch"}
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["p20_ms"]) <= float(r["p80_ms"])
        assert r["device"] and r["threads"] and r["git_sha"] and r["date"]
    assert all(float(r["speedup"]) == 1.0 for r in rows if r["provider"] == "tril")
    pngs = sorted(plots.glob("*.png"))
    assert len(pngs) == 2 and all(_png(p) for p in pngs)     # one chart per mode
    # a second run appends under the same header
    assert cli.main(argv[:-4] + ["--csv", str(out_csv)]) == 0
    assert len(_csv(out_csv)) == 2 * len(rows)


def test_bench_cross_entropy_and_embedding(tmp_path, capsys):
    out_csv, plots = tmp_path / "b.csv", tmp_path / "p"
    assert cli.main(["bench", "cross-entropy", *FAST, "--in-process", "--N", "32", "64", "--C",
                     "16", "--V", "100", "--providers", "torch,chunked", "--csv", str(out_csv),
                     "--plot", str(plots)]) == 0
    assert cli.main(["bench", "embedding", *FAST, "--N", "16", "--C", "8", "--V", "10",
                     "--csv", str(out_csv)]) == 0
    text = capsys.readouterr().out
    assert "linear_cross_entropy fwd+bwd float32" in text and "GB/s" in text
    rows = _csv(out_csv)
    lce = [r for r in rows if r["op"] == "linear_cross_entropy"]
    assert {r["provider"] for r in lce} == {"torch", "chunked"} and len(lce) == 4
    emb = [r for r in rows if r["op"] == "embedding"]
    assert {r["mode"] for r in emb} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["provider"] for r in emb} == {"torch", "ext"}
    assert all(r["unit"] == "GB/s" and float(r["rate"]) > 0 for r in emb)
    pngs = list(plots.glob("*peak_mb.png"))       # memory vs N
    assert pngs and all(_png(p) for p in pngs)


def test_bench_transformer_block(tmp_path, capsys):
    out_csv = tmp_path / "tb.csv"
    # the op's spelling works as well as the suite's (transformer-block)
    assert cli.main(["bench", "transformer_block", *FAST, "--B", "1", "--T", "8", "--C", "16",
                     "--H", "2", "--csv", str(out_csv)]) == 0
    text = capsys.readouterr().out
    assert "transformer_block fwd+bwd bfloat16" in text and "vs torch" in text
    rows = _csv(out_csv)
    assert len(rows) == 2 * 3 * 2     # dtypes x modes x providers
    assert {r["provider"] for r in rows} == {"torch", "ext"}
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert all(r["unit"] == "TFLOP/s" and float(r["rate"]) > 0 for r in rows), rows
    assert all(float(r["speedup"]) == 1.0 for r in rows if r["provider"] == "torch")


def test_transformer_block_flops():
    B, T, C, H = 2, 16, 32, 4
    flops = {mode: build(Case("transformer-block", "transformer_block", "torch", mode,
                              dict(B=B, T=T, C=C, H=H), "float32"), "cpu").flops
             for mode in ("fwd", "bwd", "fwd+bwd")}
    linear, attention = 2 * B * T * 12 * C * C, 4 * B * H * T * T * (C // H) / 2
    assert flops["fwd"] == linear + attention
    assert flops["bwd"] == 2 * linear + 2.5 * attention
    assert flops["fwd+bwd"] == flops["fwd"] + flops["bwd"]


def test_isolated_case_reports_memory():
    case = Case("cross-entropy", "linear_cross_entropy", "torch", "fwd+bwd",
                dict(N=256, C=16, V=2048), "float32")
    (row,) = run_cases([case], "cpu", "torch", build, min_run_time=0.01, isolate=True)
    assert not row.skipped, row.skipped
    assert row.median > 0 and row.speedup == 1.0 and row.unit == "TFLOP/s"
    assert row.peak_mb is not None and row.peak_mb >= 0


def test_unrunnable_provider_is_skipped_not_fatal(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # triton on CPU: supports() says no
    assert cli.main(["bench", "attention", *FAST, "--T", "8", "--D", "16", "--B", "1", "--H", "1",
                     "--providers", "tril,triton", "--modes", "fwd"]) == 0
    text = capsys.readouterr().out
    assert "skipped:" in text and "tril" in text


def test_bench_train(tmp_path, capsys):
    out_csv = tmp_path / "t.csv"
    assert cli.main(["bench", "train", "--device", "cpu", "--preset", "baby", "--iters", "30",
                     "--rounds", "1", "--configs", "attention=tril@float32",
                     "--csv", str(out_csv)]) == 0
    text = capsys.readouterr().out
    assert "tokens/s" in text and "ms/iter" in text and "attention=tril@float32" in text
    rows = _csv(out_csv)
    assert len(rows) == 1 and all(r["unit"] == "tokens/s" and float(r["rate"]) > 0 for r in rows)


def test_train_config_specs():
    assert parse_config("tril fp32") == {"attention": "tril", "dtype": "float32"}
    assert parse_config("attention=tril,embedding=ext@bfloat16") == \
        {"attention": "tril", "embedding": "ext", "dtype": "bfloat16"}
    with pytest.raises(FastGPTError, match="bad train config"):
        parse_config("softmax=fast")


@pytest.mark.parametrize("argv, message", [
    (["bench", "attention", "--device", "cuda"], "sees no CUDA device"),
    (["bench", "attention", "--device", "cpu", "--modes", "sideways"], "--modes sideways"),
    (["bench", "train", "--device", "cpu", "--iters", "5"], "--iters 5"),
    (["bench", "transformer-block", "--device", "cpu", "--C", "10", "--H", "4"],
     "--C 10 is not a multiple of --H 4"),
    (["bench", "transformer-block", "--device", "cpu", "--dropout", "1.5"],
     "--dropout must be in [0, 1); got 1.5"),
    (["bench", "attention", "--device", "cpu", "--dtype", "flaot32"],
     "--dtype 'flaot32' is not a dtype; dtypes: float32, bfloat16, float16"),
    (["bench", "cross-entropy", "--device", "cpu", "--providers", "tril"],
     "--providers 'tril': not a provider of cross-entropy; providers: torch, chunked"),
    (["bench", "all", "--device", "cpu", "--providers", "ext", "trill"],
     "--providers 'trill': not a provider of attention, cross-entropy, embedding, "
     "transformer-block; providers: loop, tril"),
])
def test_bad_arguments(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # "no CUDA" on any machine
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastgpt: error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_a_provider_some_suites_lack_is_timed_where_it_exists():
    # `bench all --providers ext`: ext's cases, and none of cross-entropy, which has no ext
    check_providers(["ext"], list(SUITES))
    args = argparse.Namespace(device="cpu", dtype=None, providers="ext", modes="fwd", T=[8],
                              D=[16], B=1, H=2, N=[16], C=[16], V=[10], quick=True,
                              full=False)
    assert {c.provider for c in SUITES["attention"].cases(args)} == {"ext"}
    assert SUITES["cross-entropy"].cases(args) == []


# --- the suite's skip rule (tests/conftest.py, also loaded by bench/conftest.py) --------------

SKIP_FREE = '''
import pytest

def test_passes():
    pass

@pytest.mark.cuda
def test_needs_a_gpu():
    pytest.skip("no GPU here")

@pytest.mark.parametrize("kernel", ["cpu", pytest.param("gpu", marks=[
    pytest.mark.cuda, pytest.mark.skipif(True, reason="no GPU here")])])
def test_kernels(kernel):
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_known_failure():
    assert False
'''
SKIPPING = '''
import pytest

def test_lazy():
    pytest.skip("not today")

@pytest.mark.skipif(True, reason="only on my laptop")
def test_marked():
    pass
'''


def _pytest(folder, *files):
    """pytest on ``files`` (name -> source) in ``folder`` with tests/conftest.py as conftest."""
    for name, text in {"conftest.py": Path(__file__).with_name("conftest.py").read_text(),
                       "pytest.ini": "[pytest]\nmarkers =\n    cuda: needs an NVIDIA GPU\n",
                       **dict(files)}.items():
        (folder / name).write_text(text)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(folder)], capture_output=True, text=True, cwd=folder, timeout=300)


def test_skips_of_cuda_tests_pass(tmp_path):
    done = _pytest(tmp_path, ("test_a.py", SKIP_FREE))
    assert done.returncode == 0, done.stdout
    assert "2 skipped" in done.stdout and "skipped without the cuda mark" not in done.stdout


def test_any_other_skip_fails_the_run_and_is_listed(tmp_path):
    module_skip = 'import pytest\npytest.skip("whole module", allow_module_level=True)\n'
    done = _pytest(tmp_path, ("test_a.py", SKIP_FREE), ("test_b.py", SKIPPING),
                   ("test_c.py", module_skip))
    assert done.returncode == 1, done.stdout
    listed = done.stdout.split("skipped without the cuda mark")[1]
    assert "3 test(s) skipped" in listed
    for line in ("test_b.py::test_lazy: not today", "test_b.py::test_marked: only on my laptop",
                 "test_c.py: whole module"):
        assert line in listed, listed
    assert "test_a.py" not in listed


def test_charts_leave_the_matplotlib_backend_alone(tmp_path):
    # as train's loss plot: a caller's backend (a notebook's, say) survives --plot
    code = ("import sys, matplotlib; matplotlib.use('svg'); "
            "from fastgpt.tools.bench.harness import Case, Row, plot; "
            "rows = [Row(Case('attention', 'attention', 'tril', 'fwd', dict(T=T), 'float32'), "
            "median=1.0, rate=float(T), unit='TFLOP/s') for T in (64, 128)]; "
            f"paths = plot(rows, {str(tmp_path)!r}, 'T', 'rate'); "
            "print(len(paths), matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "svg", "False"]
    assert all(_png(p) for p in tmp_path.glob("*.png"))


# --- rows as they are measured, progress, memory, default sizes ------------------------------

def _fake_cases(shapes=(1, 2), providers=("slow", "base")):
    return [Case("fake", "op", p, "fwd", dict(n=n), "float32") for n in shapes for p in providers]


def test_rows_print_as_they_are_measured():
    # a fake op: each build records what the table showed when its case began
    out, seen = io.StringIO(), {}

    def build_fake(case, device):
        seen[(case.shape["n"], case.provider)] = out.getvalue()
        return Built(lambda: None, bytes=1e6)
    cases = _fake_cases()
    with TableStream(cases, "base", "cpu", bar=False, out=out) as stream:
        rows = run_cases(cases, "cpu", "base", build_fake, min_run_time=0.001, progress=stream)
    assert seen[(1, "base")] == ""
    before_second = seen[(2, "base")]       # shape 2's first case: shape 1's rows are out
    lines = [ln.split() for ln in before_second.splitlines() if ln.startswith("  ")]
    assert [ln[0] for ln in lines] == ["provider", "base", "slow"], before_second
    assert lines[1][-1] == "1.00x" and lines[2][-1].endswith("x")   # speedups known already
    assert "n=2" not in before_second
    # baseline first, and the streamed table is format_table's
    assert [r.case.provider for r in rows] == ["base", "slow", "base", "slow"]
    assert out.getvalue().rstrip("\n") == format_table(rows, "base", "cpu")


def test_table_blocks_stay_together_and_skipped_rows_wait_for_their_unit():
    # cases interleave modes (as embedding's list does): rows come out one block per mode;
    # a block whose first rows are skipped still heads its rate column with the unit
    cases = [Case("fake", "op", p, mode, dict(n=n), "float32")
             for n in (1, 2) for mode in ("fwd", "bwd") for p in ("base", "other")]
    cases[0].skip = "not here"

    def build_fake(case, device):
        return Built(lambda: None, flops=1e6)
    out = io.StringIO()
    with TableStream(cases, "base", "cpu", bar=False, out=out) as stream:
        rows = run_cases(cases, "cpu", "base", build_fake, min_run_time=0.001, progress=stream)
    assert [(r.case.mode, r.case.shape["n"]) for r in rows] == \
        [("fwd", 1)] * 2 + [("fwd", 2)] * 2 + [("bwd", 1)] * 2 + [("bwd", 2)] * 2
    text = out.getvalue()
    assert text.count("op fwd float32") == 1 and text.count("op bwd float32") == 1
    assert "TFLOP/s" in text.split("op bwd")[0] and "skipped: not here" in text
    assert text.rstrip("\n") == format_table(rows, "base", "cpu")


def test_progress_bar_counts_cases_and_estimates_time_left():
    out, err = io.StringIO(), io.StringIO()
    cases = _fake_cases(shapes=(1, 2, 3), providers=("base",))
    rows = [Row(c, median=1.0, p20=1.0, p80=1.0, rate=1.0, unit="GB/s") for c in cases]
    with TableStream(cases, "base", "cpu", desc="fake", bar=True, out=out, err=err) as stream:
        stream.measuring(cases[:1])
        stream.measured(rows[0])
        assert "fake: 1/3 cases" in err.getvalue() and "left" in err.getvalue()
        assert "now: op fwd n=1" in err.getvalue()
        for r in rows[1:]:
            stream.measured(r)
    assert "3/3 cases" in err.getvalue() and "elapsed" in err.getvalue()
    assert "\r" not in out.getvalue() and "cases" not in out.getvalue()   # rows stay clean
    # by default the bar shows only on a terminal: nothing on a StringIO (a log, a pipe)
    quiet = io.StringIO()
    with TableStream(cases, "base", "cpu", out=io.StringIO(), err=quiet) as stream:
        for r in rows:
            stream.measured(r)
    assert quiet.getvalue() == ""


TINY_ATTENTION = ["bench", "attention", *FAST, "--D", "16", "--B", "1", "--H", "2",
                  "--modes", "fwd"]


def test_a_case_that_does_not_fit_in_memory_is_skipped_with_the_numbers(capsys, monkeypatch,
                                                                         tmp_path):
    free = 3 * 2 ** 20
    monkeypatch.setattr(harness, "free_memory", lambda device: free)
    out_csv = tmp_path / "m.csv"
    assert cli.main([*TINY_ATTENTION, "--T", "8", "512", "--providers", "tril,sdpa",
                     "--csv", str(out_csv)]) == 0
    text = capsys.readouterr().out
    big = Case("attention", "attention", "tril", "fwd", dict(B=1, H=2, T=512, D=16), "float32")
    assert memory(big) > free > memory(dataclasses.replace(big, provider="sdpa"))
    why = f"needs ~{harness.format_bytes(memory(big))}, 3.0 MB free"
    assert re.search(rf"^  tril +B=1 H=2 T=512 D=16 skipped: {re.escape(why)}$", text, re.M), text
    rows = {(r["provider"], r["shape"].split()[2]): r for r in _csv(out_csv)}
    assert rows[("tril", "T=512")]["skipped"] == why
    sdpa = rows[("sdpa", "T=512")]
    assert float(sdpa["median_ms"]) > 0 and sdpa["speedup"] == ""      # no baseline to be over
    assert rows[("tril", "T=8")]["skipped"] == "" and float(rows[("sdpa", "T=8")]["speedup"]) > 0


def test_isolated_cases_are_checked_before_a_process_starts(monkeypatch):
    monkeypatch.setattr(harness, "free_memory", lambda device: 1024)
    monkeypatch.setattr(harness, "_measure_isolated", lambda *a: pytest.fail("a worker started"))
    cases = [Case("cross-entropy", "linear_cross_entropy", p, "fwd+bwd", dict(N=64, C=16, V=100),
                  "float32") for p in ("torch", "chunked")]
    rows = run_cases(cases, "cpu", "torch", build, 0.01, isolate=True, need=memory)
    assert all(r.skipped.startswith("needs ~") and r.skipped.endswith(", 1 KB free")
               for r in rows), [r.skipped for r in rows]


def test_free_memory_reads_the_machine():
    free = harness.free_memory("cpu")
    assert free is None or free > 0
    assert harness.memory_shortfall(2 * 2 ** 30, None) == ""      # unknown: run it
    assert harness.memory_shortfall(2 ** 20, 2 ** 30) == ""
    assert harness.memory_shortfall(int(9.1 * 2 ** 30), int(6.2 * 2 ** 30)) == \
        "needs ~9.1 GB, 6.2 GB free"


@pytest.mark.parametrize("case", [
    Case("attention", "attention", p, m, dict(B=2, H=2, T=128, D=32), dt)
    for p in ("tril", "torch", "sdpa", "ext") for m in ("fwd", "fwd+bwd")
    for dt in ("float32", "bfloat16")] + [
    Case("cross-entropy", "linear_cross_entropy", p, "fwd+bwd", dict(N=128, C=16, V=2000),
         "float32") for p in ("torch", "chunked")] + [
    Case("cross-entropy", "cross_entropy", "torch", "fwd+bwd", dict(N=128, V=2000), "float32"),
    Case("embedding", "embedding", "ext", "fwd+bwd", dict(V=500, N=256, C=32), "float32"),
    Case("transformer-block", "transformer_block", "ext", "fwd+bwd",
         dict(B=2, T=64, C=64, H=4), "float32")] + [
    Case("transformer-block", "transformer_block", p, "fwd+bwd",
         dict(B=2, T=64, C=64, H=4, p=0.2), "float32") for p in ("torch", "ext")],
    ids=lambda c: f"{c.op}-{c.provider}-{c.mode}" + ("-dropout" if "p" in c.shape else ""))
def test_memory_estimates_cover_the_measured_peaks(case):
    harness.allow_repeated_backward()
    built = build(case, "cpu")
    built.fn()
    assert harness.peak_memory_mb(built.fn, "cpu") * 2 ** 20 <= memory(case)


def _args(device="cpu", **kw):
    base = dict(device=device, dtype=None, providers=None, modes=None, T=None, D=None, B=None,
                H=None, N=None, C=None, V=None, quick=False, full=False)
    return argparse.Namespace(**{**base, **kw})


def test_default_cpu_lists_are_smaller_than_full_and_cuda_keeps_its_grid():
    for name, suite in SUITES.items():
        default, full = suite.cases(_args()), suite.cases(_args(full=True))
        quick = suite.cases(_args(quick=True))
        assert len(quick) <= len(full) and len(default) <= len(full), name
        # embedding's default is its full grid (about 1.5 minutes); transformer-block's too
        # where bf16 is native (only an emulating CPU drops the bf16 cases at the larger block)
        if name == "transformer-block":
            bf16 = [c for c in default if c.dtype == "bfloat16"]
            assert len(default) == len(full) if cpu_has_native_bf16() else len(default) < len(full)
            assert {c.shape["T"] for c in bf16} == ({64, 256} if cpu_has_native_bf16() else {64})
        elif name != "embedding":
            assert len(default) < len(full), name
        cuda = suite.cases(_args("cuda"))
        assert cuda == suite.cases(_args("cuda", full=True)), name
    attention = SUITES["attention"].cases(_args("cuda"))
    assert sorted({c.shape["T"] for c in attention}) == [64, 256, 1024, 4096]
    # the Python-loop attention runs at 256 rows by default, 1024 with --full; listed otherwise
    for full, runs in ((False, [64]), (True, [64, 128, 256])):
        loop = [c for c in SUITES["attention"].cases(_args(full=full)) if c.provider == "loop"]
        assert sorted({c.shape["T"] for c in loop if not c.skip}) == runs
        assert all("Python loop over B*T" in c.skip for c in loop if c.shape["T"] not in runs)


def test_loop_beyond_its_rows_is_a_skipped_row(capsys):
    assert cli.main([*TINY_ATTENTION, "--T", "8", "160", "--B", "2", "--H", "1",
                     "--providers", "tril,loop"]) == 0
    text = capsys.readouterr().out
    assert "# attention: 4 cases on cpu; --full: " not in text    # --full adds nothing here
    assert re.search(r"^  loop +B=2 H=1 T=8 D=16 +[\d.]+ ", text, re.M), text
    assert re.search(r"^  loop +B=2 H=1 T=160 D=16 skipped: a Python loop over B\*T = 320 "
                     r"rows, .*: over 256 \(the default's; --full runs up to 1024\)$",
                     text, re.M), text
    assert cli.main(["bench", "attention", "--device", "cpu", "--quick", "--modes", "fwd",
                     "--providers", "tril", "--T", "8", "--min-run-time", "0.01"]) == 0
    assert "; --full: " in capsys.readouterr().out     # the full grid has D=128 as well

"""`fastgpt bench`: the shared harness on tiny grids (table, CSV, PNG), and `bench train`.

Timings are never asserted: only that every command produces well-formed output.
"""

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgpt import cli
from fastgpt.tools.bench.suites import SUITES, build, check_providers
from fastgpt.tools.bench.train_steps import parse_config
from fastgpt.tools.bench.harness import CSV_FIELDS, Case, run_cases, summarize
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
                              D=[16], B=1, H=2, N=[16], C=[16], V=[10], quick=True)
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

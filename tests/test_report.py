"""`fastgpt report` end to end on the CPU (--quick: the command CI keeps from rotting), and what
it does with a stage that fails."""

import csv
import json
import re
from pathlib import Path

import pytest

from fastgpt.cli import main
from fastgpt.tools import report
from fastgpt.tools.bench.harness import Case, Row

SECTIONS = ["## Environment", "## Kernels on", "## Accuracy (`fastgpt check --quick`)",
            "## Training steps", "## CUDA tests", "## Dispatch choices"]


def _hermetic(mp, tmp):
    """No dispatch cache but the test's own, and the default dispatch mode (static on CPU)."""
    mp.setenv("XDG_CACHE_HOME", str(tmp / "cache"))
    mp.delenv("FASTGPT_DISPATCH", raising=False)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One real `fastgpt report --device cpu --quick` (a few minutes), shared by the tests."""
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "cpu.md"
    with pytest.MonkeyPatch.context() as mp:
        _hermetic(mp, tmp)
        code = main(["report", "--device", "cpu", "--quick", "--out", str(out)])
    return code, out, out.read_text()


def table(text: str, heading: str) -> list[dict]:
    """The first Markdown table after ``heading``, as one dict per row."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
    head, body = rows[0], rows[2:]
    return [dict(zip(head, r)) for r in body]


def test_every_stage_passes_on_the_cpu(quick):
    code, _, text = quick
    assert code == 0, text
    stages = {r["stage"]: r for r in table(text, "# fastgpt report")}
    assert list(stages) == ["check", "environment", "bench attention", "bench cross-entropy",
                            "bench embedding", "bench transformer-block", "bench train",
                            "cuda tests", "dispatch choices"]
    for name, row in stages.items():
        want = "not run" if name == "cuda tests" else "passed"
        assert row["result"] == want, row
        assert float(row["seconds"]) >= 0
    assert "these tests need an NVIDIA GPU" in stages["cuda tests"]["note"]
    for heading in SECTIONS:
        assert heading in text


def test_kernel_rows_hold_the_measurements(quick):
    _, _, text = quick
    rows = table(text, "## Kernels on")
    by = {(r["op"], r["mode"], r["provider"]): r for r in rows}
    # every op suite ran, with its naive and fast providers
    for key in [("attention", "fwd+bwd", "tril"), ("attention", "fwd+bwd", "sdpa"),
                ("linear_cross_entropy", "fwd+bwd", "chunked"), ("embedding", "bwd", "ext"),
                ("transformer_block", "fwd", "torch")]:
        assert key in by, key
    for r in rows:
        assert float(r["median ms"]) > 0, r
        rate, unit = r["TFLOP/s or GB/s"].split()
        assert float(rate) >= 0 and unit in ("TFLOP/s", "GB/s"), r
        assert r["% of peak"] == "unknown"          # a CPU has no data-sheet peak
    assert by[("attention", "fwd+bwd", "tril")]["vs naive"] == "1.00x"
    assert by[("attention", "fwd+bwd", "sdpa")]["vs sdpa/torch"] == "1.00x"
    tril = by[("attention", "fwd+bwd", "tril")]
    sdpa = float(by[("attention", "fwd+bwd", "sdpa")]["median ms"])
    assert float(tril["vs sdpa/torch"].rstrip("x")) == pytest.approx(
        sdpa / float(tril["median ms"]), rel=0.02)


def test_check_and_training_sections_are_filled(quick):
    _, _, text = quick
    counts = re.search(r"(\d+) passed, (\d+) failed, (\d+) skipped", text)
    assert int(counts[1]) > 50 and int(counts[2]) == 0
    check = {(r["op"], r["dtype"]): r for r in table(text, "## Accuracy")}
    assert float(check[("attention", "float32")]["worst ratio"]) > 0
    assert int(check[("embedding", "bfloat16")]["passed"]) > 0
    train = {r["config"]: r for r in table(text, "## Training steps")}
    assert set(train) == {"sdpa fp32", "tril fp32"}
    assert all(float(r["ms/iter"]) > 0 and float(r["tokens/s"]) > 0 for r in train.values())
    assert "Preset `baby`" in text
    assert "No cached choices" in text


def test_the_files_beside_the_report(quick):
    _, out, text = quick
    files = out.with_suffix("")
    kernel_rows = table(text, "## Kernels on")
    with open(files / "bench.csv") as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(kernel_rows) + 2          # + the two training configs
    assert {r["op"] for r in records} >= {"attention", "embedding", "train"}
    assert json.loads((files / "check.json").read_text())["quick"] is True
    assert list((files / "plots").glob("attention_*.png"))


def _fake_row(suite: str, provider: str, skipped: str = "") -> Row:
    case = Case(suite, "embedding", provider, "fwd", {"V": 65, "N": 8, "C": 4}, "float32")
    if skipped:
        return Row(case, skipped=skipped)
    return Row(case, median=0.5, p20=0.4, p80=0.6, rate=2.0, unit="GB/s", peak_mb=0.1,
               speedup=1.0)


def test_a_failing_stage_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    _hermetic(monkeypatch, tmp_path)

    def broken_check(args):
        raise RuntimeError("injected failure")

    def cheap_suite(name, args):      # the bench stages run, without timing anything
        if name == "embedding":       # a provider that crashed fails its stage
            return [_fake_row(name, "torch"), _fake_row(name, "ext", "failed: ValueError: x")]
        return [_fake_row(name, "torch")]

    monkeypatch.setattr(report, "run_check_cli", broken_check)
    monkeypatch.setattr(report, "run_suite", cheap_suite)
    monkeypatch.setattr(report, "run_train_bench", lambda args, env: [])
    out = tmp_path / "r.md"
    assert main(["report", "--device", "cpu", "--quick", "--out", str(out)]) == 1
    text = out.read_text()
    stages = {r["stage"]: r for r in table(text, "# fastgpt report")}
    assert stages["check"]["result"] == "failed"
    assert stages["check"]["note"] == "RuntimeError: injected failure"
    assert stages["bench embedding"]["result"] == "failed"
    assert "1 provider run(s) failed: ext fwd" in stages["bench embedding"]["note"]
    for name in ("environment", "bench attention", "bench train", "dispatch choices"):
        assert stages[name]["result"] == "passed", name
    assert "**2 of 9 stages failed**" in text
    assert "## Errors" in text and "injected failure" in text.split("## Errors")[1]
    assert "Not run to the end" in text.split("## Accuracy")[1]
    assert len(table(text, "## Kernels on")) == 4       # the rows the other stages made


def test_cuda_tests_need_a_source_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "tests_folder", lambda: tmp_path / "missing")
    r = report.Report(device="cuda", quick=True, out=tmp_path / "r.md", files=tmp_path)
    with pytest.raises(report.StageNotRun, match="source checkout"):
        report.stage_cuda_tests(r)


def test_files_go_to_the_folder_named_after_the_report():
    assert report.files_dir(Path("gpu-report.md")) == Path("gpu-report")
    assert report.files_dir(Path("out/r")) == Path("out/r-files")


def test_a_cuda_report_shows_peaks_and_mfu(tmp_path):
    # the GPU's sections from made-up rows: CI has no GPU, the day one is present this must work
    r = report.Report(device="cuda", quick=False, out=tmp_path / "gpu.md", files=tmp_path / "gpu",
                      command="fastgpt report --device cuda")
    r.env = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.14.1"}
    r.stages = report.stages()
    for stage in r.stages:
        stage.status = "passed"
    row = Row(Case("attention", "attention", "triton", "fwd", {"T": 1024}, "bfloat16"),
              median=0.1, p20=0.1, p80=0.1, rate=494.75, unit="TFLOP/s", speedup=3.0)
    row.pct_peak = 50.0    # what the harness computes from fastgpt.peaks (tests/test_peaks.py)
    r.bench = [row]
    r.train_plan = report.TRAIN_PLANS[("cuda", False)]
    r.train = [{"config": "triton bf16", "ms_per_iter": 20.0, "p20_ms": 19.0, "p80_ms": 21.0,
                "tokens_per_s": 800000.0, "speedup": 1.0, "tflops": 247.4, "mfu": 0.25,
                "peak_source": "data sheet: 989.5 TFLOP/s"}]
    r.cuda_tests = {"command": "pytest -m cuda", "returncode": 0, "tail": ["3 passed"],
                    "summary": "3 passed"}
    r.dispatch = []
    text = report.markdown(r)
    assert "H100 SXM: fp32 67, tf32 494.5, bf16 989.5, fp16 989.5 TFLOP/s (dense), 3350 GB/s" \
        in text
    assert table(text, "## Kernels on")[0]["% of peak"] == "50.0"
    train = table(text, "## Training steps")[0]
    assert train["MFU %"] == "25.0" and train["TFLOP/s"] == "247"
    assert "MFU: model FLOPs (fastgpt.flops) over data sheet: 989.5 TFLOP/s." in text
    assert "exit 0 (passed)" in text and "3 passed" in text

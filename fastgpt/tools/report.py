"""`fastgpt report`: the one command for the day a GPU is present.

On one device it runs everything that says whether the kernels are right and fast there, and
writes ONE Markdown file (default ``fastgpt-report-<device>.md``; CSV, charts, the check's JSON
and the test log go to the folder of the same name beside it, ``gpu-report.md`` -> ``gpu-report/``):

1. ``fastgpt check``: every backend against float64 references (``--quick``: its quick grid);
2. ``fastgpt bench`` of every op suite, one stage per suite: the table the README's Performance
   section leaves empty (median ms, TFLOP/s or GB/s, % of the data-sheet peak from
   fastgpt.peaks, speedup over the naive backend and over PyTorch's own: sdpa for attention,
   torch otherwise), from the harness's rows as measured (nothing is timed twice);
3. ``fastgpt bench train``: training steps of the preset `fastgpt train` runs on the device
   (shakespeare-char on CUDA; on the CPU, where one shakespeare-char step takes tens of seconds,
   baby), MFU against the same data-sheet peak;
4. on CUDA, the CUDA-marked tests (``python -m pytest tests -m cuda -q``: compile fullgraph
   through triton_op, opcheck, autotuning) when a tests/ folder sits beside the package (a source
   checkout); otherwise the report says they were not run and why;
5. the choices measured dispatch cached (``fastgpt dispatch``), among them those the training
   steps just made.

A stage that fails (raises, or finds a failure: a FAIL row, a provider that crashed, a failing
test) is recorded in the report with its error, the others still run, and the command exits 1.
The Markdown file is rewritten after every stage, so an interrupted run leaves what it had.

Bounds. The full run is sized to finish in under 10 minutes on one H100-class GPU (an estimate:
no GPU has run it yet): check's full grid (T <= 256, vocabulary <= 50257, three dtypes, its
torch.compile backends compiling per dtype), bench's default CUDA sizes (attention T <= 4096,
cross-entropy N <= 16384 at V = 50304, embedding N <= 65536), bench train 3 configurations x 2
rounds x 60 steps, and the CUDA tests stopped after CUDA_TESTS_TIMEOUT_S. ``--quick`` takes
check's quick grid, bench's quick sizes at their smallest T and N with 0.05 s of CPU timing per
case (CPU cross-entropy in this process), and 1 round of 30 training steps (on the CPU: baby,
sdpa against tril in float32): 2-3 minutes on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fastgpt
from fastgpt.device import resolve_device
from fastgpt.ops import measured
from fastgpt.peaks import lookup
from fastgpt.tools.bench.command import add_bench_parser, run_suite
from fastgpt.tools.bench.harness import Row, allow_repeated_backward, write_csv
from fastgpt.tools.bench.suites import SUITES
from fastgpt.tools.bench.train_steps import (
    parse_config,
    run_train_bench,
)
from fastgpt.tools.check import add_check_parser, run_check_cli
from fastgpt.tools.dispatch import format_table as dispatch_table
from fastgpt.tools.environment import environment
from fastgpt.tools.formatting import number

CUDA_TESTS_TIMEOUT_S = 300
# --quick bench: the quick sizes at their smallest sequence length and row count; CPU
# cross-entropy in this process (a fresh process per case keeps what torch.compile cached out
# of the memory figures: the quick sizes leave compile out; it saves ~25 s of start-ups)
QUICK_BENCH = ["--quick", "--min-run-time", "0.05", "--T", "64", "--N", "512", "--in-process"]


@dataclass(frozen=True)
class TrainPlan:
    """What `fastgpt bench train` runs in the report."""
    preset: str
    iters: int                      # steps per run (bench train drops the first 20 as warm-up)
    rounds: int                     # interleaved runs per configuration
    configs: str | None = None      # None: bench train's default configurations for the device


# per (device type, --quick)
TRAIN_PLANS = {
    ("cuda", False): TrainPlan("shakespeare-char", iters=60, rounds=2),
    ("cuda", True): TrainPlan("shakespeare-char", iters=30, rounds=1),
    ("cpu", False): TrainPlan("baby", iters=60, rounds=2),
    ("cpu", True): TrainPlan("baby", iters=30, rounds=1, configs="sdpa fp32;tril fp32"),
}
# the speedup columns: over the suite's naive baseline, and over PyTorch's own kernel
PYTORCH_OWN = {"attention": "sdpa"}     # every other op: "torch"


class StageFailed(Exception):
    """A stage that ran to its end and found a failure; the message says what."""


class StageNotRun(Exception):
    """A stage that does not apply here; the message says why."""


@dataclass
class Stage:
    name: str
    run: Callable[[Report], None]
    status: str = "pending"     # passed, failed, not run
    seconds: float = 0.0
    error: str = ""             # one line
    trace: str = ""             # the traceback of an exception


@dataclass
class Report:
    """The run's settings and what its stages found."""
    device: str                 # "cpu", "cuda", "cuda:1"
    quick: bool
    out: Path                   # the Markdown file
    files: Path                 # CSV, charts, check JSON, test log
    command: str = ""
    env: dict = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)
    check: dict | None = None            # `fastgpt check --json`'s content
    bench: list[Row] = field(default_factory=list)
    train: list[dict] = field(default_factory=list)
    train_plan: TrainPlan | None = None
    cuda_tests: dict | None = None
    dispatch: list[dict] | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def gpu_name(self) -> str:
        """The name fastgpt.peaks looks up ("" on the CPU: no data-sheet table there)."""
        return self.env.get("device", "") if self.cuda else ""


def files_dir(out: Path) -> Path:
    """Where a report's other files go: FILE.md -> FILE/ (FILE-files/ when FILE has no suffix)."""
    return out.with_suffix("") if out.suffix else out.with_name(out.name + "-files")


def _parse(argv: list[str]) -> argparse.Namespace:
    """Arguments of `fastgpt check` / `fastgpt bench` as their own parsers read them, defaults
    included, so that the report runs exactly what those commands would."""
    parser = argparse.ArgumentParser(prog="fastgpt")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    add_check_parser(sub)
    return parser.parse_args(argv)


# --- the stages ---------------------------------------------------------------------------------

def stage_environment(r: Report) -> None:
    r.env = environment(r.device)


def stage_check(r: Report) -> None:
    path = r.files / "check.json"
    args = _parse(["check", "--device", r.device, "--json", str(path)]
                  + (["--quick"] if r.quick else []))
    code = run_check_cli(args)
    r.check = json.loads(path.read_text())
    if code:
        failed = sum(row["result"] == "FAIL" for row in r.check["rows"])
        raise StageFailed(f"{failed} check row(s) failed (see Accuracy)")


def bench_stage(suite: str) -> Callable[[Report], None]:
    """The stage that runs one op suite of `fastgpt bench` and keeps its rows."""
    def run(r: Report) -> None:
        args = _parse(["bench", suite, "--device", r.device, "--plot", str(r.files / "plots")]
                      + (QUICK_BENCH if r.quick else []))
        args.device = str(resolve_device(args.device))
        allow_repeated_backward()
        rows = run_suite(suite, args)     # % of peak from fastgpt.peaks, as everywhere
        write_csv([row.record() for row in rows], str(r.files / "bench.csv"), r.env)
        r.bench += rows
        crashed = [row for row in rows if row.skipped.startswith("failed")]
        if crashed:
            raise StageFailed(f"{len(crashed)} provider run(s) failed: " + "; ".join(
                f"{row.case.provider} {row.case.mode} {row.case.shape_str()}" for row in crashed))
    return run


def stage_train(r: Report) -> None:
    plan = r.train_plan = TRAIN_PLANS[("cuda" if r.cuda else "cpu", r.quick)]
    argv = ["bench", "train", "--device", r.device, "--preset", plan.preset,
            "--iters", str(plan.iters), "--rounds", str(plan.rounds),
            "--csv", str(r.files / "bench.csv")]
    args = _parse(argv + (["--configs", plan.configs] if plan.configs else []))
    args.device = str(resolve_device(args.device))
    r.train = run_train_bench(args, r.env)


def tests_folder() -> Path:
    """tests/ beside the package: present in a source checkout, absent in an installed one."""
    return Path(fastgpt.__file__).resolve().parent.parent / "tests"


def stage_cuda_tests(r: Report) -> None:
    tests = tests_folder()
    if not r.cuda:
        raise StageNotRun("the device is the CPU; these tests need an NVIDIA GPU")
    if not tests.is_dir():
        raise StageNotRun(f"no tests/ folder beside the package ({tests}): fastgpt is installed, "
                          f"not run from a source checkout")
    cmd = [sys.executable, "-m", "pytest", str(tests), "-m", "cuda", "-q"]
    log = r.files / "cuda-tests.log"
    # the tests start the Triton kernels for the GPU themselves: no interpreter in their process
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    print(f"$ {shlex.join(cmd)}  (output in {log})", flush=True)
    torch.cuda.empty_cache()    # the memory this process cached for the stages before
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tests.parent, stdout=f, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=CUDA_TESTS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # pytest and the children it started
            proc.wait()
            code = None
    lines = log.read_text(errors="replace").splitlines()
    r.cuda_tests = {"command": shlex.join(cmd), "returncode": code, "tail": lines[-30:],
                    "summary": next((ln for ln in reversed(lines) if ln.strip()), "")}
    if code is None:
        raise StageFailed(f"stopped after {CUDA_TESTS_TIMEOUT_S} s")
    if code != 0:
        raise StageFailed(f"pytest exited {code}: {r.cuda_tests['summary']}")


def stage_dispatch(r: Report) -> None:
    r.dispatch = list(measured.read_cache().values())


def stages() -> list[Stage]:
    # check first: on the CPU it turns the Triton interpreter on, which must happen before
    # anything imports triton (environment() does, for its version)
    return ([Stage("check", stage_check), Stage("environment", stage_environment)]
            + [Stage(f"bench {suite}", bench_stage(suite)) for suite in SUITES]
            + [Stage("bench train", stage_train), Stage("cuda tests", stage_cuda_tests),
               Stage("dispatch choices", stage_dispatch)])


def run_stage(r: Report, stage: Stage, index: int) -> None:
    """Run one stage, recording its result; only KeyboardInterrupt gets through."""
    label = f"[report {index}/{len(r.stages)}] {stage.name}"
    print(f"\n{label} ...", flush=True)
    t0 = time.perf_counter()
    try:
        stage.run(r)
        stage.status = "passed"
    except StageNotRun as e:
        stage.status, stage.error = "not run", str(e)
    except StageFailed as e:
        stage.status, stage.error = "failed", str(e)
    # any error is the stage's result, not the run's end (SystemExit: an argparse error)
    except (Exception, SystemExit) as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [""])[0]
        stage.status, stage.error = "failed", f"{type(e).__name__}: {first}"[:300]
        stage.trace = traceback.format_exc()
    stage.seconds = time.perf_counter() - t0
    print(f"{label}: {stage.status}{': ' + stage.error if stage.error else ''} "
          f"({stage.seconds:.1f} s; {time.perf_counter() - r.started:.1f} s elapsed)", flush=True)


# --- the Markdown ------------------------------------------------------------------------------

def _table(head: list[str], rows: list[list[str]]) -> str:
    cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows])


def _times(x: float | None) -> str:
    return number(x, ".2f") + ("x" if x is not None else "")


def md_summary(r: Report) -> str:
    failed = [s for s in r.stages if s.status == "failed"]
    verdict = (f"**{len(failed)} of {len(r.stages)} stages failed**" if failed
               else "every stage that ran passed")
    done = [s for s in r.stages if s.status != "pending"]
    head = (f"# fastgpt report: {r.env.get('device', r.device)} ({r.device})\n\n"
            f"`{r.command}`: {verdict}; {sum(s.seconds for s in done):.0f} s in all"
            + ("" if len(done) == len(r.stages) else " so far (still running)") + ".")
    rows = [[s.name, s.status, f"{s.seconds:.1f}", s.error] for s in r.stages]
    return head + "\n\n" + _table(["stage", "result", "seconds", "note"], rows)


def md_environment(r: Report) -> str:
    rows = [[k, v] for k, v in r.env.items()]
    peaks = lookup(r.gpu_name) if r.gpu_name else None
    if peaks:
        figures = ", ".join(f"{k} {number(getattr(peaks, k), 'g')}" for k in
                            ("fp32", "tf32", "bf16", "fp16"))
        rows.append(["data-sheet peak", (f"{peaks.gpu}: {figures} TFLOP/s (dense), "
                                         f"{peaks.bandwidth_gbs:g} GB/s ({peaks.source})")])
    else:
        rows.append(["data-sheet peak", "unknown: " + ("the CPU has no entry in fastgpt.peaks"
                                                      if not r.cuda else "this GPU is not in "
                                                      "fastgpt.peaks")])
    return "## Environment\n\n" + _table(["", ""], rows)


def _reference_times(rows: list[Row]) -> dict[tuple, float]:
    """Median ms of PyTorch's own provider per (op, mode, shape, dtype), from the same run."""
    out = {}
    for row in rows:
        c = row.case
        if not row.skipped and c.provider == PYTORCH_OWN.get(c.op, "torch"):
            out[(c.op, c.mode, c.shape_str(), c.dtype)] = row.median
    return out


def md_kernels(r: Report) -> str:
    title = f"## Kernels on {r.env.get('device', r.device)}"
    if not r.bench:
        return title + "\n\nNo benchmark rows (see the stages above)."
    ref = _reference_times(r.bench)
    rows, skipped = [], []
    for row in r.bench:
        c = row.case
        if row.skipped:
            skipped.append(f"- {c.op} {c.mode} {c.dtype} `{c.provider}` {c.shape_str()}: "
                           f"{row.skipped}")
            continue
        own = ref.get((c.op, c.mode, c.shape_str(), c.dtype))
        rows.append([c.op, c.mode, c.dtype, c.provider, c.shape_str(), f"{row.median:.3f}",
                     f"{row.p20:.3f}-{row.p80:.3f}", f"{number(row.rate, '.3f')} {row.unit}",
                     number(row.pct_peak, ".1f", "unknown"), _times(row.speedup),
                     _times(own / row.median if own else None), number(row.peak_mb, ".1f")])
    naive = ", ".join(f"{name}: `{s.baseline}`" for name, s in SUITES.items())
    rel = os.path.relpath(r.files, r.out.parent)
    text = (f"{title}\n\n" + _table(["op", "mode", "dtype", "provider", "shape", "median ms",
                                     "p20-p80 ms", "TFLOP/s or GB/s", "% of peak", "vs naive",
                                     "vs sdpa/torch", "peak MB"], rows)
            + f"\n\nvs naive: the median of the suite's naive baseline ({naive}) over the row's, "
              f"measured in the same run; vs sdpa/torch: the same against PyTorch's own kernel "
              f"(`sdpa` for attention, `torch` otherwise). % of peak: TFLOP/s against the "
              f"dtype's matmul peak, GB/s against memory bandwidth (Environment); unknown off "
              f"the table. CSV: `{rel}/bench.csv`; charts: `{rel}/plots/`.")
    if skipped:
        text += "\n\nNot measured:\n" + "\n".join(skipped)
    return text


def _check_groups(rows: list[dict]) -> list[list[str]]:
    """One line per (op, dtype): counts and the worst error ratio with where it was."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["dtype"] != "-":
            groups.setdefault((row["op"], row["dtype"]), []).append(row)
    out = []
    for (op, dtype), rs in groups.items():
        n = {k: sum(x["result"] == k for x in rs) for k in ("PASS", "FAIL", "SKIP")}
        rated = [x for x in rs if x["ratio"] is not None]
        worst = max(rated, key=lambda x: x["ratio"]) if rated else None
        where = (f"`{worst['backend']}` {worst['part']}, {worst['shape']}" if worst else "")
        out.append([op, dtype, n["PASS"], n["FAIL"], n["SKIP"],
                    number(worst["ratio"] if worst else None, ".2f"), where])
    return out


def md_check(r: Report) -> str:
    title = "## Accuracy (`fastgpt check" + (" --quick`)" if r.quick else "`)")
    if r.check is None:
        return title + "\n\nNot run to the end (see the stages above)."
    rows = r.check["rows"]
    n = {k: sum(x["result"] == k for x in rows) for k in ("PASS", "FAIL", "SKIP")}
    text = (f"{title}\n\n{n['PASS']} passed, {n['FAIL']} failed, {n['SKIP']} skipped"
            + (" (Triton kernels through the Triton interpreter on CPU tensors: their "
               "arithmetic, not GPU code generation)" if r.check.get("interpreter") else "")
            + f". Every row: `{os.path.relpath(r.files, r.out.parent)}/check.json`. The ratio is "
              f"the backend's largest error over plain PyTorch's in the same dtype, both "
              f"against float64 (the rule allows 2 plus a floor of about one unit in the last "
              f"place).\n\n"
            + _table(["op", "dtype", "passed", "failed", "skipped", "worst ratio", "where"],
                     _check_groups(rows)))
    fails = [f"- {x['op']} `{x['backend']}` {x['dtype']} {x['part']} {x['shape']}: {x['note']}"
             for x in rows if x["result"] == "FAIL"]
    skips = sorted({f"- {x['op']} `{x['backend']}`"
                    + (f" {x['dtype']}" if x["dtype"] != "-" else "") + f": {x['note']}"
                    for x in rows if x["result"] == "SKIP"})
    if fails:
        text += "\n\nFailed:\n" + "\n".join(fails)
    if skips:
        text += "\n\nSkipped:\n" + "\n".join(skips)
    return text


def md_train(r: Report) -> str:
    title = "## Training steps (`fastgpt bench train`)"
    measured_rows = [x for x in r.train if "skipped" not in x]
    if not measured_rows:
        return title + "\n\nNo results (see the stages above)." + _train_skips(r)
    p = r.train_plan
    why = ("the preset `fastgpt train` runs on CUDA" if r.cuda else
           "the CPU's default preset: one shakespeare-char step takes tens of seconds here")
    rows = [[x["config"], parse_config(x["config"])["dtype"], f"{x['ms_per_iter']:.2f}",
             f"{x['p20_ms']:.2f}-{x['p80_ms']:.2f}", f"{x['tokens_per_s']:.0f}",
             _times(x["speedup"]), number(x.get("tflops"), ".3g", "-"),
             number(None if x.get("mfu") is None else 100 * x["mfu"], ".1f", "unknown")]
            for x in measured_rows]
    return (f"{title}\n\nPreset `{p.preset}` ({why}), {p.iters} steps per run x "
            f"{p.rounds} interleaved round(s), the first 20 steps of each run dropped as "
            f"warm-up.\n\n"
            + _table(["config", "dtype", "ms/iter", "p20-p80 ms", "tokens/s",
                      f"vs {measured_rows[0]['config']}", "TFLOP/s", "MFU %"], rows)
            + f"\n\nMFU: model FLOPs (fastgpt.flops) over "
              f"{measured_rows[0].get('peak_source') or 'the peak'}." + _train_skips(r))


def _train_skips(r: Report) -> str:
    """The configurations `fastgpt bench train` skipped here, and why ("" if none)."""
    skips = [f"- `{x['config']}`: {x['skipped']}" for x in r.train if "skipped" in x]
    return "\n\nSkipped:\n" + "\n".join(skips) if skips else ""


def md_cuda_tests(r: Report) -> str:
    title = "## CUDA tests (`pytest -m cuda`)"
    stage = next(s for s in r.stages if s.name == "cuda tests")
    if stage.status == "not run":
        return f"{title}\n\nNot run: {stage.error}."
    if r.cuda_tests is None:
        return f"{title}\n\n{stage.status}{': ' + stage.error if stage.error else ''}"
    t = r.cuda_tests
    tail = "\n".join(t["tail"])
    return (f"{title}\n\n`{t['command']}`: exit {t['returncode']} ({stage.status}); the whole "
            f"log: `{os.path.relpath(r.files, r.out.parent)}/cuda-tests.log`.\n\n```\n{tail}\n```")


def md_dispatch(r: Report) -> str:
    title = "## Dispatch choices (`fastgpt dispatch`)"
    if r.dispatch is None:
        return title + "\n\nNot read (see the stages above)."
    if not r.dispatch:
        return (f"{title}\n\nNo cached choices in `{measured.cache_path()}`: measured dispatch "
                f"runs on CUDA by default (on the CPU with {measured.MODE_VAR}=measure).")
    return (f"{title}\n\nFrom `{measured.cache_path()}` (this torch, triton and fastgpt):\n\n"
            + dispatch_table(r.dispatch, markdown=True))


def md_errors(r: Report) -> str:
    traced = [s for s in r.stages if s.trace]
    if not traced:
        return ""
    return "## Errors\n\n" + "\n\n".join(f"{s.name}:\n\n```\n{s.trace.strip()}\n```"
                                          for s in traced)


def markdown(r: Report) -> str:
    parts = [md_summary(r), md_environment(r), md_kernels(r), md_check(r), md_train(r),
             md_cuda_tests(r), md_dispatch(r), md_errors(r)]
    return "\n\n".join(p for p in parts if p) + "\n"


# --- the command ---------------------------------------------------------------------------------

def add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="check, benchmark and train on one device; write one "
                       "Markdown report",
                       description="Run on one device `fastgpt check`, `fastgpt bench` of "
                       "every op suite, `fastgpt bench train` and (on CUDA) the CUDA tests, read "
                       "the cached dispatch choices, and write the results to one Markdown file "
                       "(CSV, charts and logs in the folder of its name beside it). A failing "
                       "stage is recorded and the others still run; exit status 1 if any "
                       "failed. The full run is sized for under 10 minutes on one H100-class "
                       "GPU; --quick takes a few minutes on 2 CPU cores.")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if present)")
    p.add_argument("--quick", action="store_true",
                   help="the check's quick grid, the bench's smallest sizes, 30 training steps")
    p.add_argument("--out", default=None, metavar="FILE.md",
                   help="the report (default: fastgpt-report-<device>.md); its CSV, charts "
                        "and logs go to the folder FILE/ beside it")
    p.set_defaults(run=run_report)


def write(r: Report) -> None:
    r.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = r.out.with_name(r.out.name + ".tmp")
    tmp.write_text(markdown(r))
    os.replace(tmp, r.out)


def run_report(args) -> int:
    device = str(resolve_device(args.device))
    out = Path(args.out or f"fastgpt-report-{device.replace(':', '')}.md")
    r = Report(device=device, quick=args.quick, out=out, files=files_dir(out),
               command=shlex.join(["fastgpt", "report", "--device", device]
                                  + (["--quick"] if args.quick else []) + ["--out", str(out)]))
    r.files.mkdir(parents=True, exist_ok=True)
    for name in ("bench.csv", "check.json", "cuda-tests.log"):   # this run's, not appended to
        (r.files / name).unlink(missing_ok=True)
    r.stages = stages()
    print(f"# {r.command}: {len(r.stages)} stages; the report goes to {out}", flush=True)
    for i, stage in enumerate(r.stages, 1):
        run_stage(r, stage, i)
        write(r)
    failed = [s.name for s in r.stages if s.status == "failed"]
    print(f"\nwrote {out} (and {r.files}/) in {time.perf_counter() - r.started:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else "; every stage that ran passed"))
    return 1 if failed else 0

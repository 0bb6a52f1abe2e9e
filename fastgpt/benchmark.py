"""One benchmark harness for every op: `fastgpt bench`, bench/bench_<op>.py, bench/test_bench_*.py.

A benchmark is a list of ``Case``s (op, provider, mode, shape, dtype). Providers are the registry's
backend names; a suite (fastgpt/bench_suites.py) turns a case into the callable to time and its
FLOP or byte count. This module times the callables, measures peak memory and prints one table per
op and mode with speedups over the naive baseline measured in the same run.

Timing. CUDA: ``triton.testing.do_bench`` (L2 cache flushed between repetitions; p20/p50/p80).
CPU: ``torch.utils.benchmark`` after one warm-up call; the providers of one shape are timed in
alternating rounds of about 20 ms each, so load from other processes on a shared machine falls on
all of them alike; median and p20-p80 are over the rounds. The thread count is part of the
recorded environment (``--threads`` sets it).

Peak memory: the tensor memory one call adds at its peak over what was allocated before it.
CUDA: ``max_memory_allocated``; CPU: the torch profiler's allocation events (``profile_memory``),
which count tensor bytes exactly, whatever malloc keeps resident. Suites where memory is the
point (cross-entropy) also run each case in a fresh subprocess on CPU (``isolate``), so nothing
an earlier provider compiled or cached is in the picture.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

MODES = ("fwd", "bwd", "fwd+bwd")


# --- environment and statistics -------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str = "cpu") -> dict:
    """What a reader needs to reproduce or compare a measurement."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    dev = torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_model()
    return {"device": dev, "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": triton_version, "git_sha": git_sha(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def format_env(env: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in env.items())


def summarize(samples: list[float]) -> dict:
    """Median and the 20th/80th percentiles."""
    xs = sorted(samples)
    if len(xs) == 1:
        return {"median": xs[0], "p20": xs[0], "p80": xs[0]}
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return {"median": statistics.median(xs), "p20": q[1], "p80": q[7]}


# --- device peaks (vendor data sheets, dense, no sparsity) ----------------------------------
# Matched by substring of torch.cuda.get_device_name(), first match wins. TFLOP/s per compute
# dtype ("tf32" is float32 matmuls on tensor cores) and memory bandwidth in GB/s.
DEVICE_PEAKS = (
    ("H200", dict(bf16=989.0, fp16=989.0, tf32=494.0, fp32=67.0, gbps=4800.0)),
    ("H100 PCIe", dict(bf16=756.0, fp16=756.0, tf32=378.0, fp32=51.0, gbps=2000.0)),
    ("H100", dict(bf16=989.0, fp16=989.0, tf32=494.0, fp32=67.0, gbps=3350.0)),
    ("A100-SXM4-80GB", dict(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5, gbps=2039.0)),
    ("A100-PCIE-80GB", dict(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5, gbps=1935.0)),
    ("A100", dict(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5, gbps=1555.0)),
)


def device_peak(device_name: str, dtype: torch.dtype) -> tuple[Optional[float], Optional[float]]:
    """(peak TFLOP/s for matmuls in ``dtype``, peak GB/s) of a known GPU, else (None, None)."""
    for key, peaks in DEVICE_PEAKS:
        if key in device_name:
            if dtype == torch.float32:
                tf32 = torch.get_float32_matmul_precision() != "highest"
                return peaks["tf32" if tf32 else "fp32"], peaks["gbps"]
            return peaks.get({torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "")), \
                peaks["gbps"]
    return None, None


# --- timing and memory ----------------------------------------------------------------------

def time_group_ms(fns: dict[str, Callable], device: str, min_run_time: float = 0.5) -> dict:
    """{name: {"median", "p20", "p80"} in ms} for each callable (see module docstring)."""
    if device.startswith("cuda"):
        import triton.testing
        out = {}
        for name, fn in fns.items():
            p20, med, p80 = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8])
            out[name] = {"median": med, "p20": p20, "p80": p80}
        return out
    import torch.utils.benchmark as benchmark
    timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": fn}) for name, fn in fns.items()}
    per_call = {name: t.timeit(1).mean for name, t in timers.items()}   # warm-up
    per_call = {name: t.timeit(1).mean for name, t in timers.items()}   # cost of one call
    number = {name: max(1, int(0.02 / s)) for name, s in per_call.items()}
    round_time = sum(number[n] * per_call[n] for n in fns)
    rounds = max(3 if round_time > 1.0 else 5, int(min_run_time * len(fns) / round_time))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, t in timers.items():
            times[name].append(t.timeit(number[name]).mean * 1e3)
    return {name: summarize(ts) for name, ts in times.items()}


def _cpu_peak_bytes(fn: Callable) -> int:
    """Peak tensor bytes allocated during one call of ``fn`` above what was allocated before it,
    from the torch profiler's allocation events (the CPU analogue of max_memory_allocated)."""
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    # libkineto logs two lines per profile straight to fd 2: keep them out of the table
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    # A running sum of this session's allocation events. The profiler's "Total Allocated" is a
    # process-wide counter: a tensor allocated while profiling and freed outside a profile is
    # never subtracted, so every later measurement in the process would include it.
    peak = running = 0
    for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        running += e["args"]["Bytes"]
        peak = max(peak, running)
    return peak


def peak_memory_mb(fn: Callable, device: str) -> Optional[float]:
    """Memory one call of ``fn`` adds at its peak, in MiB."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return _cpu_peak_bytes(fn) / 2 ** 20


# --- cases and results ----------------------------------------------------------------------

@dataclass
class Case:
    """One measurement: ``op`` run by ``provider`` (a backend name) in ``mode`` on ``shape``."""
    suite: str                  # a key of fastgpt.bench_suites.SUITES
    op: str
    provider: str
    mode: str
    shape: dict
    dtype: str                  # "float32", "bfloat16", ...

    def shape_str(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())


@dataclass
class Built:
    """What a suite makes of a case: the step to time and the work one step does."""
    fn: Callable[[], object]
    flops: float = 0.0          # for TFLOP/s (0: report GB/s)
    bytes: float = 0.0          # for GB/s


@dataclass
class Row:
    case: Case
    median: float = float("nan")    # ms
    p20: float = float("nan")
    p80: float = float("nan")
    rate: Optional[float] = None    # TFLOP/s or GB/s
    unit: str = ""
    peak_mb: Optional[float] = None
    speedup: Optional[float] = None
    pct_peak: Optional[float] = None
    skipped: str = ""               # why the case did not run

    def record(self) -> dict:
        c = self.case
        return dict(op=c.op, provider=c.provider, mode=c.mode, shape=c.shape_str(),
                    dtype=c.dtype, median_ms=self.median, p20_ms=self.p20, p80_ms=self.p80,
                    rate=self.rate, unit=self.unit, peak_mb=self.peak_mb, speedup=self.speedup,
                    pct_peak=self.pct_peak, skipped=self.skipped, **c.shape)


def _rate(built: Built, ms: float) -> tuple[float, str]:
    if built.flops:
        return built.flops / (ms * 1e-3) / 1e12, "TFLOP/s"
    return built.bytes / (ms * 1e-3) / 1e9, "GB/s"


def _measure_group(cases: list[Case], device: str, min_run_time: float) -> list[Row]:
    """Time the providers of one (op, mode, shape) side by side, in this process."""
    from fastgpt.bench_suites import build
    rows, fns, builts = [], {}, {}
    for case in cases:
        try:
            built = build(case, device)
            built.fn()   # first call: fails early, compiles what needs compiling
        except SkipCase as e:
            rows.append(Row(case, skipped=str(e)))
            continue
        except Exception as e:   # a provider that breaks on these inputs must not stop the rest
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            rows.append(Row(case, skipped=f"failed: {type(e).__name__}: {msg[:200]}"))
            continue
        builts[case.provider] = built
        fns[case.provider] = built.fn
        rows.append(Row(case))
    times = time_group_ms(fns, device, min_run_time) if fns else {}
    for row in rows:
        if row.skipped:
            continue
        built = builts[row.case.provider]
        t = times[row.case.provider]
        row.median, row.p20, row.p80 = t["median"], t["p20"], t["p80"]
        row.rate, row.unit = _rate(built, row.median)
        row.peak_mb = peak_memory_mb(built.fn, device)
    return rows


def _measure_isolated(case: Case, device: str, min_run_time: float) -> Row:
    """Measure one case in a fresh Python process (nothing another provider left behind)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastgpt.benchmark", "--worker",
           json.dumps(dict(case=dataclasses.asdict(case), device=device,
                           min_run_time=min_run_time, threads=torch.get_num_threads()))]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return Row(case, skipped=f"failed: {tail}")
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    return Row(case, **{k: v for k, v in rec.items() if k != "case"})


def _worker(spec: str) -> None:
    w = json.loads(spec)
    torch.set_num_threads(w["threads"])
    import torch._functorch.config as functorch_config
    functorch_config.donated_buffer = False   # as run_bench does (bwd mode)
    row = _measure_group([Case(**w["case"])], w["device"], w["min_run_time"])[0]
    print(json.dumps({k: v for k, v in dataclasses.asdict(row).items() if k != "case"}))


class SkipCase(Exception):
    """A provider that cannot run a case here; the message says why."""


def run_cases(cases: list[Case], device: str, baseline: str, min_run_time: float = 0.5,
              isolate: bool = False, progress: Optional[Callable[[Row], None]] = None) -> list[Row]:
    """Measure every case; speedups are against ``baseline`` on the same op, mode and shape."""
    groups: dict[tuple, list[Case]] = {}
    for c in cases:
        groups.setdefault((c.op, c.mode, c.shape_str(), c.dtype), []).append(c)
    rows: list[Row] = []
    for group in groups.values():
        if isolate:
            got = [_measure_isolated(c, device, min_run_time) for c in group]
        else:
            got = _measure_group(group, device, min_run_time)
        base = next((r for r in got if r.case.provider == baseline and not r.skipped), None)
        for r in got:
            if r.skipped:
                continue
            if base is not None:
                r.speedup = base.median / r.median
            if device.startswith("cuda"):
                tflops, gbps = device_peak(torch.cuda.get_device_name(device),
                                           getattr(torch, r.case.dtype))
                peak = tflops if r.unit == "TFLOP/s" else gbps
                r.pct_peak = 100.0 * r.rate / peak if peak else None
        for r in got:
            if progress:
                progress(r)
        rows += got
    return rows


# --- output ---------------------------------------------------------------------------------

def _fmt(x: Optional[float], spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def format_table(rows: list[Row], baseline: str, device: str) -> str:
    """One block per (op, mode, dtype): provider, shape, times, rate, memory, speedup, % peak."""
    cuda = device.startswith("cuda")
    out = []
    blocks: dict[tuple, list[Row]] = {}
    for r in rows:
        blocks.setdefault((r.case.op, r.case.mode, r.case.dtype), []).append(r)
    for (op, mode, dtype), rs in blocks.items():
        unit = next((r.unit for r in rs if r.unit), "rate")
        width = max(len(r.case.shape_str()) for r in rs)
        pw = max(12, *(len(r.case.provider) for r in rs))
        out.append(f"\n{op} {mode} {dtype}")
        head = (f"  {'provider':<{pw}} {'shape':<{width}} {'median ms':>10} {'p20-p80 ms':>19} "
                f"{unit:>8} {'peak MB':>9} {'vs ' + baseline:>9}")
        out.append(head + (f" {'% peak':>7}" if cuda else ""))
        for r in rs:
            c = r.case
            if r.skipped:
                out.append(f"  {c.provider:<{pw}} {c.shape_str():<{width}} skipped: {r.skipped}")
                continue
            spread = f"{r.p20:.3f}-{r.p80:.3f}"
            line = (f"  {c.provider:<{pw}} {c.shape_str():<{width}} {r.median:>10.3f} {spread:>19} "
                    f"{_fmt(r.rate, '.3f'):>8} {_fmt(r.peak_mb, '.1f'):>9} "
                    f"{_fmt(r.speedup, '.2f') + ('x' if r.speedup else ''):>9}")
            if cuda:
                line += f" {_fmt(r.pct_peak, '.1f', 'unknown'):>7}"
            out.append(line)
    return "\n".join(out)


CSV_FIELDS = ["op", "provider", "mode", "shape", "dtype", "median_ms", "p20_ms", "p80_ms",
              "rate", "unit", "peak_mb", "speedup", "pct_peak", "skipped"]


def write_csv(records: list[dict], path: str, env: dict) -> None:
    """Append one line per record (a ``Row.record()``), with the environment; writes the header
    when the file is new."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(env) + CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(dict(env, **r) for r in records)


def plot(rows: list[Row], out_dir: str, x: str, y: str) -> list[str]:
    """PNG charts, one per (op, mode, dtype, other shape dims): ``y`` against shape key ``x``.

    ``y`` is "rate" (TFLOP/s or GB/s), "median" (ms) or "peak_mb". Returns the files written.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    charts: dict[tuple, dict[str, list]] = {}
    for r in rows:
        if r.skipped or x not in r.case.shape or getattr(r, y) is None:
            continue
        rest = " ".join(f"{k}={v}" for k, v in r.case.shape.items() if k != x)
        key = (r.case.op, r.case.mode, r.case.dtype, rest)
        charts.setdefault(key, {}).setdefault(r.case.provider, []).append(
            (r.case.shape[x], getattr(r, y), r.unit))
    labels = {"rate": None, "median": "median ms", "peak_mb": "peak memory (MiB)"}
    written = []
    for (op, mode, dtype, rest), lines in charts.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for provider, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        unit = next(iter(lines.values()))[0][2]
        ax.set_xlabel(x)
        ax.set_ylabel(labels[y] or unit)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{op} {mode} {dtype} {rest}".strip(), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{op}_{mode}_{dtype}_{rest}").strip("_")
        path = os.path.join(out_dir, f"{name}_{y}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# --- `fastgpt bench` ------------------------------------------------------------------------

def run_suite(name: str, args) -> list[Row]:
    """Run one op suite with the CLI's arguments; prints its table; returns the rows."""
    from fastgpt.bench_suites import SUITES
    suite = SUITES[name]
    cases = suite.cases(args)
    isolate = suite.isolate_on_cpu and not args.device.startswith("cuda") and not args.in_process
    print(f"\n# {name}: {len(cases)} cases on {args.device}"
          + (" (each in a fresh process)" if isolate else ""), flush=True)
    rows = run_cases(cases, args.device, suite.baseline, args.min_run_time, isolate=isolate)
    print(format_table(rows, suite.baseline, args.device), flush=True)
    if args.plot:
        for path in plot(rows, args.plot, *suite.plot):
            print(f"wrote {path}")
    return rows


def add_bench_parser(sub) -> None:
    from fastgpt.bench_suites import SUITES
    p = sub.add_parser("bench", help="benchmark the ops' backends (or training steps)",
                       description="Time every backend of an op side by side and print median ms "
                       "(p20-p80), TFLOP/s or GB/s, peak memory and the speedup over the naive "
                       "backend measured in the same run. `train` times whole training steps.")
    # suites are spelled with dashes; the op names' underscores are accepted too
    p.add_argument("what", nargs="?", default="all", choices=list(SUITES) + ["train", "all"],
                   type=lambda name: name.replace("_", "-"))
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 "
                   "(default: bfloat16 on cuda, float32 on cpu; transformer-block: both)")
    p.add_argument("--providers", nargs="+", default=None, help="backend names, comma- or "
                   "space-separated (default: all that run on the device)")
    p.add_argument("--modes", nargs="+", default=None, help="fwd, bwd, fwd+bwd (comma- or "
                   "space-separated; default: all, fwd+bwd for cross-entropy)")
    p.add_argument("--T", type=int, nargs="+", default=None,
                   help="attention / transformer-block sequence lengths")
    p.add_argument("--D", type=int, nargs="+", default=None, help="attention head dims")
    p.add_argument("--B", type=int, default=None, help="attention / transformer-block batch")
    p.add_argument("--H", type=int, default=None, help="attention / transformer-block heads")
    p.add_argument("--N", type=int, nargs="+", default=None,
                   help="cross-entropy rows / embedding tokens")
    p.add_argument("--C", type=int, nargs="+", default=None,
                   help="hidden / embedding / transformer-block width")
    p.add_argument("--V", type=int, nargs="+", default=None, help="vocabulary sizes")
    p.add_argument("--quick", action="store_true", help="the smallest sizes only")
    p.add_argument("--min-run-time", type=float, default=0.5,
                   help="CPU: seconds of timing per provider and shape")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--in-process", action="store_true",
                   help="CPU cross-entropy: do not start a fresh process per case")
    p.add_argument("--csv", default=None, metavar="FILE", help="append rows (with environment)")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG charts to DIR")
    from fastgpt.bench_train import add_train_args
    add_train_args(p)
    p.set_defaults(run=run_bench)


DTYPES = ("float32", "bfloat16", "float16")


def run_bench(args) -> int:
    from fastgpt.bench_suites import SUITES, check_providers
    from fastgpt.errors import FastGPTError
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise FastGPTError(f"--device {args.device}: this torch ({torch.__version__}) sees no "
                           f"CUDA device; use --device cpu")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise FastGPTError(f"--device must be cpu or cuda[:N]; got {args.device!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype is not None and args.dtype not in DTYPES:
        raise FastGPTError(f"--dtype {args.dtype!r} is not a dtype; dtypes: {', '.join(DTYPES)}")
    for name in ("providers", "modes"):   # "a,b c" -> "a,b,c"
        if getattr(args, name):
            setattr(args, name, ",".join(getattr(args, name)))
    names = list(SUITES) if args.what == "all" else [] if args.what == "train" else [args.what]
    if args.providers and names:
        check_providers([p.strip() for p in args.providers.split(",") if p.strip()], names)
    # bwd mode re-runs one graph's backward (retain_graph), which torch.compile'd graphs allow
    # only without buffer donation
    import torch._functorch.config as functorch_config
    functorch_config.donated_buffer = False
    env = environment(args.device)
    print(f"# fastgpt bench {args.what}; {format_env(env)}", flush=True)
    rows: list[Row] = []
    for name in names:
        rows += run_suite(name, args)
    if args.csv and rows:
        write_csv([r.record() for r in rows], args.csv, env)
        print(f"appended {len(rows)} rows to {args.csv}")
    if args.what in ("train", "all"):
        from fastgpt.bench_train import run_train_bench
        run_train_bench(args, env)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit("usage: fastgpt bench ... (python -m fastgpt.benchmark is the subprocess worker)")

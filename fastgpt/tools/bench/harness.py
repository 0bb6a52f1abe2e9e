"""One benchmark harness for every op: `fastgpt bench`, bench/bench_<op>.py, bench/test_bench_*.py.

A benchmark is a list of ``Case``s (op, provider, mode, shape, dtype). Providers are the
registry's backend names; a suite (fastgpt/tools/bench/suites.py) turns a case into the callable
to time and its FLOP or byte count. This module knows no op: it times the callables, measures
peak memory and prints one table per op and mode with speedups over the naive baseline measured
in the same run.

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

As it goes. Each row is printed as soon as it is measured (``TableStream``): the providers of
one shape are timed together, the baseline first in the table, so the speedups are known when
their rows print. A progress bar on stderr counts the cases and estimates the time left from the
average time per case so far; it shows only when stderr is a terminal (not in a log file, a pipe
or under pytest's capture) and never mixes into the rows on stdout.

Memory. Before a case runs, its suite's estimate of what it needs (inputs, gradients and what
the provider holds at its peak: the naive attention's (B, H, T, T) scores, the full (N, V)
logits) is compared with what the device has free (``free_memory``); a case that would not fit
is skipped and its row says by how much, rather than swapping or being killed.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch._functorch.config
from tqdm import tqdm

from fastgpt.peaks import matmul_peak_tflops, peak_bandwidth_gbs
from fastgpt.profiling import allocations
from fastgpt.tools.formatting import number

MODES = ("fwd", "bwd", "fwd+bwd")


# --- statistics -----------------------------------------------------------------------------

def summarize(samples: list[float]) -> dict:
    """Median and the 20th/80th percentiles."""
    xs = sorted(samples)
    if len(xs) == 1:
        return {"median": xs[0], "p20": xs[0], "p80": xs[0]}
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return {"median": statistics.median(xs), "p20": q[1], "p80": q[7]}


# --- timing and memory ----------------------------------------------------------------------

def time_group_ms(fns: dict[str, Callable], device: str, min_run_time: float = 0.5) -> dict:
    """{name: {"median", "p20", "p80"} in ms} for each callable (see module docstring)."""
    if device.startswith("cuda"):
        import triton.testing   # lazily: importing triton costs ~0.5 s, and only CUDA times with it
        out = {}
        for name, fn in fns.items():
            p20, med, p80 = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8])
            out[name] = {"median": med, "p20": p20, "p80": p80}
        return out
    import torch.utils.benchmark as benchmark   # lazily: ~0.5 s to import, CPU timing only
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
    _, deltas = allocations(fn)
    # A running sum of this session's allocation events. The profiler's "Total Allocated" is a
    # process-wide counter: a tensor allocated while profiling and freed outside a profile is
    # never subtracted, so every later measurement in the process would include it.
    return max(itertools.accumulate(deltas, initial=0))


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


# --- memory a case may use ------------------------------------------------------------------

def _meminfo_available() -> Optional[int]:
    """MemAvailable from /proc/meminfo (Linux: what can be allocated without swapping), else
    psutil's figure where psutil is installed, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil   # not a dependency: macOS and Windows have no /proc/meminfo
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _cgroup_room() -> Optional[int]:
    """Bytes left under this process's cgroup v2 memory limit (a container's), counting its
    reclaimable page cache as room; None when there is no limit or no cgroup v2."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next(line.split("::", 1)[1].strip() for line in f if line.startswith("0::"))
        folder = f"/sys/fs/cgroup{path}"
        with open(f"{folder}/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(f"{folder}/memory.current") as f:
            used = int(f.read())
        with open(f"{folder}/memory.stat") as f:
            stat = dict(line.split() for line in f)
        return max(0, int(limit) - used + int(stat.get("inactive_file", 0)))
    except (OSError, StopIteration, ValueError):
        return None


def free_memory(device: str) -> Optional[int]:
    """Bytes a case can still allocate on ``device`` without swapping; None when unknown.

    CPU: MemAvailable (psutil's where there is no /proc), capped by a cgroup v2 limit. CUDA: the
    driver's free memory plus what torch's caching allocator holds but does not use.
    """
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    sizes = [n for n in (_meminfo_available(), _cgroup_room()) if n is not None]
    return min(sizes) if sizes else None


def format_bytes(n: float) -> str:
    """2.5 GB, 340.2 MB, 12 KB (binary units, as the table's peak MB)."""
    for unit, size in (("GB", 2 ** 30), ("MB", 2 ** 20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2 ** 10:.0f} KB"


Need = Callable[["Case"], float]   # a suite's estimate of the bytes a case holds at its peak


def memory_shortfall(need: float, free: Optional[int]) -> str:
    """Why a case that needs ``need`` bytes is not run with ``free`` bytes free ("" if it fits)."""
    if free is None or need <= free:
        return ""
    return f"needs ~{format_bytes(need)}, {format_bytes(free)} free"


# --- cases and results ----------------------------------------------------------------------

@dataclass
class Case:
    """One measurement: ``op`` run by ``provider`` (a backend name) in ``mode`` on ``shape``."""
    suite: str                  # a key of fastgpt.tools.bench.suites.SUITES
    op: str
    provider: str
    mode: str
    shape: dict
    dtype: str                  # "float32", "bfloat16", ...
    skip: str = ""              # why it is not run, decided when the case list was made

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


Build = Callable[[Case, str], Built]   # a suite's (case, device) -> Built


def _not_run(case: Case, device: str, need: Optional[Need]) -> str:
    """Why ``case`` is skipped before anything is allocated for it ("" if it runs): its list
    said so, or its estimated memory exceeds what the device has free now (read per case, so
    what the providers built before it hold is counted)."""
    if case.skip:
        return case.skip
    return memory_shortfall(need(case), free_memory(device)) if need else ""


def _measure_group(cases: list[Case], device: str, build: Build, min_run_time: float,
                   need: Optional[Need] = None) -> Iterator[Row]:
    """Time the providers of one (op, mode, shape) side by side, in this process; yields each
    row, in the cases' order, once its peak memory is measured."""
    rows, builts = [], {}
    for case in cases:
        why = _not_run(case, device, need)
        if not why:
            try:
                built = build(case, device)
                built.fn()   # first call: fails early, compiles what needs compiling
                builts[case.provider] = built
            except SkipCase as e:
                why = str(e)
            except Exception as e:   # a provider that breaks on these inputs must not stop the rest
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                why = f"failed: {type(e).__name__}: {msg[:200]}"
        rows.append(Row(case, skipped=why))
    fns = {provider: built.fn for provider, built in builts.items()}
    times = time_group_ms(fns, device, min_run_time) if fns else {}
    for row in rows:
        if not row.skipped:
            built = builts[row.case.provider]
            t = times[row.case.provider]
            row.median, row.p20, row.p80 = t["median"], t["p20"], t["p80"]
            row.rate, row.unit = _rate(built, row.median)
            row.peak_mb = peak_memory_mb(built.fn, device)
        yield row


def _measure_isolated(case: Case, device: str, build: Build, min_run_time: float) -> Row:
    """Measure one case in a fresh Python process (nothing another provider left behind); the
    worker imports ``build`` by its module and name."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", __name__, "--worker",
           json.dumps(dict(case=dataclasses.asdict(case), device=device,
                           build=f"{build.__module__}:{build.__qualname__}",
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
    allow_repeated_backward()
    module, _, name = w["build"].partition(":")
    build = getattr(importlib.import_module(module), name)
    (row,) = _measure_group([Case(**w["case"])], w["device"], build, w["min_run_time"])
    print(json.dumps({k: v for k, v in dataclasses.asdict(row).items() if k != "case"}))


class SkipCase(Exception):
    """A provider that cannot run a case here; the message says why."""


def allow_repeated_backward() -> None:
    """bwd mode re-runs one graph's backward (retain_graph), which torch.compile'd graphs allow
    only without buffer donation."""
    torch._functorch.config.donated_buffer = False


class Progress:
    """What ``run_cases`` reports as it goes (this one: nothing)."""

    def measuring(self, group: list[Case]) -> None:
        """The providers of one shape are about to be measured."""

    def measured(self, row: Row) -> None:
        """One row is complete (its speedup included)."""


def _groups(cases: list[Case], baseline: str) -> list[list[Case]]:
    """The cases by (op, mode, dtype, shape): the shapes of one table block together, in the
    order the list first names them, and the baseline first among each shape's providers."""
    blocks: dict[tuple, dict[str, list[Case]]] = {}
    for c in cases:
        blocks.setdefault((c.op, c.mode, c.dtype), {}).setdefault(c.shape_str(), []).append(c)
    return [sorted(group, key=lambda c: c.provider != baseline)
            for shapes in blocks.values() for group in shapes.values()]


def _measure(group: list[Case], device: str, build: Build, min_run_time: float, isolate: bool,
             need: Optional[Need]) -> Iterator[Row]:
    if not isolate:
        yield from _measure_group(group, device, build, min_run_time, need)
        return
    for case in group:   # checked here, before a process is started for it
        why = _not_run(case, device, need)
        yield Row(case, skipped=why) if why else _measure_isolated(case, device, build,
                                                                   min_run_time)


def _compare(row: Row, base: Optional[Row], device: str) -> None:
    """Fill in the speedup over ``base`` and, on CUDA, the % of the data-sheet peak."""
    if row.skipped:
        return
    if base is not None:
        row.speedup = base.median / row.median
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)   # data-sheet peaks: fastgpt.peaks
        peak = (matmul_peak_tflops(name, row.case.dtype) if row.unit == "TFLOP/s"
                else peak_bandwidth_gbs(name))
        row.pct_peak = 100.0 * row.rate / peak if peak else None


def run_cases(cases: list[Case], device: str, baseline: str, build: Build,
              min_run_time: float = 0.5, isolate: bool = False,
              progress: Optional[Progress] = None, need: Optional[Need] = None) -> list[Row]:
    """Measure every case (``build`` makes its callable: a suite's); speedups are against
    ``baseline`` on the same op, mode and shape. ``need`` estimates a case's bytes: a case that
    would not fit in free memory is skipped. Rows come back (and go to ``progress``) in table
    order: one block per (op, mode, dtype), the baseline first in each shape."""
    progress = progress or Progress()
    rows: list[Row] = []
    for group in _groups(cases, baseline):
        progress.measuring(group)
        base = None
        for row in _measure(group, device, build, min_run_time, isolate, need):
            if row.case.provider == baseline and not row.skipped:
                base = row
            _compare(row, base, device)
            progress.measured(row)
            rows.append(row)
    return rows


# --- output ---------------------------------------------------------------------------------

Widths = tuple[int, int]   # (provider column, shape column)


def _widths(cases: list[Case]) -> Widths:
    return (max(12, *(len(c.provider) for c in cases)),
            max(len(c.shape_str()) for c in cases))


def _block_head(key: tuple, unit: str, widths: Widths, baseline: str, cuda: bool) -> list[str]:
    op, mode, dtype = key
    pw, width = widths
    head = (f"  {'provider':<{pw}} {'shape':<{width}} {'median ms':>10} {'p20-p80 ms':>19} "
            f"{unit:>8} {'peak MB':>9} {'vs ' + baseline:>9}")
    return [f"\n{op} {mode} {dtype}", head + (f" {'% peak':>7}" if cuda else "")]


def _row_line(r: Row, widths: Widths, cuda: bool) -> str:
    c, (pw, width) = r.case, widths
    if r.skipped:
        return f"  {c.provider:<{pw}} {c.shape_str():<{width}} skipped: {r.skipped}"
    spread = f"{r.p20:.3f}-{r.p80:.3f}"
    line = (f"  {c.provider:<{pw}} {c.shape_str():<{width}} {r.median:>10.3f} {spread:>19} "
            f"{number(r.rate, '.3f'):>8} {number(r.peak_mb, '.1f'):>9} "
            f"{number(r.speedup, '.2f') + ('x' if r.speedup else ''):>9}")
    if cuda:
        line += f" {number(r.pct_peak, '.1f', 'unknown'):>7}"
    return line


def _blocks(items: list, case: Callable = lambda x: x) -> dict[tuple, list]:
    """``items`` (cases or rows) by table block: (op, mode, dtype)."""
    out: dict[tuple, list] = {}
    for x in items:
        c = case(x)
        out.setdefault((c.op, c.mode, c.dtype), []).append(x)
    return out


def format_table(rows: list[Row], baseline: str, device: str) -> str:
    """One block per (op, mode, dtype): provider, shape, times, rate, memory, speedup, % peak."""
    cuda = device.startswith("cuda")
    out = []
    for key, rs in _blocks(rows, lambda r: r.case).items():
        widths = _widths([r.case for r in rs])
        unit = next((r.unit for r in rs if r.unit), "rate")
        out += _block_head(key, unit, widths, baseline, cuda)
        out += [_row_line(r, widths, cuda) for r in rs]
    return "\n".join(out)


BAR_FORMAT = ("{desc}: {n_fmt}/{total_fmt} cases |{bar}| {elapsed} elapsed, ~{remaining} left"
              "{postfix}")


class TableStream(Progress):
    """``format_table``'s table, printed while it is measured: a block's header before its first
    row, each row as it is complete (a block's leading skipped rows wait for its first measured
    one, whose unit heads the rate column); and a progress bar on stderr.

    ``bar``: None shows the bar only when ``err`` is a terminal, True always, False never. The
    time left is the average time per case so far times the cases left (cases that are skipped
    take no time, and large shapes more than small ones: an estimate). ``out``/``err`` default to
    sys.stdout/sys.stderr as they are when written to.
    """

    def __init__(self, cases: list[Case], baseline: str, device: str, *, desc: str = "bench",
                 bar: Optional[bool] = None, out=None, err=None):
        self.baseline, self.cuda, self.out = baseline, device.startswith("cuda"), out
        self.widths = {key: _widths(cs) for key, cs in _blocks(cases).items()}
        self.block, self.headed, self.held = None, False, []
        self.bar = tqdm(total=len(cases), desc=desc, file=err or sys.stderr, smoothing=0,
                        disable=None if bar is None else not bar, dynamic_ncols=True,
                        bar_format=BAR_FORMAT)

    def measuring(self, group: list[Case]) -> None:
        c = group[0]
        self.bar.set_postfix_str(f"now: {c.op} {c.mode} {c.shape_str()}")

    def measured(self, row: Row) -> None:
        c = row.case
        if (c.op, c.mode, c.dtype) != self.block:
            self._flush()
            self.block, self.headed = (c.op, c.mode, c.dtype), False
        self.held.append(row)
        self.bar.update(1)       # before the rows: writing them redraws the bar with the count
        if self.headed or not row.skipped:
            self._flush()

    def _flush(self) -> None:
        if not self.held:
            return
        widths, lines = self.widths[self.block], []
        if not self.headed:
            unit = next((r.unit for r in self.held if r.unit), "rate")
            lines += _block_head(self.block, unit, widths, self.baseline, self.cuda)
            self.headed = True
        lines += [_row_line(r, widths, self.cuda) for r in self.held]
        self.held = []
        out = self.out or sys.stdout
        self.bar.clear()              # the bar's line is wiped, the rows written, the bar redrawn
        out.write("\n".join(lines) + "\n")
        out.flush()
        self.bar.refresh()

    def close(self) -> None:
        self._flush()
        self.bar.set_postfix_str("", refresh=False)   # the bar left behind: count and time
        self.bar.close()

    def __enter__(self) -> "TableStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
    # lazily: matplotlib takes ~1-2 s to import, and only --plot needs it. A Figure renders to
    # PNG without pyplot, so the caller's matplotlib backend stays as it was
    from matplotlib.figure import Figure

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
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
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
        written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit("usage: fastgpt bench ... (python -m fastgpt.tools.bench.harness is the worker "
                 "that measures one case in a fresh process)")

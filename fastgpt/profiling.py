"""`fastgpt train --profile`: a few training steps under torch.profiler, and where they went.

The profiler waits ``wait`` steps (the first is torch's warm-up step), then records ``steps``
steps: CPU activity (and CUDA's on a GPU), input shapes and memory. When they are done it writes
into the run directory

* ``trace.json`` (``trace.rank<R>.json`` per rank under torchrun): Chrome trace format, for
  Perfetto (ui.perfetto.dev) or chrome://tracing;
* ``profile.txt`` (rank 0): the time per fastgpt op and backend per step, then the top kernels
  by self time (torch's own table);
* on CUDA, ``memory_snapshot.pickle`` (rank 0): the allocator's history over the profiled
  steps, which https://pytorch.org/memory_viz opens.

How time is attributed. Every dispatched op runs inside a label named after its backend
(``fastgpt.attention[ext]``, fastgpt.ops.labels) and the loop labels its own work
(``fastgpt.data``, ``fastgpt.optimizer``, ``fastgpt.estimate``, ``fastgpt.checkpoint``). A label's
forward time is its range minus the labels nested in it (the torch block's attention is the
attention's, not the block's). Its backward time is that of the autograd nodes its forward
created: the profiler gives each backward node the sequence number of the forward op that made
it, so no hook changes the graph. What no label holds is "other" (LayerNorm, the position add,
gradient accumulation, Python). On a GPU the same split is taken over the kernels' device time.
Under --compile the compiled graph holds no labels: its time shows as "other".
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from fastgpt.errors import FastGPTError

TABLE_NAME = "profile.txt"
SNAPSHOT_NAME = "memory_snapshot.pickle"
LABEL_PREFIX = "fastgpt."
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
STEP_PREFIX = "ProfilerStep"
# labels that count whole: the model's ops an estimate runs are the estimate's time
WHOLE = ("fastgpt.estimate",)
TOP_KERNELS = 15


def trace_name(rank: int, world_size: int) -> str:
    return "trace.json" if world_size == 1 else f"trace.rank{rank}.json"


def check_window(wait: int, steps: int, first_iter: int, max_iters: int) -> None:
    """The profiled steps must lie inside the run; said before anything runs."""
    if wait < 0 or steps < 1:
        raise FastGPTError(f"--profile-wait {wait} --profile-steps {steps}: need wait >= 0 and "
                           f"steps >= 1")
    left = max_iters - first_iter
    if wait + steps > left:
        raise FastGPTError(f"--profile-wait {wait} + --profile-steps {steps} = {wait + steps} "
                           f"steps, but the run has {left} steps left (iterations {first_iter}.."
                           f"{max_iters}); lower them or raise --max-iters")


# --- the breakdown ----------------------------------------------------------------------------

@dataclass
class Share:
    """Time of one label (or "other") summed over the profiled steps, in microseconds."""
    forward_us: float = 0.0
    backward_us: float = 0.0
    device_us: float = 0.0

    @property
    def total_us(self) -> float:
        return self.forward_us + self.backward_us


@dataclass
class Breakdown:
    steps: int
    step_us: float                                # wall time of the profiled steps, summed
    device_us: float                              # kernels' time (0 on CPU)
    by_label: dict[str, Share] = field(default_factory=dict)


def _descendants(event):
    stack = list(event.cpu_children)
    while stack:
        e = stack.pop()
        yield e
        stack.extend(e.cpu_children)


def _nested_labels(event) -> list:
    """The labels directly inside ``event`` (not those inside them)."""
    out, stack = [], list(event.cpu_children)
    while stack:
        e = stack.pop()
        if e.name.startswith(LABEL_PREFIX):
            out.append(e)
        else:
            stack.extend(e.cpu_children)
    return out


def _owners(labels: list) -> dict[int, str]:
    """{sequence number of a forward op: the innermost label around it}."""
    depth = {id(e): sum(p.name.startswith(LABEL_PREFIX) for p in _ancestors(e)) for e in labels}
    owner = {}
    for e in sorted(labels, key=lambda e: depth[id(e)]):   # inner labels overwrite outer ones
        for d in _descendants(e):
            if d.sequence_nr >= 0:
                owner[d.sequence_nr] = e.name
    return owner


def breakdown(events) -> Breakdown:
    """Per-label forward, backward and device time over the profiled steps (module docstring)."""
    steps = [e for e in events if e.name.startswith(STEP_PREFIX)]
    labels = [e for e in events if e.name.startswith(LABEL_PREFIX) and not _inside(e, WHOLE)]
    out = Breakdown(steps=len(steps), step_us=sum(e.time_range.elapsed_us() for e in steps),
                    # each kernel once, through the CPU op that launched it (the kernels' own
                    # events and the GPU copies of the labels would count it again)
                    device_us=sum(e.self_device_time_total for e in events
                                  if e.device_type == DeviceType.CPU))
    by = collections.defaultdict(Share)
    for e in labels:
        inner = [] if e.name.startswith(WHOLE) else _nested_labels(e)
        share = by[e.name]
        share.forward_us += e.time_range.elapsed_us() - sum(i.time_range.elapsed_us()
                                                            for i in inner)
        # kineto ties each kernel to the CPU op that launched it: device_time_total is the
        # kernel time of an event and the ops inside it
        share.device_us += e.device_time_total - sum(i.device_time_total for i in inner)
    owner = _owners(labels)
    for e in events:
        if e.name.startswith(BACKWARD_PREFIX) and not _inside(e, (BACKWARD_PREFIX,)):
            share = by[owner.get(e.sequence_nr, "other")]
            share.backward_us += e.time_range.elapsed_us()
            share.device_us += e.device_time_total
    other = by["other"]
    labelled_us = sum(s.total_us for n, s in by.items() if n != "other")
    other.forward_us = max(0.0, out.step_us - labelled_us - other.backward_us)
    other.device_us = max(0.0, out.device_us - sum(s.device_us for n, s in by.items()
                                                  if n != "other"))
    out.by_label = dict(by)
    return out


def _ancestors(event):
    p = event.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def _inside(event, prefixes: tuple[str, ...]) -> bool:
    """Whether ``event`` runs inside an event whose name starts with one of ``prefixes``."""
    return any(p.name.startswith(prefixes) for p in _ancestors(event))


def format_breakdown(b: Breakdown, title: str) -> str:
    """The table of profile.txt: per label, ms per step forward / backward / total and the
    share of the step (labels are exclusive, so the shares and "other" add up to 100%)."""
    n = max(b.steps, 1)
    gpu = b.device_us > 0
    head = f"{'label':<42} {'fwd ms':>9} {'bwd ms':>9} {'ms/step':>9} {'share':>7}"
    lines = [title, "", f"mean step: {b.step_us / n / 1e3:.2f} ms wall over {b.steps} steps"
             + (f", {b.device_us / n / 1e3:.2f} ms of kernels" if gpu else ""), "",
             head + (f" {'GPU ms':>9} {'GPU share':>9}" if gpu else "")]
    order = sorted(b.by_label.items(), key=lambda kv: (kv[0] == "other", -kv[1].total_us))
    for name, s in order:
        line = (f"{name:<42} {s.forward_us / n / 1e3:9.2f} {s.backward_us / n / 1e3:9.2f} "
                f"{s.total_us / n / 1e3:9.2f} {100 * s.total_us / max(b.step_us, 1e-9):6.1f}%")
        if gpu:
            line += f" {s.device_us / n / 1e3:9.2f} {100 * s.device_us / b.device_us:8.1f}%"
        lines.append(line)
    return "\n".join(lines)


# --- the profiler -----------------------------------------------------------------------------

class StepProfiler:
    """torch.profiler over steps ``wait``..``wait + steps - 1`` of a run (counted from its first
    step); call ``step()`` after every training step. Writes its files once the last profiled
    step is done (module docstring)."""

    def __init__(self, out_dir: Path, device: torch.device, wait: int, steps: int,
                 rank: int = 0, world_size: int = 1, title: str = ""):
        self.out_dir, self.device, self.rank, self.world_size = out_dir, device, rank, world_size
        self.title = title
        self.cuda = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        # one of the waiting steps is torch's warm-up step (the profiler starts, records nothing)
        self.prof = profile(activities=activities, record_shapes=True, profile_memory=True,
                            schedule=schedule(wait=max(wait - 1, 0), warmup=min(wait, 1),
                                              active=steps, repeat=1),
                            on_trace_ready=self._write)
        self.written: list[Path] = []

    def __enter__(self) -> "StepProfiler":
        if self.cuda and self.rank == 0:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        with quiet_stderr():
            self.prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        with quiet_stderr():
            self.prof.__exit__(*exc)
        if self.cuda and self.rank == 0:
            torch.cuda.memory._record_memory_history(enabled=None)

    def step(self) -> None:
        with quiet_stderr():   # the profiler starts and stops in here
            self.prof.step()

    def _write(self, prof) -> None:
        trace = self.out_dir / trace_name(self.rank, self.world_size)
        _atomically(trace, prof.export_chrome_trace)
        self.written = [trace]
        if self.rank != 0:
            return
        table = self.out_dir / TABLE_NAME
        text = (format_breakdown(breakdown(prof.events()), self.title) + "\n\n"
                + f"top {TOP_KERNELS} ops by self time\n"
                + prof.key_averages().table(sort_by=("self_cuda_time_total" if self.cuda
                                                     else "self_cpu_time_total"),
                                            row_limit=TOP_KERNELS) + "\n")
        _atomically(table, lambda path: Path(path).write_text(text))
        self.written.append(table)
        if self.cuda:
            snapshot = self.out_dir / SNAPSHOT_NAME
            _atomically(snapshot, torch.cuda.memory._dump_snapshot)
            self.written.append(snapshot)


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 goes to /dev/null inside: libkineto prints lines such as
    "profiler_start" and allocator warnings straight to it whenever a profile starts or stops."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def allocations(fn: Callable[[], Any]) -> tuple[Any, list[int]]:
    """``fn()`` under the profiler with memory recording: (its result, the bytes of every tensor
    allocation (+) and free (-) during the call, in order). Tensor bytes exactly, whatever
    malloc keeps resident; the CPU analogue of CUDA's allocator statistics."""
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    return out, [e["args"]["Bytes"] for e in memory]


def _atomically(path: Path, write) -> None:
    """``write(name)`` to a temporary name beside ``path``, then rename it into place: a run
    killed while writing leaves no half-written file under the real name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()



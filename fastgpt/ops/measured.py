"""Measured dispatch: the automatic backend choice, timed on the user's own hardware.

Where nobody here has measured (any GPU), a fixed order cannot promise the fastest backend, nor
one that runs at all. So when no backend was named, the first call of an op for a new
*signature* (op, device name, dtype, the op's shape bucket, train or inference) times every
candidate backend on random inputs of that signature, and the fastest is used from then on:

* the shape bucket is the op's (``Workload.key``): sequence and row counts rounded up to a power
  of two, widths, head size and vocabulary exact, dropout on or off; inputs are built at the
  bucket's size (``Workload.inputs``);
* train signatures time forward + backward, inference ones the forward: warm-up runs (they
  also absorb Triton compilation and autotuning), then the median of ``REPEATS`` runs, timed
  with CUDA events on a GPU;
* each candidate's outputs and gradients are compared with the op's ``torch`` reference on the
  same inputs (dropout off): a cheap check that catches garbage (NaN, a wrong layout), not
  rounding (``TOLERANCE``, relative to the reference's largest magnitude);
* a candidate that raises (compile error, out of shared memory, launch failure) or fails that
  check is dropped for the signature with a one-line warning; if every candidate fails, the
  static order decides, as without measurement.

Choices persist in ``$XDG_CACHE_HOME/fastgpt/dispatch.json`` (``~/.cache/fastgpt/``), keyed also
by the torch, triton and fastgpt versions (fastgpt's includes a hash of its op and kernel
sources, so an edited kernel is measured again); the file is replaced atomically, and a corrupt
or foreign one is ignored with a warning. Under torchrun rank 0 decides (cache or measurement)
and the other ranks wait for its answer in the process group's store, so every rank runs the
same kernels. Under torch.compile the registry calls ``decide`` through a function Dynamo runs
eagerly at trace time (registry.constant_under_compile), so the graph holds the chosen backend.

``FASTGPT_DISPATCH=static`` keeps the fixed order everywhere; ``measure`` measures on the CPU
too. The default measures on CUDA only: the CPU orders are measured by us (bench/).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from fastgpt import __version__
from fastgpt.errors import FastGPTError

log = logging.getLogger("fastgpt.ops")

MODE_VAR = "FASTGPT_DISPATCH"
MODES = ("static", "measure")
CACHE_FORMAT = "fastgpt-dispatch-cache"
WARMUP, REPEATS = 2, 5
# the cheap comparison with the reference: generous (catches garbage, not rounding)
TOLERANCE = {torch.float32: 1e-2, torch.bfloat16: 6e-2, torch.float16: 2e-2, torch.float64: 1e-6}

Key = tuple   # ((name, value), ...): an op's shape bucket, constants only


@dataclass(frozen=True)
class Workload:
    """What measured dispatch needs to know of an op.

    ``key(*args, **kwargs)`` -> the shape bucket of a call as ((name, value), ...) constants, read
    from metadata only (it runs inside torch.compile's trace), or None for calls that are not
    measured (decoding with a KV cache). ``inputs(key, make)`` -> (args, kwargs) of that bucket,
    built with ``make`` (an InputMaker)."""
    key: Callable[..., Optional[Key]]
    inputs: Callable[[dict, "InputMaker"], tuple[tuple, dict]]


def bucket(n: int) -> int:
    """n rounded up to a power of two (a shape bucket's size)."""
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass
class InputMaker:
    """Random inputs on one device and dtype, from a private generator (the run's RNG streams
    are left alone); floating tensors require grad when the signature trains."""
    device: torch.device
    dtype: torch.dtype
    requires_grad: bool
    generator: torch.Generator

    def floats(self, shape, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        t = torch.randn(shape, generator=self.generator, device=self.device, dtype=torch.float32)
        return (t * scale + shift).to(self.dtype).requires_grad_(self.requires_grad)

    def ints(self, shape, high: int) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=self.generator, device=self.device)


def mode(device_type: str) -> str:
    """``static`` or ``measure`` for a device type: FASTGPT_DISPATCH, else measure on CUDA."""
    value = os.environ.get(MODE_VAR, "")
    if not value:
        return "measure" if device_type == "cuda" else "static"
    if value not in MODES:
        raise FastGPTError(f"{MODE_VAR}={value!r}: expected one of {', '.join(MODES)} (unset: "
                           f"measure on CUDA, static on the CPU)")
    return value


# ---- the cache file ---------------------------------------------------------------------------

def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastgpt" / "dispatch.json"


def _source_hash() -> str:
    """A short hash of the op and kernel sources: an edited kernel is a new version."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for folder in (here, here.parent / "kernels"):
        for path in sorted(folder.glob("*.py")):
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:10]


def _triton_version() -> str:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "none"


_VERSIONS: list[str] = []


def versions() -> str:
    if not _VERSIONS:
        _VERSIONS.append(f"torch {torch.__version__}, triton {_triton_version()}, "
                         f"fastgpt {__version__}+{_source_hash()}")
    return _VERSIONS[0]


_WARNED: set = set()


def _warn_once(key, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message)


def read_entries(path: Path, fmt: str) -> tuple[dict, Optional[str]]:
    """The "entries" of a cache file written by write_entries in format ``fmt``, and None; or {}
    and why the file was ignored (unreadable, or not a ``fmt`` file). A missing file is {}, None.
    Shared with fastgpt.flops' CPU matmul peak cache."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError) as e:
        return {}, f"{type(e).__name__}: {e}"
    if not (isinstance(data, dict) and data.get("format") == fmt
            and isinstance(data.get("entries"), dict)):
        return {}, f"not a {fmt} file"
    return data["entries"], None


def write_entries(path: Path, fmt: str, entries: dict) -> None:
    """Replace the cache file atomically (a temporary file in the same folder, then rename);
    raises OSError when it cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"format": fmt, "entries": entries}, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_file() -> dict:
    """Every entry in the cache file, of any versions; {} (with a warning) if it is unreadable."""
    path = cache_path()
    entries, why = read_entries(path, CACHE_FORMAT)
    if why is not None:
        _warn_once(("cache", str(path)), f"fastgpt: ignoring the dispatch cache {path}: {why}; it "
                                         f"will be rewritten")
    return entries


def read_cache() -> dict[str, dict]:
    """The cached entries made with this torch, triton and fastgpt, by signature."""
    mine = versions()
    return {k: e for k, e in _read_file().items()
            if isinstance(e, dict) and e.get("versions") == mine}


def _write_file(entries: dict) -> None:
    path = cache_path()
    try:
        write_entries(path, CACHE_FORMAT, entries)
    except OSError as e:
        _warn_once(("write", str(path)), f"fastgpt: cannot write the dispatch cache {path} "
                                         f"({e}); choices are measured again in each process")


def _store(entry: dict) -> None:
    entries = _read_file()      # read again just before writing: another process may have added
    entries[entry["signature"]] = entry
    _write_file(entries)


def clear_cache() -> int:
    """Forget every cached choice (of any versions); returns how many there were."""
    n = len(_read_file())
    if cache_path().exists():
        _write_file({})
    return n


# ---- one measurement --------------------------------------------------------------------------

@dataclass(frozen=True)
class Signature:
    op: str
    device: str           # "NVIDIA H100 80GB HBM3", "AMD EPYC ... (avx2 fma)"
    dtype: str
    key: Key
    training: bool

    @property
    def shape(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.key)

    @property
    def mode(self) -> str:
        return "train" if self.training else "inference"

    def __str__(self) -> str:
        return f"{versions()} | {self.op} | {self.device} | {self.dtype} | {self.shape} | {self.mode}"


def tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for x in tree for t in tensors(x)]
    if isinstance(tree, dict):
        return [t for x in tree.values() for t in tensors(x)]
    return []


def _runner(fn: Callable, args: tuple, kwargs: dict, training: bool) -> Callable[[], list]:
    """One call of ``fn``: forward, plus the gradients of every input that requires one."""
    leaves = [t for t in tensors((args, kwargs)) if t.requires_grad]

    def run() -> list[torch.Tensor]:
        if not training:
            with torch.no_grad():
                return tensors(fn(*args, **kwargs))
        outs = [o for o in tensors(fn(*args, **kwargs)) if o.requires_grad]
        grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs],
                                    allow_unused=True)
        return [o.detach() for o in outs] + [g for g in grads if g is not None]
    return run


def time_call(run: Callable[[], object], device: torch.device) -> float:
    """Median seconds of ``REPEATS`` calls after ``WARMUP`` (CUDA events on a GPU)."""
    for _ in range(WARMUP):
        run()
    times = []
    for _ in range(REPEATS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# tests replace this to decide which backend is fastest: (name, run, device) -> seconds
timer: Callable[[str, Callable[[], object], torch.device], float] = \
    lambda name, run, device: time_call(run, device)


def _wrong(got: list, want: list, dtype: torch.dtype) -> Optional[str]:
    """Why ``got`` is not ``want`` (the reference's outputs and gradients), or None."""
    if len(got) != len(want):
        return f"returned {len(got)} tensors, the reference {len(want)}"
    tol = TOLERANCE.get(dtype, 6e-2)
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            return f"tensor {i} has shape {tuple(g.shape)}, the reference {tuple(w.shape)}"
        g, w = g.double(), w.double()
        if not torch.isfinite(g).all():
            return f"tensor {i} is not finite"
        scale = w.abs().max().item() if w.numel() else 0.0
        err = (g - w).abs().max().item() if w.numel() else 0.0
        if err > tol * max(scale, 1e-6):
            return f"tensor {i} differs from the reference by {err:.3g} (scale {scale:.3g})"
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    return f"{type(e).__name__}: {text[:200]}"


def measure(sig: Signature, fns: dict[str, Callable], reference: Callable, workload: Workload,
            device: torch.device, dtype: torch.dtype) -> dict:
    """Time and check each of ``fns`` on inputs of ``sig``; returns the cache entry. The RNG
    streams (dropout inside the backends draws from them) are restored afterwards, so a run that
    measures trains as one that read the cache."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _measure(sig, fns, reference, workload, device, dtype)


def _measure(sig: Signature, fns: dict[str, Callable], reference: Callable, workload: Workload,
             device: torch.device, dtype: torch.dtype) -> dict:
    key = dict(sig.key)

    def inputs(**overrides):
        make = InputMaker(device, dtype, sig.training, torch.Generator(device=device).manual_seed(0))
        return workload.inputs({**key, **overrides}, make)

    check_args = inputs(**({"dropout": False} if key.get("dropout") else {}))
    want = _runner(reference, *check_args, sig.training)()
    timed_args = inputs()
    times, failed = {}, {}
    for name, fn in fns.items():
        try:
            wrong = _wrong(_runner(fn, *check_args, sig.training)(), want, dtype)
            if wrong is not None:
                raise FastGPTError(f"wrong result: {wrong}")
            times[name] = timer(name, _runner(fn, *timed_args, sig.training), device) * 1e3
        except Exception as e:                   # any failure drops the backend
            failed[name] = _one_line(e)
            log.warning(f"fastgpt: dispatch drops {sig.op} backend {name!r} for {sig.dtype} "
                        f"{sig.shape} ({sig.mode}) on {sig.device}: {failed[name]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    chosen = min(times, key=times.get) if times else None
    return {"signature": str(sig), "versions": versions(), "op": sig.op, "device": sig.device,
            "dtype": sig.dtype, "shape": sig.shape, "mode": sig.mode, "chosen": chosen,
            "times_ms": times, "failed": failed}


# ---- deciding ---------------------------------------------------------------------------------

# this process's choices, by the registry's (op, device, dtype, key, training, candidates)
DECIDED: dict[tuple, Optional[str]] = {}


def _summary(entry: dict) -> str:
    times = ", ".join(f"{n} {ms:.3g} ms" for n, ms in sorted(entry["times_ms"].items(),
                                                           key=lambda kv: kv[1]))
    return (f"fastgpt: dispatch {entry['op']} {entry['dtype']} {entry['shape']} ({entry['mode']}) "
            f"on {entry['device']}: {times or 'every candidate failed'} -> "
            f"{entry['chosen'] or 'the static order'}")


def _measure_or_cached(sig: Signature, candidates: tuple, run_measurement: Callable[[], dict]):
    """Rank 0's (or a lone process's) decision: the cached entry when it was made with the same
    candidates, else a new measurement, stored."""
    entry = read_cache().get(str(sig))
    if entry is not None and sorted(entry["times_ms"]) + sorted(entry["failed"]) == \
            sorted(candidates) and (entry["chosen"] is None or entry["chosen"] in candidates):
        log.info(_summary(entry) + " (cached)")
        return entry["chosen"]
    started = time.perf_counter()
    try:
        entry = run_measurement()
    except Exception as e:   # the reference or the inputs failed (out of memory): nothing to compare
        log.warning(f"fastgpt: dispatch cannot measure {sig.op} {sig.dtype} {sig.shape} "
                    f"({sig.mode}) on {sig.device}: {_one_line(e)}; using the static order")
        return None
    _store(entry)
    log.warning(f"{_summary(entry)} (measured in {time.perf_counter() - started:.2f} s)")
    return entry["chosen"]


def _default_store():
    """The process group's key-value store when several processes run, else None."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return dist.distributed_c10d._get_default_store()


def decide(sig: Signature, candidates: tuple, run_measurement: Callable[[], dict]) -> Optional[str]:
    """The backend for ``sig`` (None: use the static order). Under torchrun, rank 0 decides and
    the other ranks take its answer from the store. The registry calls it once per signature in a
    process (DECIDED)."""
    store = _default_store()
    slot = "fastgpt.dispatch:" + hashlib.sha256(str(sig).encode()).hexdigest()
    if store is not None and torch.distributed.get_rank() != 0:
        chosen = json.loads(store.get(slot))       # waits until rank 0 has decided
        log.info(f"fastgpt: dispatch {sig.op} {sig.dtype} {sig.shape} ({sig.mode}): "
                 f"{chosen} (rank 0's choice)")
    else:
        chosen = _measure_or_cached(sig, candidates, run_measurement)
        if store is not None:
            store.set(slot, json.dumps(chosen))
    return chosen


def forget() -> None:
    """Drop this process's decisions (tests; after ``clear_cache``)."""
    DECIDED.clear()


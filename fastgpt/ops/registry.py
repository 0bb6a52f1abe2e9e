"""Backend registry and the dispatch rules every op shares.

Each op (``attention``, ``cross_entropy``, ``linear_cross_entropy``, ``embedding``,
``transformer_block``) has named
backends. A backend is a function plus two metadata-only predicates:

* ``available()`` -> None or a reason string (e.g. "triton is not installed");
* ``supports(*args, **kwargs)`` -> None or a reason string, looking only at device, dtype and
  shapes, never at tensor data, so dispatch stays traceable by ``torch.compile(fullgraph=True)``.

Precedence when choosing: explicit ``backend=`` > ``use_backends(...)`` context > the model's
config > env ``FASTGPT_BACKENDS`` (``attention=tril,embedding=torch``) > the automatic choice.
Anything the user named must run or raise a FastGPTError saying why. The automatic choice is
measured on CUDA (fastgpt.ops.measured: the fastest candidate that works, timed at first use and
cached) and the default order for the tensor's device elsewhere (``FASTGPT_DISPATCH`` switches);
the default order falls back quietly (logged once) past a backend that cannot run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastgpt.device import describe
from fastgpt.errors import FastGPTError
from fastgpt.ops import labels, measured

log = logging.getLogger("fastgpt.ops")

ENV_VAR = "FASTGPT_BACKENDS"
OPS = ("attention", "cross_entropy", "linear_cross_entropy", "embedding", "transformer_block")
# Spellings accepted from users; the registry key is always the snake_case one.
_OP_ALIASES = {"cross-entropy": "cross_entropy", "linear-cross-entropy": "linear_cross_entropy",
               "causal_attention": "attention", "transformer-block": "transformer_block",
               "block": "transformer_block"}


def constant_under_compile(fn: Callable) -> Callable:
    """torch.compiler.assume_constant_result without importing torch._dynamo (~1.2 s, which a
    CPU training run never needs): that decorator only sets this marker, which Dynamo reads when
    it meets the function and then calls it eagerly instead of tracing it. Availability checks
    use it: they import modules and define ops on their first call, which must not be traced.
    (tests/test_ops_dispatch.py checks the marker is still the one torch sets.)"""
    fn._dynamo_marked_constant = True
    return fn


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, built on first use and kept."""
    return torch.compile(fn)


def compile_backend(fn: Callable) -> Callable:
    """A ``compile`` backend: ``fn`` through torch.compile, compiled on first use; inside a region
    that is already being compiled, ``fn`` itself, so the outer compile traces straight through."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        return compiled(fn)(*args, **kwargs)
    return run


def _always(*args, **kwargs) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Backend:
    op: str
    name: str
    fn: Callable
    supports: Callable[..., Optional[str]] = _always
    available: Callable[[], Optional[str]] = _always
    # a candidate of measured dispatch; not the lecture's naive versions, not `compile` (its
    # compilation would cost more than it can win back here), not what trades memory for speed
    measured: bool = True

    def cannot_run(self, *args, **kwargs) -> Optional[str]:
        """None when the backend is there and supports these inputs, else why not."""
        return self.available() or self.supports(*args, **kwargs)

    @property
    def label(self) -> str:
        """What a profile calls this backend's work: ``fastgpt.attention[ext]``."""
        return f"fastgpt.{self.op}[{self.name}]"

    def __call__(self, *args, **kwargs):
        """Run the backend; while a profiler records, inside a range named ``self.label``
        (fastgpt.ops.labels: no cost beyond one check otherwise)."""
        if not labels.recording():
            return self.fn(*args, **kwargs)
        with torch.profiler.record_function(self.label):
            return self.fn(*args, **kwargs)


_BACKENDS: dict[str, dict[str, Backend]] = {op: {} for op in OPS}
# Default order per op and device type; the first backend that is available and supports the
# inputs wins. Later issues' backends insert themselves by name here.
_DEFAULT_ORDER: dict[str, dict[str, list[str]]] = {op: {} for op in OPS}
_WORKLOADS: dict[str, measured.Workload] = {}   # how measured dispatch sees each op
_CONTEXT: list[dict[str, str]] = []   # stack of use_backends(...) overrides
_LOGGED: set = set()


def canonical_op(op: str, flag: Optional[str] = None) -> str:
    """The registry key of an op name or alias; an unknown name is an error that lists the ops
    (and names the command-line ``flag`` it came from, if any)."""
    key = _OP_ALIASES.get(op, op)
    if key not in OPS:
        where = f"{flag} {op!r}:" if flag else f"unknown op {op!r};"
        raise FastGPTError(f"{where} ops are: {', '.join(OPS)}")
    return key


def register(op: str, name: str, fn: Callable, *, supports: Callable = _always,
             available: Callable = _always, measured: bool = True) -> Backend:
    op = canonical_op(op)
    backend = Backend(op, name, fn, supports, available, measured)
    _BACKENDS[op][name] = backend
    return backend


def unregister(op: str, names: list[str]) -> None:
    """Remove backends registered for a while (the accuracy rule's mutants)."""
    for name in names:
        _BACKENDS[canonical_op(op)].pop(name, None)


def set_default_order(op: str, device_type: str, names: list[str],
                      dtype: Optional[torch.dtype] = None) -> None:
    """The automatic order for a device type ("cpu", "cuda", or "default" for any other), or
    for one dtype on that device type when ``dtype`` is given (it wins over the device's)."""
    key = device_type if dtype is None else _dtype_key(device_type, dtype)
    _DEFAULT_ORDER[canonical_op(op)][key] = list(names)


def set_workload(op: str, workload: measured.Workload) -> None:
    """How measured dispatch buckets the op's calls and builds inputs like them."""
    _WORKLOADS[canonical_op(op)] = workload


def _dtype_key(device_type: str, dtype: torch.dtype) -> str:
    return f"{device_type}:{str(dtype).removeprefix('torch.')}"


def backend_names(op: str) -> list[str]:
    """Every registered backend of ``op``, runnable here or not."""
    return list(_BACKENDS[canonical_op(op)])


def available_backends(op: str) -> list[str]:
    """Backends of ``op`` that are installed and built here (their ``available()``: triton
    importable, the extension compiled). Whether one runs a given call (device, dtype, shapes)
    is its ``supports()``, decided per call."""
    return [n for n, b in _BACKENDS[canonical_op(op)].items() if b.available() is None]


def get(op: str, name: str) -> Backend:
    op = canonical_op(op)
    try:
        return _BACKENDS[op][name]
    except KeyError:
        raise FastGPTError(
            f"unknown {op} backend {name!r}; known backends: {', '.join(_BACKENDS[op])}") from None


def parse_backend_spec(spec: str) -> dict[str, str]:
    """Parse ``attention=tril,embedding=torch`` (the FASTGPT_BACKENDS format)."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" not in item:
            raise FastGPTError(f"bad {ENV_VAR} entry {item!r}: expected op=backend, "
                               f"e.g. attention=tril,embedding=torch")
        op, name = (s.strip() for s in item.split("=", 1))
        op = canonical_op(op)
        get(op, name)  # validates the name
        out[op] = name
    return out


@contextlib.contextmanager
def use_backends(**by_op: Optional[str]):
    """Within this block, ops use the named backends: ``use_backends(attention="tril")``."""
    override = {}
    for op, name in by_op.items():
        if name is not None:
            op = canonical_op(op)
            get(op, name)
            override[op] = name
    _CONTEXT.append(override)
    try:
        yield
    finally:
        _CONTEXT.pop()


def requested(op: str, backend: Optional[str] = None,
              preferred: Optional[str] = None) -> Optional[tuple[str, str]]:
    """(name, where it came from) of the backend the user asked for, or None for automatic."""
    if backend is not None:
        return backend, "backend= argument"
    for override in reversed(_CONTEXT):
        if op in override:
            return override[op], "use_backends()"
    if preferred is not None:
        return preferred, "model config"
    spec = os.environ.get(ENV_VAR, "")
    if spec:
        env = parse_backend_spec(spec)
        if op in env:
            return env[op], ENV_VAR
    return None


def _log_once(key, msg: str) -> None:
    if key not in _LOGGED and not torch.compiler.is_compiling():
        _LOGGED.add(key)
        log.warning(msg)


_recorded: Optional[dict[str, str]] = None   # see recording_choices


@contextlib.contextmanager
def recording_choices():
    """Yields a dict that collects {op: backend name} for the first call of each op made inside
    (a training run's header reports them from one probe step)."""
    global _recorded
    _recorded, outer = {}, _recorded
    try:
        yield _recorded
    finally:
        _recorded = outer


def choose(op: str, device_type: str, args: tuple, kwargs: dict, *,
           backend: Optional[str] = None, preferred: Optional[str] = None,
           dtype: Optional[torch.dtype] = None) -> Backend:
    """Pick the backend for one call, following the precedence in the module docstring."""
    chosen = _choose(op, device_type, args, kwargs, backend, preferred, dtype)
    if _recorded is not None:
        _recorded.setdefault(op, chosen.name)
    return chosen


def _choose(op: str, device_type: str, args: tuple, kwargs: dict, backend: Optional[str],
            preferred: Optional[str], dtype: Optional[torch.dtype]) -> Backend:
    asked = requested(op, backend, preferred)
    if asked is not None:
        name, source = asked
        chosen = get(op, name)
        reason = chosen.cannot_run(*args, **kwargs)
        if reason is not None:
            raise FastGPTError(f"{op} backend {name!r} (from {source}) cannot run here: {reason}. "
                               f"Available {op} backends: {', '.join(available_backends(op))}")
        return chosen
    if measured.mode(device_type) == "measure":
        fastest = _measured_choice(op, args, kwargs)
        if fastest is not None:
            return fastest
    orders = _DEFAULT_ORDER[op]
    order = ((orders.get(_dtype_key(device_type, dtype)) if dtype is not None else None)
             or orders.get(device_type) or orders.get("default", []))
    skipped = []
    for name in order:
        candidate = _BACKENDS[op].get(name)
        if candidate is None:
            continue
        reason = candidate.cannot_run(*args, **kwargs)
        if reason is None:
            if skipped:
                _log_once((op, device_type, name, tuple(skipped)),
                          f"fastgpt: {op} uses backend {name!r}; skipped " + "; ".join(skipped))
            return candidate
        skipped.append(f"{name} ({reason})")
    raise FastGPTError(f"no {op} backend can run these inputs on {device_type}: " + "; ".join(skipped))


def _measured_choice(op: str, args: tuple, kwargs: dict) -> Optional[Backend]:
    """The fastest candidate for this call's signature (fastgpt.ops.measured), or None where
    nothing is measured: no workload, a call the workload leaves out, fewer than two candidates,
    or every candidate failed. Reads metadata only; the measuring happens in _decide."""
    workload = _WORKLOADS.get(op)
    key = workload.key(*args, **kwargs) if workload is not None else None
    if key is None:
        return None
    candidates = tuple(n for n, b in _BACKENDS[op].items()
                       if b.measured and b.cannot_run(*args, **kwargs) is None)
    if len(candidates) < 2:
        return None
    tensors = measured.tensors((args, kwargs))
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), tensors[0].dtype)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    name = _decide(op, str(tensors[0].device), str(dtype).removeprefix("torch."), key, training,
                   candidates)
    return None if name is None else _BACKENDS[op][name]


@constant_under_compile
def _decide(op: str, device: str, dtype: str, key: tuple, training: bool,
            candidates: tuple) -> Optional[str]:
    """measured.decide for one signature; constants in, a name out, so under torch.compile Dynamo
    calls it eagerly at trace time (real inputs, real timings) and the graph holds the choice.
    Eager calls after the first are one dictionary lookup."""
    memo = (op, device, dtype, key, training, candidates)
    if memo not in measured.DECIDED:
        measured.DECIDED[memo] = _decide_first(*memo)
    return measured.DECIDED[memo]


def _decide_first(op: str, device: str, dtype: str, key: tuple, training: bool,
                  candidates: tuple) -> Optional[str]:
    dev, torch_dtype = torch.device(device), getattr(torch, dtype)
    sig = measured.Signature(op, describe(dev), dtype, key, training)

    def run_measurement() -> dict:
        fns = {name: _BACKENDS[op][name].fn for name in candidates}
        return measured.measure(sig, fns, _BACKENDS[op]["torch"].fn, _WORKLOADS[op], dev,
                                torch_dtype)
    return measured.decide(sig, candidates, run_measurement)

"""Model FLOPs of a training step, achieved TFLOP/s and MFU (model FLOPs utilisation).

FLOPs per trained token (forward + backward), the standard count (PaLM's appendix B, nanoGPT's
estimate_mfu), for a GPT with N parameters, L layers, width C and sequence length T:

    6 * N  +  6 * L * C * T

* ``6 * N``: every weight does one multiply-add (2 FLOPs) per token forward and two backward
  (the input's and the weight's gradient). N is nanoGPT's count: every parameter but the position
  table; the token table stays in because, tied, it is the output head's matmul. (The lookup
  itself and the LayerNorm and bias parameters do no multiply-adds; they are under 1% of N at
  every preset.)
* ``6 * L * C * T``: attention's two matmuls (q @ k^T and probs @ v) are 4 * C * T FLOPs per
  token forward with every key; the causal mask halves it, as `fastgpt bench` counts attention
  (4*B*H*T*T*D halved), to 2 * C * T; backward is twice forward, so 6 * C * T per layer.
  Model FLOPs, not hardware FLOPs: a kernel that recomputes the scores in backward (flash
  attention; bench's 2.5x) does more work than this counts, and MFU leaves that out by definition.

The bigram model does no matmul (a table lookup and a softmax): its count is 0 and it reports
neither TFLOP/s nor MFU.

MFU is the achieved model FLOP/s of one device over that device's dense peak for the dtype the
step runs in: a GPU's data-sheet figure (fastgpt.peaks; an unknown GPU gives "MFU unknown", never
a guess), or on a CPU the rate a one-second matmul probe in the run's dtype measures at start-up
(measured, so it says what this CPU's matmul reaches, load included). The probe's result is
cached (cpu_peak_cache_path: beside measured dispatch's cache) per CPU model and flags, dtype,
thread count and torch version, so only the first run of each measures it (it added 1.4-1.7 s to
every CPU run); `fastgpt dispatch --clear` forgets it. Under torchrun the
tokens/s is the global one and MFU is per device: the FLOP rate is divided by the world size once.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from fastgpt.device import cpu_flags, cpu_model, describe, speed_flags
from fastgpt.model import GPT
from fastgpt.ops import measured
from fastgpt.peaks import matmul_peak_tflops

log = logging.getLogger("fastgpt")

PROBE_SECONDS = 1.0
PEAK_CACHE_NAME = "cpu_matmul_peak.json"
PEAK_CACHE_FORMAT = "fastgpt-cpu-matmul-peak"


def flops_per_token(model: torch.nn.Module) -> float:
    """Training FLOPs per token of ``model`` (see the module docstring); 0 for the bigram model."""
    if not isinstance(model, GPT):
        return 0.0
    m = model.config
    return 6.0 * model.num_params() + 6.0 * m.n_layer * m.n_embd * m.block_size


def cpu_matmul_peak_tflops(dtype: torch.dtype, seconds: float = PROBE_SECONDS) -> float:
    """This CPU's matmul peak in ``dtype`` (TFLOP/s): cached, else measured by ``probe``."""
    return cpu_matmul_peak(dtype, seconds)[0]


def cpu_matmul_peak(dtype: torch.dtype, seconds: float = PROBE_SECONDS) -> tuple[float, bool]:
    """(TFLOP/s, whether it was cached): the cache file's figure for this CPU, dtype, thread
    count and torch (see peak_key), else a new ``probe`` of about ``seconds``, stored there. The
    process keeps what it read or measured, so an unwritable cache measures once per process."""
    key = peak_key(dtype)
    if key in _SEEN:
        return _SEEN[key], True
    entry = _read_peaks().get(key)
    if isinstance(entry, dict) and _is_rate(entry.get("tflops")):
        _SEEN[key] = entry["tflops"]
        return entry["tflops"], True
    tflops, n = probe(dtype, seconds)
    _SEEN[key] = tflops
    _store_peak(key, dict(cpu=cpu_model(), flags=speed_flags(),
                          dtype=str(dtype).removeprefix("torch."),
                          threads=torch.get_num_threads(), torch=torch.__version__,
                          tflops=tflops, size=n, seconds=seconds,
                          measured=datetime.datetime.now().isoformat(timespec="seconds")))
    return tflops, False


_SEEN: dict[str, float] = {}   # this process's peaks, by peak_key


def _is_rate(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def peak_key(dtype: torch.dtype) -> str:
    """What a cached peak holds for: the CPU (model name, and every flag: hashed, the speed flags
    spelled out), the dtype, torch's thread count and torch's version."""
    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
    return (f"{cpu_model()} ({speed_flags()}; flags {flags}) | "
            f"{str(dtype).removeprefix('torch.')} | {torch.get_num_threads()} threads | "
            f"torch {torch.__version__}")


def probe(dtype: torch.dtype, seconds: float = PROBE_SECONDS) -> tuple[float, int]:
    """(the best TFLOP/s of square matmuls in ``dtype`` over about ``seconds``, their size): the
    size doubles from 256 while a call takes under 50 ms (up to 2048), then that size repeats;
    the fastest call counts, as a peak should."""
    gen = torch.Generator().manual_seed(0)   # the run's own random streams stay untouched
    n = 256
    a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
    while True:
        t = time.perf_counter()
        torch.mm(a, b)
        took = time.perf_counter() - t
        if took >= 0.05 or n >= 2048:
            break
        n *= 2
        a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
    best, end = took, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best / 1e12, n


# ---- the cache file ---------------------------------------------------------------------------

def peak_cache_path() -> Path:
    """$XDG_CACHE_HOME/fastgpt/cpu_matmul_peak.json (else ~/.cache/fastgpt/...): beside the
    dispatch cache (fastgpt.ops.measured), cleared with it by `fastgpt dispatch --clear`."""
    return measured.cache_path().with_name(PEAK_CACHE_NAME)


def _read_peaks(warn: bool = True) -> dict:
    """The cached peaks by key; {} (with a warning, if ``warn``) when the file is unreadable or
    not ours."""
    path = peak_cache_path()
    entries, why = measured.read_entries(path, PEAK_CACHE_FORMAT)
    if why is not None and warn:
        log.warning(f"fastgpt: ignoring the CPU matmul peak cache {path}: {why}; it will be "
                    f"rewritten")
    return entries


def _write_peaks(entries: dict) -> None:
    """Replace the file atomically; a cache that cannot be written is only a warning."""
    path = peak_cache_path()
    try:
        measured.write_entries(path, PEAK_CACHE_FORMAT, entries)
    except OSError as e:
        log.warning(f"fastgpt: cannot write the CPU matmul peak cache {path} ({e}); the peak is "
                    f"measured again in each process")


def _store_peak(key: str, entry: dict) -> None:
    entries = _read_peaks(warn=False)   # again just before writing: another process may have added
    entries[key] = entry
    _write_peaks(entries)


def read_peak_cache() -> dict[str, dict]:
    """Every cached peak (any CPU, dtype, threads and torch), by key."""
    return {k: e for k, e in _read_peaks().items() if isinstance(e, dict)}


def clear_peak_cache() -> int:
    """Forget every cached peak (in the file and in this process); returns how many the file
    held."""
    _SEEN.clear()
    n = len(read_peak_cache())
    peak_cache_path().unlink(missing_ok=True)
    return n


@dataclass(frozen=True)
class Throughput:
    """Turns a run's tokens/s into TFLOP/s and MFU."""
    flops_per_token: float
    peak_tflops: Optional[float]       # per device; None: unknown, MFU is not reported
    peak_source: str                   # where the peak comes from, for the run's header
    world_size: int = 1

    def tflops(self, tokens_per_s: float) -> float:
        """Achieved model TFLOP/s per device."""
        return self.flops_per_token * tokens_per_s / self.world_size / 1e12

    def mfu(self, tokens_per_s: float) -> Optional[float]:
        """The fraction of one device's peak; None where the peak or the FLOPs are unknown."""
        if not self.peak_tflops or not self.flops_per_token:
            return None
        return self.tflops(tokens_per_s) / self.peak_tflops


def throughput(model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
               world_size: int = 1) -> Throughput:
    """The run's FLOP count and the peak its MFU divides by (see the module docstring)."""
    fpt = flops_per_token(model)
    name = describe(device)
    if not fpt:
        return Throughput(fpt, None, "no matmuls: no MFU", world_size)
    if device.type == "cpu":
        peak, cached = cpu_matmul_peak(dtype)
        return Throughput(fpt, peak, f"measured: {PROBE_SECONDS:g} s matmul probe in "
                          f"{str(dtype).removeprefix('torch.')}, {peak:.3g} TFLOP/s"
                          + (" (cached; `fastgpt dispatch --clear` measures again)" if cached
                             else ""), world_size)
    peak = matmul_peak_tflops(name, dtype)
    source = (f"data sheet: {peak:g} TFLOP/s" if peak is not None
              else f"MFU unknown: no data-sheet peak for {name!r}")
    return Throughput(fpt, peak, source, world_size)

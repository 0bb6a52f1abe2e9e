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
(measured, so it says what this CPU's matmul reaches now, load included). Under torchrun the
tokens/s is the global one and MFU is per device: the FLOP rate is divided by the world size once.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Optional

import torch

from fastgpt.device import describe
from fastgpt.model import GPT
from fastgpt.peaks import matmul_peak_tflops

PROBE_SECONDS = 1.0


def flops_per_token(model: torch.nn.Module) -> float:
    """Training FLOPs per token of ``model`` (see the module docstring); 0 for the bigram model."""
    if not isinstance(model, GPT):
        return 0.0
    m = model.config
    return 6.0 * model.num_params() + 6.0 * m.n_layer * m.n_embd * m.block_size


@functools.cache
def cpu_matmul_peak_tflops(dtype: torch.dtype, seconds: float = PROBE_SECONDS) -> float:
    """The best TFLOP/s of square matmuls in ``dtype`` on this CPU over about ``seconds``
    (measured once per process): the size doubles from 256 while a call takes under 50 ms (up to
    2048), then that size repeats; the fastest call counts, as a peak should."""
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
    return 2.0 * n ** 3 / best / 1e12


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
        peak = cpu_matmul_peak_tflops(dtype)
        return Throughput(fpt, peak, f"measured: {PROBE_SECONDS:g} s matmul probe in "
                          f"{str(dtype).removeprefix('torch.')}, {peak:.3g} TFLOP/s", world_size)
    peak = matmul_peak_tflops(name, dtype)
    source = (f"data sheet: {peak:g} TFLOP/s" if peak is not None
              else f"MFU unknown: no data-sheet peak for {name!r}")
    return Throughput(fpt, peak, source, world_size)

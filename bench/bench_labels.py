"""What the profiler labels cost a training step when no profiler records.

Each dispatched op runs through ``Backend.__call__`` (one check whether a profiler records) and
the loop opens ``labelled(...)`` contexts around its data and optimizer parts. This measures
(1) the cost per call of each against calling the function directly, alternated in one process
(median of 7 rounds), (2) how many of each one step of the preset makes, counted on a real step,
and (3) that step's time, the fastest of 20 (on a shared machine the others measure the
neighbours; the fastest step gives the labels their largest share), and prints that share. Whole runs with and
without the labels: ``fastgpt bench train --configs "default fp32;default fp32 unlabelled"``.

    python bench/bench_labels.py [--preset baby] [--dtype float32]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch

from fastgpt import config
from fastgpt.model import GPT
from fastgpt.ops import labels
from fastgpt.ops.registry import Backend
from fastgpt.tools.environment import environment, format_env


def per_call_us(fn, n: int = 100_000) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def call_costs() -> dict[str, float]:
    """Median microseconds per call of each way, alternated over 7 rounds."""
    def bare():
        return None
    backend = Backend("attention", "bench", bare)

    def labelled():
        with labels.labelled("fastgpt.data"):
            pass

    def nullcontext():
        with contextlib.nullcontext():
            pass
    ways = {"function": bare, "Backend.__call__": backend, "with labelled()": labelled,
            "with nullcontext()": nullcontext}
    times = {k: [] for k in ways}
    for _ in range(7):
        for k, fn in ways.items():
            times[k].append(per_call_us(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def one_step(model, opt, x, y):
    with labels.labelled("fastgpt.data"):
        pass
    _, loss = model(x, y)
    loss.backward()
    with labels.labelled("fastgpt.optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def step_counts_and_ms(preset: str, dtype: torch.dtype, steps: int = 20) -> tuple[int, int, float]:
    """(backend calls per step, labelled() contexts per step, fastest step ms)."""
    m, t = config.preset(preset)
    m.vocab_size = 65
    torch.manual_seed(0)
    model = GPT(m).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 65, (t.batch_size, m.block_size))
    calls, contexts = [0], [0]
    real_call, real_label = Backend.__call__, labels.labelled

    def counting_call(self, *a, **kw):
        calls[0] += 1
        return real_call(self, *a, **kw)

    def counting_label(name):
        contexts[0] += 1
        return real_label(name)
    one_step(model, opt, x, x)   # warm-up: dispatch decisions, allocator
    with mock.patch.object(Backend, "__call__", counting_call), \
            mock.patch.object(labels, "labelled", counting_label):
        one_step(model, opt, x, x)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one_step(model, opt, x, x)
        times.append((time.perf_counter() - t0) * 1e3)
    return calls[0], contexts[0], min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="baby")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    print(f"# bench_labels; {format_env(environment('cpu'))}")
    costs = call_costs()
    for k, us in costs.items():
        print(f"  {k:<22} {us:7.3f} us per call (median of 7 x 100k)")
    call_extra = costs["Backend.__call__"] - costs["function"]
    label_extra = costs["with labelled()"] - costs["with nullcontext()"]
    calls, contexts, step_ms = step_counts_and_ms(args.preset, getattr(torch, args.dtype))
    extra_ms = (calls * call_extra + contexts * max(label_extra, 0.0)) / 1e3
    print(f"  one {args.preset} step ({args.dtype}): {calls} backend calls, {contexts} labelled "
          f"contexts, {step_ms:.2f} ms (fastest of 20 steps)")
    print(f"  labels without a profiler: {calls} x {call_extra:.3f} + {contexts} x "
          f"{label_extra:.3f} us = {extra_ms * 1e3:.1f} us per step = "
          f"{100 * extra_ms / step_ms:.3f}% of the step")


if __name__ == "__main__":
    main()

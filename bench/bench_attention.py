"""Causal attention: every backend of fastgpt.ops.causal_attention, timed side by side.

Providers: loop, tril, torch, sdpa, compile, and triton (CUDA only: on CPU it would be the
Triton interpreter, which is a correctness tool, not a fast path). Modes: fwd, bwd (backward
alone, from a kept graph), fwd+bwd. Reports median ms with the p20-p80 spread, TFLOP/s (causal
FLOPs: 2*B*H*T*T*D forward, 2.5x that backward), peak memory on CUDA, and the speedup over tril.

    python bench/bench_attention.py --device cpu [--T 64 128 256] [--D 64] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.utils.benchmark as benchmark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, format_env, summarize  # noqa: E402

from fastgpt.ops import causal_attention  # noqa: E402

PROVIDERS = ("loop", "tril", "torch", "sdpa", "compile", "triton")
MODES = ("fwd", "bwd", "fwd+bwd")


def time_ms(fn, device: str, min_run_time: float = 0.5) -> dict:
    """Median and p20/p80 of ``fn()`` in milliseconds (warm-up included, device synchronised)."""
    if device.startswith("cuda"):
        import triton.testing
        p20, med, p80 = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8])
        return {"median": med, "p20": p20, "p80": p80}
    fn()  # warm-up (and compilation for `compile`)
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(
        min_run_time=min_run_time)
    # blocked_autorange gives per-run means of blocks; summarise those
    return {k: v * 1e3 for k, v in summarize(list(m.times)).items()}


def causal_flops(B, H, T, D, mode: str) -> float:
    fwd = 2.0 * B * H * T * T * D      # 4*B*H*T*T*D halved by the causal mask
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def make_case(provider, B, H, T, D, dtype, device, mode):
    """The callable to time for one provider and mode."""
    x = torch.randn(B, T, 3, H, D, dtype=dtype, device=device)
    q, k, v = (t.transpose(1, 2).requires_grad_(mode != "fwd") for t in x.unbind(2))
    grad = torch.randn(B, H, T, D, dtype=dtype, device=device)

    def forward():
        return causal_attention(q, k, v, backend=provider)

    if mode == "fwd":
        return forward
    if mode == "fwd+bwd":
        return lambda: forward().backward(grad)
    out = forward()
    return lambda: out.backward(grad, retain_graph=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--H", type=int, default=6)
    p.add_argument("--T", type=int, nargs="+", default=None)
    p.add_argument("--D", type=int, nargs="+", default=[64, 128])
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds per CPU measurement")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    # bwd mode re-runs one graph's backward (retain_graph), which compiled graphs allow only
    # without buffer donation
    torch._functorch.config.donated_buffer = False
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    Ts = args.T or ([64, 256, 1024, 4096] if cuda else [64, 128, 256])
    providers = [pr for pr in args.providers if cuda or pr != "triton"]

    env = format_env(environment(args.device))
    print(f"# causal attention, B={args.B} H={args.H} {dtype}; {env}")
    print(f"{'mode':<8} {'T':>5} {'D':>4} {'provider':<8} {'median ms':>10} {'p20-p80 ms':>17} "
          f"{'TFLOP/s':>8} {'peak MB':>8} {'vs tril':>8}")
    for mode in args.modes:
        for D in args.D:
            for T in Ts:
                rows = {}
                for provider in providers:
                    if provider == "loop" and T > 256:
                        continue  # Python loops over B*T rows: minutes per point
                    fn = make_case(provider, args.B, args.H, T, D, dtype, args.device, mode)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    t = time_ms(fn, args.device, args.min_run_time)
                    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
                    rows[provider] = (t, peak)
                base = rows.get("tril", (None,))[0]
                for provider, (t, peak) in rows.items():
                    tflops = causal_flops(args.B, args.H, T, D, mode) / (t["median"] * 1e-3) / 1e12
                    speedup = f"{base['median'] / t['median']:.2f}x" if base else "-"
                    spread = f"{t['p20']:.3f}-{t['p80']:.3f}"
                    mem = f"{peak:.1f}" if peak is not None else "-"
                    print(f"{mode:<8} {T:>5} {D:>4} {provider:<8} {t['median']:>10.3f} "
                          f"{spread:>17} {tflops:>8.3f} {mem:>8} {speedup:>8}",
                          flush=True)


if __name__ == "__main__":
    main()

"""Embedding lookup: fastgpt's ``ext`` kernels (fastgpt._C) against PyTorch's.

For each vocabulary size V, token count N and width C it times
  fwd:  the lookup (weight requires grad, as in training);
  bwd:  the weight-gradient op alone (aten::embedding_backward vs fastgpt::embedding_backward,
        deterministic);
  both: lookup + backward through autograd,
and prints medians with their interquartile range (CPU: torch and ext timed in alternating
rounds, so load from other processes falls on both alike), GB/s moved and ext's speedup over torch.
Bytes moved: fwd reads N rows and writes N rows (+ indices); bwd reads N gradient rows
(+ indices) and writes the (V, C) gradient; both is their sum.

    python bench/bench_embedding.py [--dtype float32] [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

from fastgpt.ops import embedding_ext

VOCABS = (65, 50304)
TOKENS = (768, 65536)
WIDTHS = (128, 768)


def environment(device: torch.device) -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {cpu}"
    return (f"device: {dev} | threads: {torch.get_num_threads()} | torch {torch.__version__} | "
            f"python {sys.version.split()[0]} | git {sha}")


def measure(fns: dict, device: torch.device, min_run_time: float) -> dict:
    """{name: (median seconds, interquartile range seconds)} for each ``fns[name]()``.

    On CPU the providers are timed in alternating rounds (torch.utils.benchmark, one timeit per
    round), so load from other processes falls on both alike; median and IQR over the rounds.
    """
    if device.type == "cuda":
        import triton.testing
        out = {}
        for name, fn in fns.items():
            lo, med, hi = triton.testing.do_bench(fn, quantiles=[0.25, 0.5, 0.75])
            out[name] = (med * 1e-3, (hi - lo) * 1e-3)
        return out
    timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": fn}) for name, fn in fns.items()}
    # calls per round: about 20 ms of the slowest provider, after one warm-up call each
    per_call = max(t.timeit(1).mean for t in timers.values())
    number = max(1, int(0.02 / per_call))
    rounds = max(5, int(min_run_time / (number * per_call)))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, t in timers.items():
            times[name].append(t.timeit(number).mean)
    out = {}
    for name, ts in times.items():
        q = torch.tensor(ts, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75],
                                                                        dtype=torch.float64))
        out[name] = (q[1].item(), (q[2] - q[0]).item())
    return out


def case_fns(V, N, C, dtype, device):
    weight = torch.randn(V, C, device=device).to(dtype).requires_grad_(True)
    idx = torch.randint(0, V, (N,), device=device)
    grad = torch.randn(N, C, device=device).to(dtype)
    lookups = {"torch": lambda: F.embedding(idx, weight),
               "ext": lambda: embedding_ext.embedding_ext(idx, weight)}
    grads = {"torch": lambda: torch.ops.aten.embedding_backward(grad, idx, V, -1, False, False),
             "ext": lambda: torch.ops.fastgpt.embedding_backward(grad, idx, V, -1, True)}

    def both(lookup):
        def run():
            weight.grad = None
            lookup().backward(grad)
        return run

    es = weight.element_size()
    fwd_bytes = 2 * N * C * es + N * idx.element_size()
    bwd_bytes = N * C * es + N * idx.element_size() + V * C * es
    return {"fwd": (lookups, fwd_bytes),
            "bwd": (grads, bwd_bytes),
            "both": ({k: both(f) for k, f in lookups.items()}, fwd_bytes + bwd_bytes)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--min-run-time", type=float, default=1.0,
                   help="seconds per provider and CPU measurement")
    p.add_argument("--quick", action="store_true", help="the smallest token count only")
    args = p.parse_args()
    reason = embedding_ext.available()
    if reason is not None:
        sys.exit(f"bench_embedding: {reason}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    print(environment(device))
    print(f"dtype {args.dtype}; times are medians (IQR in brackets); speedup = torch / ext\n")
    print("| V | tokens | C | pass | torch ms | ext ms | torch GB/s | ext GB/s | speedup |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for V in VOCABS:
        for N in TOKENS[:1] if args.quick else TOKENS:
            for C in WIDTHS:
                for mode, (fns, nbytes) in case_fns(V, N, C, dtype, device).items():
                    t = measure(fns, device, args.min_run_time)
                    (tt, ti), (et, ei) = t["torch"], t["ext"]
                    print(f"| {V} | {N} | {C} | {mode} | {tt * 1e3:.3f} [{ti * 1e3:.3f}] | "
                          f"{et * 1e3:.3f} [{ei * 1e3:.3f}] | {nbytes / tt / 1e9:.1f} | "
                          f"{nbytes / et / 1e9:.1f} | {tt / et:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

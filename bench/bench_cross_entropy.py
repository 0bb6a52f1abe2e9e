"""Linear + cross-entropy (the LM head's loss), forward + backward: time and peak memory.

Cases (N tokens, C width, V vocabulary):
  baby              N=768    C=128  V=65      (the `baby` preset: batch 12 x block 64)
  shakespeare-char  N=16384  C=384  V=65      (batch 64 x block 256)
  gpt2-small        N=8192   C=768  V=50304   (batch 8 x block 1024)
Providers: fastgpt's linear_cross_entropy backends ``torch`` (naive: full logits), ``chunked``,
``compile``, ``triton`` (CUDA only) and PyTorch's own ``torch.nn.functional.linear_cross_entropy``
(``F.linear_cross_entropy``) where the installed torch has it. One step is: loss = provider(hidden,
weight, targets); loss.backward(); gradients dropped (as zero_grad(set_to_none=True) does).

How it measures. Each (case, provider) runs in a fresh subprocess, so nothing one provider
allocated or cached is seen by another. The worker makes the inputs, runs warm-up steps (which
also absorb torch.compile's compile time and memory), drops gradients, then:
  * CPU memory: resets the kernel's peak-RSS counter (writes 5 to /proc/self/clear_refs), records
    the resident set (VmRSS) as the baseline, runs the timed steps and reports VmHWM - baseline,
    i.e. the peak resident memory the steps added on top of the inputs. Where clear_refs is not
    writable it falls back to ru_maxrss (peak of the whole process) minus the RSS before the
    first step, and says so.
  * CUDA memory: torch.cuda.max_memory_allocated() - memory_allocated() before the timed steps.
  * Time: CPU: wall time of each step (time.perf_counter), median, p20-p80 and min over the
    steps (on a shared machine the min is the least disturbed figure); CUDA:
    triton.testing.do_bench.
Ratios are against the naive ``torch`` provider measured in the same run.

    python bench/bench_cross_entropy.py [--cases baby gpt2-small] [--providers torch chunked]
                                        [--dtype float32] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, format_env, summarize  # noqa: E402

CASES = {"baby": (768, 128, 65), "shakespeare-char": (16384, 384, 65),
         "gpt2-small": (8192, 768, 50304)}
PROVIDERS = ("torch", "chunked", "compile", "triton", "F.linear_cross_entropy")
# timed steps per case on CPU (a GPT-2-small step takes tens of seconds on two cores)
CPU_REPS = {"baby": 200, "shakespeare-char": 20, "gpt2-small": 3}
WARMUP = {"baby": 20, "shakespeare-char": 3, "gpt2-small": 1}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def provider_fn(name: str):
    if name == "F.linear_cross_entropy":
        return lambda h, w, t: F.linear_cross_entropy(h, w, t)
    import fastgpt.ops as ops
    return lambda h, w, t: ops.linear_cross_entropy(h, w, t, backend=name)


def worker(case: str, provider: str, dtype: torch.dtype, device: str) -> dict:
    N, C, V = CASES[case]
    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    rss_before_inputs = None if cuda else _status_kb("VmRSS")
    hidden = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, C, device=device) * 0.02).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device)
    fn = provider_fn(provider)

    def step():
        fn(hidden, weight, targets).backward()
        hidden.grad = weight.grad = None

    rss_first = None if cuda else _status_kb("VmRSS")
    for _ in range(WARMUP[case]):
        step()
    if cuda:
        import triton.testing
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ms = triton.testing.do_bench(step, return_mode="all")
        times = [m / 1e3 for m in ms]
        peak = torch.cuda.max_memory_allocated() - base
        how = "cuda max_memory_allocated"
    else:
        exact = _reset_peak_rss()
        base = _status_kb("VmRSS") if exact else rss_first
        times = []
        for _ in range(CPU_REPS[case]):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        if exact:
            peak, how = (_status_kb("VmHWM") - base) * 1024, "VmHWM after clear_refs"
        else:   # ru_maxrss is in kB on Linux; it includes warm-up and compile
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
            how = "ru_maxrss (includes warm-up)"
    inputs = (hidden.numel() + weight.numel()) * hidden.element_size()
    return dict(case=case, provider=provider, N=N, C=C, V=V, dtype=str(dtype).split(".")[-1],
                reps=len(times), **summarize(times), min=min(times), peak_bytes=peak, memory=how,
                input_bytes=inputs, logits_bytes=N * V * hidden.element_size(),
                rss_inputs_kb=None if cuda else rss_first - rss_before_inputs)


def available(provider: str, device: str) -> str | None:
    if provider == "triton" and not device.startswith("cuda"):
        return "needs CUDA (the interpreter is a correctness tool, not a benchmark)"
    if provider == "F.linear_cross_entropy" and not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy"
    return None


def run_case(case, provider, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", case, provider, "--dtype", args.dtype,
           "--device", args.device]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return dict(case=case, provider=provider, error=p.stderr.strip().splitlines()[-1:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--worker", nargs=2, metavar=("CASE", "PROVIDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, getattr(torch, args.dtype), args.device)))
        return
    print(f"# {format_env(environment(args.device))}, dtype={args.dtype}")
    for case in args.cases:
        N, C, V = CASES[case]
        rows, naive = [], None
        for provider in args.providers:
            reason = available(provider, args.device)
            r = dict(case=case, provider=provider, skipped=reason) if reason else \
                run_case(case, provider, args)
            if args.json:
                print(json.dumps(r), flush=True)
            rows.append(r)
            if provider == "torch" and "median" in r:
                naive = r
        if args.json:
            continue
        print(f"\n{case}: N={N} C={C} V={V}")
        print(f"  {'provider':<24}{'median ms':>11}{'p20-p80 ms':>18}{'min ms':>10}{'peak MB':>10}"
              f"{'time/torch':>12}{'mem/torch':>11}")
        for r in rows:
            if "median" not in r:
                print(f"  {r['provider']:<24}  {r.get('skipped') or r.get('error')}")
                continue
            t_ratio = f"{r['median'] / naive['median']:.2f}x" if naive else "-"
            m_ratio = f"{r['peak_bytes'] / naive['peak_bytes']:.3f}" if naive and \
                naive["peak_bytes"] > 0 else "-"
            print(f"  {r['provider']:<24}{r['median'] * 1e3:>11.2f}"
                  f"{r['p20'] * 1e3:>9.2f}-{r['p80'] * 1e3:<8.2f}{r['min'] * 1e3:>10.2f}"
                  f"{r['peak_bytes'] / 2**20:>10.1f}"
                  f"{t_ratio:>12}{m_ratio:>11}")
        if rows and "memory" in next((r for r in rows if "memory" in r), {}):
            print(f"  memory: {next(r for r in rows if 'memory' in r)['memory']}, "
                  f"peak minus the resident set before the timed steps")


if __name__ == "__main__":
    main()

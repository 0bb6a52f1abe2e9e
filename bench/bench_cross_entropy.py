"""Linear + cross-entropy (the LM head's loss), forward + backward: time and peak memory.

A thin front end of the shared harness (fastgpt/tools/bench/harness.py; cases in
fastgpt/tools/bench/suites.py)
that keeps this script's named cases (N tokens, C width, V vocabulary):
  baby              N=768    C=128  V=65      (the `baby` preset: batch 12 x block 64)
  shakespeare-char  N=16384  C=384  V=65      (batch 64 x block 256)
  gpt2-small        N=8192   C=768  V=50304   (batch 8 x block 1024)
Providers: fastgpt's linear_cross_entropy backends ``torch`` (naive: full logits), ``chunked``,
``compile``, ``triton`` (CUDA only) and PyTorch's own ``F.linear_cross_entropy`` where the
installed torch has it. One step is: loss = provider(hidden, weight, targets); loss.backward();
gradients dropped (as zero_grad(set_to_none=True) does).

On CPU each (case, provider) runs in a fresh subprocess. Time: CPU median and p20-p80 over
rounds after warm-up; CUDA triton.testing.do_bench. Peak memory: what one step allocates above
the inputs at its peak (CUDA max_memory_allocated; CPU the profiler's allocation events). Ratios
are against the naive ``torch`` provider measured in the same run. Rows print as they are
measured (a progress bar on stderr when it is a terminal); a case whose estimated memory exceeds
what is free is skipped, and its row says so. `fastgpt bench cross-entropy --N ... --C ... --V
...` sweeps sizes instead of named cases.

    python bench/bench_cross_entropy.py [--cases baby gpt2-small] [--providers torch chunked]
                                        [--dtype float32] [--device cpu] [--csv F]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fastgpt.tools.bench.harness import Case, TableStream, run_cases, write_csv
from fastgpt.tools.bench.suites import build, memory
from fastgpt.tools.environment import environment, format_env

CASES = {"baby": (768, 128, 65), "shakespeare-char": (16384, 384, 65),
         "gpt2-small": (8192, 768, 50304)}
PROVIDERS = ("torch", "chunked", "compile", "triton", "F.linear_cross_entropy")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--providers", nargs="+", default=None, choices=PROVIDERS)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--min-run-time", type=float, default=0.5, help="CPU: seconds per provider")
    p.add_argument("--csv", default=None, metavar="FILE", help="append rows (with environment)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (it shows on stderr only when that is a terminal)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    providers = args.providers or [pr for pr in PROVIDERS if (cuda or pr != "triton") and
                                   (pr != "F.linear_cross_entropy" or
                                    hasattr(F, "linear_cross_entropy"))]
    cases = [Case("cross-entropy", "linear_cross_entropy", pr, "fwd+bwd",
                  dict(N=N, C=C, V=V), args.dtype)
             for N, C, V in (CASES[c] for c in args.cases) for pr in providers]
    env = environment(args.device)
    print(f"# {format_env(env)}")
    with TableStream(cases, "torch", args.device, desc="cross-entropy",
                     bar=None if args.progress else False) as stream:
        rows = run_cases(cases, args.device, "torch", build, args.min_run_time, isolate=not cuda,
                         progress=stream, need=memory)
    if args.csv:
        write_csv([r.record() for r in rows], args.csv, env)


if __name__ == "__main__":
    main()

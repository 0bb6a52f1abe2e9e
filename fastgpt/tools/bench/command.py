"""`fastgpt bench`: the command line over the op suites (fastgpt.tools.bench.suites) and the
training-step benchmark (fastgpt.tools.bench.train_steps), measured by the harness."""

from __future__ import annotations

import argparse

import torch

from fastgpt.device import resolve_device
from fastgpt.errors import FastGPTError
from fastgpt.precision import DTYPES
from fastgpt.tools.bench import train_steps
from fastgpt.tools.bench.harness import (Row, TableStream, allow_repeated_backward, plot,
                                         run_cases, write_csv)
from fastgpt.tools.bench.suites import SUITES, build, check_providers, memory
from fastgpt.tools.environment import environment, format_env


def _grid_note(name: str, args, n: int) -> str:
    """The header's "; --full: 108 cases" where the full grid has more cases than this list."""
    if args.full or args.device.startswith("cuda"):
        return ""
    full = len(SUITES[name].cases(argparse.Namespace(**dict(vars(args), quick=False, full=True))))
    return f"; --full: {full} cases" if full > n else ""


def run_suite(name: str, args) -> list[Row]:
    """Run one op suite with the CLI's arguments; prints its table row by row as it is measured
    (a progress bar on stderr when that is a terminal); returns the rows."""
    suite = SUITES[name]
    cases = suite.cases(args)
    isolate = suite.isolate_on_cpu and not args.device.startswith("cuda") and not args.in_process
    print(f"\n# {name}: {len(cases)} cases on {args.device}"
          + (", each in a fresh process" if isolate else "") + _grid_note(name, args, len(cases)),
          flush=True)
    with TableStream(cases, suite.baseline, args.device, desc=name,
                     bar=None if args.progress else False) as stream:
        rows = run_cases(cases, args.device, suite.baseline, build, args.min_run_time,
                         isolate=isolate, progress=stream, need=memory)
    if args.plot:
        for path in plot(rows, args.plot, *suite.plot):
            print(f"wrote {path}")
    return rows


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the ops' backends (or training steps)",
                       description="Time every backend of an op side by side and print median ms "
                       "(p20-p80), TFLOP/s or GB/s, peak memory and the speedup over the naive "
                       "backend measured in the same run. `train` times whole training steps.")
    # suites are spelled with dashes; the op names' underscores are accepted too
    p.add_argument("what", nargs="?", default="all", choices=list(SUITES) + ["train", "all"],
                   type=lambda name: name.replace("_", "-"))
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 "
                   "(default: bfloat16 on cuda, float32 on cpu; transformer-block: both)")
    p.add_argument("--providers", nargs="+", default=None, help="backend names, comma- or "
                   "space-separated (default: all that run on the device)")
    p.add_argument("--modes", nargs="+", default=None, help="fwd, bwd, fwd+bwd (comma- or "
                   "space-separated; default: all, fwd+bwd for cross-entropy)")
    p.add_argument("--T", type=int, nargs="+", default=None,
                   help="attention / transformer-block sequence lengths")
    p.add_argument("--D", type=int, nargs="+", default=None, help="attention head dims")
    p.add_argument("--B", type=int, default=None, help="attention / transformer-block batch")
    p.add_argument("--H", type=int, default=None, help="attention / transformer-block heads")
    p.add_argument("--N", type=int, nargs="+", default=None,
                   help="cross-entropy rows / embedding tokens")
    p.add_argument("--C", type=int, nargs="+", default=None,
                   help="hidden / embedding / transformer-block width")
    p.add_argument("--V", type=int, nargs="+", default=None, help="vocabulary sizes")
    p.add_argument("--dropout", type=float, default=None,
                   help="transformer-block dropout probability (default: none)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the smallest sizes only")
    size.add_argument("--full", action="store_true", help="CPU: the full grid (the default is "
                      "sized to finish in a few minutes on a small CPU; on CUDA it is the full "
                      "grid already)")
    p.add_argument("--min-run-time", type=float, default=0.5,
                   help="CPU: seconds of timing per provider and shape")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--in-process", action="store_true",
                   help="CPU cross-entropy: do not start a fresh process per case")
    p.add_argument("--csv", default=None, metavar="FILE", help="append rows (with environment)")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG charts to DIR")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (it shows on stderr only when that is a terminal)")
    train_steps.add_train_args(p)
    p.set_defaults(run=run_bench)


def run_bench(args) -> int:
    args.device = str(resolve_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype is not None and args.dtype not in DTYPES:
        raise FastGPTError(f"--dtype {args.dtype!r} is not a dtype; dtypes: {', '.join(DTYPES)}")
    for name in ("providers", "modes"):   # "a,b c" -> "a,b,c"
        if getattr(args, name):
            setattr(args, name, ",".join(getattr(args, name)))
    names = list(SUITES) if args.what == "all" else [] if args.what == "train" else [args.what]
    if args.providers and names:
        check_providers([p.strip() for p in args.providers.split(",") if p.strip()], names)
    allow_repeated_backward()
    env = environment(args.device)
    print(f"# fastgpt bench {args.what}; {format_env(env)}", flush=True)
    rows: list[Row] = []
    for name in names:
        rows += run_suite(name, args)
    if args.csv and rows:
        write_csv([r.record() for r in rows], args.csv, env)
        print(f"appended {len(rows)} rows to {args.csv}")
    if args.what in ("train", "all"):
        train_steps.run_train_bench(args, env)
    return 0

"""fastgpt's default `baby` run against nanoGPT's documented CPU run, back to back on one machine.

Alternates the two whole runs (2000 iterations, evals included, process start to exit) for
``--rounds`` rounds and reports the median wall time and the val loss each reached at the last
iteration, every round's ratio (nanoGPT's wall time over fastgpt's) and the median of those.
``--preset shakespeare-char`` compares time per iteration instead, at nanoGPT's GPU char config
(6 x 384, block 256, batch 64, dropout 0.2) run on the CPU: each round runs both for ``--iters``
iterations (evaluation on one batch, at iteration 0 only) and takes the median milliseconds of
the iterations after the first two, read from each one's own per-iteration log.
nanoGPT is not part of fastgpt: point ``--nanogpt`` at a checkout whose
data/shakespeare_char/prepare.py has been run, and ``--nanogpt-python`` at a Python with torch.
(bench/test_bench_scripts.py runs this script against a stand-in for nanoGPT's train.py.)

    python bench/vs_nanogpt.py --nanogpt ../nanoGPT --nanogpt-python ../nanogpt-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from fastgpt.tools.environment import environment, format_env

ITERS = 2000


def nanogpt_args(iters: int = ITERS) -> list[str]:
    """The command issue 7 quotes for nanoGPT's CPU run (2000 iterations)."""
    return ["train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
            "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12",
            "--n_layer=4", "--n_head=4", "--n_embd=128", f"--max_iters={iters}",
            f"--lr_decay_iters={iters}", "--dropout=0.0"]


def char_nanogpt_args(iters: int) -> list[str]:
    """nanoGPT's shakespeare_char config on the CPU, evaluated on 1 batch at iteration 0 only."""
    return ["train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
            f"--max_iters={iters}", "--eval_iters=1", f"--eval_interval={iters + 1}",
            "--log_interval=1"]


SKIP = 2   # iterations left out of the per-iteration median (the first, with its evaluation)


def ms_per_iter_nanogpt(path: str, python: str, out_dir: str, iters: int) -> float:
    _, log = timed([python, *char_nanogpt_args(iters), f"--out_dir={out_dir}"], cwd=path)
    ms = [float(t) for i, t in re.findall(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", log, re.M)
          if int(i) >= SKIP]
    return statistics.median(ms)


def ms_per_iter_fastgpt(out_dir: str, extra: list[str], iters: int) -> float:
    timed([sys.executable, "-m", "fastgpt", "train", "--preset", "shakespeare-char", "--overwrite",
           "--out-dir", out_dir, "--no-progress", "--max-iters", str(iters), "--eval-iters", "1",
           "--eval-interval", str(iters + 1), "--log-interval", "1", "--sample-chars", "0",
           *extra], cwd=os.getcwd())
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    per_iter = next(r["tokens_per_iter"] for r in rows if r["kind"] == "run")
    return statistics.median(per_iter / r["tokens_per_s"] * 1e3 for r in rows
                             if r["kind"] == "train" and r["iter"] >= SKIP)


def timed(cmd: list[str], cwd: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return wall, done.stdout + done.stderr


def nanogpt_run(path: str, python: str, out_dir: str, iters: int) -> tuple[float, float]:
    wall, log = timed([python, *nanogpt_args(iters), f"--out_dir={out_dir}"], cwd=path)
    val = re.findall(rf"step {iters}: train loss [\d.]+, val loss ([\d.]+)", log)
    return wall, float(val[-1])


def fastgpt_run(out_dir: str, extra: list[str], iters: int) -> tuple[float, float]:
    wall, log = timed([sys.executable, "-m", "fastgpt", "train", "--overwrite", "--out-dir",
                       out_dir, "--no-progress", "--max-iters", str(iters), *extra],
                      cwd=os.getcwd())
    val = re.findall(rf"iter {iters}: train loss [\d.]+, val loss ([\d.]+)", log)
    return wall, float(val[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanogpt", required=True, help="path of a nanoGPT checkout")
    p.add_argument("--nanogpt-python", default=sys.executable)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--preset", choices=["baby", "shakespeare-char"], default="baby",
                   help="baby: whole runs; shakespeare-char: time per iteration")
    p.add_argument("--iters", type=int, default=None,
                   help=f"iterations per run (default {ITERS} for baby, 10 for shakespeare-char)")
    p.add_argument("--fastgpt-args", default="", help="extra `fastgpt train` flags")
    args = p.parse_args(argv)
    if args.preset == "shakespeare-char":
        return per_iteration(args, args.iters or 10)
    args.iters = args.iters or ITERS
    runs = {"nanoGPT": [], "fastgpt": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            runs["nanoGPT"].append(nanogpt_run(args.nanogpt, args.nanogpt_python,
                                               os.path.join(tmp, "nano"), args.iters))
            runs["fastgpt"].append(fastgpt_run(os.path.join(tmp, "fast"),
                                               args.fastgpt_args.split(), args.iters))
            print(f"round {r}: nanoGPT {runs['nanoGPT'][-1]}, fastgpt {runs['fastgpt'][-1]}",
                  flush=True)
    print(f"# {format_env(environment('cpu'))}")
    print(f"{'':<8} {'median wall s':>14} {'all wall s':>24} {f'val loss @{args.iters}':>28}")
    for name, rs in runs.items():
        walls, vals = [w for w, _ in rs], [v for _, v in rs]
        print(f"{name:<8} {statistics.median(walls):14.1f} {' '.join(f'{w:.1f}' for w in walls):>24} "
              f"{' '.join(f'{v:.4f}' for v in vals):>28}")
    # each round's two runs shared the machine's state: their ratio is the honest unit (a
    # ratio of medians can pair a slowed nanoGPT round with a quiet fastgpt one)
    ratios = [n / f for (n, _), (f, _) in zip(runs["nanoGPT"], runs["fastgpt"])]
    print("per round: " + ", ".join(f"{r:.2f}x" for r in ratios))
    print(f"fastgpt is {statistics.median(ratios):.2f}x faster than nanoGPT (median of the "
          f"per-round ratios of whole-run wall times; lowest {min(ratios):.2f}x)")


def per_iteration(args, iters: int) -> None:
    if iters <= SKIP:
        raise SystemExit(f"--iters must be > {SKIP} for shakespeare-char (the first {SKIP} are "
                         f"left out); got {iters}")
    ms = {"nanoGPT": [], "fastgpt": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            ms["nanoGPT"].append(ms_per_iter_nanogpt(args.nanogpt, args.nanogpt_python,
                                                     os.path.join(tmp, "nano"), iters))
            ms["fastgpt"].append(ms_per_iter_fastgpt(os.path.join(tmp, "fast"),
                                                     args.fastgpt_args.split(), iters))
            print(f"round {r}: nanoGPT {ms['nanoGPT'][-1]:.1f} ms/iter, fastgpt "
                  f"{ms['fastgpt'][-1]:.1f} ms/iter", flush=True)
    print(f"# {format_env(environment('cpu'))}")
    print(f"# shakespeare-char, {iters} iterations per run, median ms per iteration after the "
          f"first {SKIP}")
    for name, values in ms.items():
        print(f"{name:<8} {statistics.median(values):10.1f} ms/iter   "
              f"rounds: {' '.join(f'{v:.1f}' for v in values)}")
    ratios = [n / f for n, f in zip(ms["nanoGPT"], ms["fastgpt"])]
    print("per round: " + ", ".join(f"{r:.2f}x" for r in ratios))
    print(f"fastgpt is {statistics.median(ratios):.2f}x faster than nanoGPT per iteration "
          f"(median of the per-round ratios; lowest {min(ratios):.2f}x)")


if __name__ == "__main__":
    main()

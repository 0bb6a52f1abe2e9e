"""Training-step speed of a preset per configuration (attention backend, dtype, compile).

Each configuration runs the real training loop (`fastgpt.train.train`) for a short run and the
per-log-interval throughput rows of its metrics.jsonl give ms/iter and tokens/s; the first
intervals are warm-up and dropped. Configurations run interleaved over several rounds so that a
noisy neighbour hurts them alike. Not a test: run it by hand.

    python bench/bench_train.py --preset baby --iters 100 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, format_env, summarize  # noqa: E402

from fastgpt.train import RunOptions, train  # noqa: E402

CONFIGS = {
    "sdpa fp32": dict(attention="sdpa", dtype="float32"),
    "tril fp32": dict(attention="tril", dtype="float32"),
    "sdpa bf16": dict(attention="sdpa", dtype="bfloat16"),
}


def run_once(preset: str, iters: int, attention: str, dtype: str, compile: bool, device: str):
    with tempfile.TemporaryDirectory() as out:
        opts = RunOptions(preset=preset, out_dir=out, device=device, dtype=dtype, compile=compile,
                          progress=False, sample_chars=0,
                          overrides=dict(max_iters=iters, eval_interval=10 ** 9, eval_iters=1,
                                         log_interval=10, attention=attention))
        train(opts)
        rows = [json.loads(l) for l in Path(out, "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in rows if r["kind"] == "train"][2:]   # drop warm-up


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="baby")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    from fastgpt.config import preset as get_preset
    m, t = get_preset(args.preset)
    tokens_per_iter = t.batch_size * m.block_size * t.gradient_accumulation_steps
    names = args.configs.split(",")
    samples = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            samples[n] += run_once(args.preset, args.iters, compile=args.compile,
                                   device=args.device, **CONFIGS[n])
    print(f"# bench_train preset={args.preset} iters={args.iters} rounds={args.rounds}")
    print(f"# {format_env(environment(args.device))}")
    base = summarize([1e3 * tokens_per_iter / s for s in samples[names[0]]])["median"]
    print(f"{'config':<14} {'ms/iter':>9} {'p20-p80':>15} {'tokens/s':>10} {'vs ' + names[0]:>12}")
    for n in names:
        ms = summarize([1e3 * tokens_per_iter / s for s in samples[n]])
        print(f"{n:<14} {ms['median']:9.2f} {ms['p20']:7.2f}-{ms['p80']:<7.2f} "
              f"{1e3 * tokens_per_iter / ms['median']:10.0f} {base / ms['median']:11.2f}x")


if __name__ == "__main__":
    main()

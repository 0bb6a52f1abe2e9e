"""Training-step speed of a preset per configuration (attention backend, dtype, compile).

A thin front end of `fastgpt bench train` (fastgpt/tools/bench/train_steps.py): each
configuration runs the real training loop for a short run, and the per-log-interval throughput
rows of its metrics.jsonl give ms/iter and tokens/s (first intervals dropped as warm-up); configurations run
interleaved over several rounds. Not a test: run it by hand.

    python bench/bench_train.py --preset baby --iters 100 --rounds 3
    python bench/bench_train.py --configs "sdpa fp32,tril fp32"
"""

import sys

from fastgpt.tools.bench.train_steps import CONFIGS
from fastgpt.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    for i, a in enumerate(argv[:-1]):
        # this script took comma-separated config names; `fastgpt bench train` takes ';'
        if a == "--configs" and all(n.strip() in CONFIGS for n in argv[i + 1].split(",")):
            argv[i + 1] = argv[i + 1].replace(",", ";")
    sys.exit(main(["bench", "train", *argv]))

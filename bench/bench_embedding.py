"""Embedding lookup: fastgpt's ``ext`` kernels (fastgpt._C) against PyTorch's.

A thin front end of the shared harness (fastgpt/tools/bench/harness.py; cases in
fastgpt/tools/bench/suites.py):
the same as `fastgpt bench embedding --min-run-time 1 ...`. For each vocabulary size V, token
count N and width C it times
  fwd:      the lookup (weight requires grad, as in training);
  bwd:      the weight-gradient op alone (aten::embedding_backward vs
            fastgpt::embedding_backward, deterministic);
  fwd+bwd:  lookup + backward through autograd,
and prints medians with their p20-p80 spread (CPU: providers timed in alternating rounds, so
load from other processes falls on both alike), GB/s moved and the speedup over torch, each row
as soon as it is measured.
Bytes moved: fwd reads N rows and writes N rows (+ indices); bwd reads N gradient rows
(+ indices) and writes the (V, C) gradient; fwd+bwd is their sum.

    python bench/bench_embedding.py [--dtype float32] [--device cpu] [--quick] [--csv F]
"""

import sys

from fastgpt.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a.startswith("--min-run-time") for a in argv):
        argv += ["--min-run-time", "1.0"]     # this script's default: a second per provider
    sys.exit(main(["bench", "embedding", *argv]))

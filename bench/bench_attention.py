"""Causal attention: every backend of fastgpt.ops.causal_attention, timed side by side.

A thin front end of the shared harness (fastgpt/tools/bench/harness.py; cases in
fastgpt/tools/bench/suites.py):
the same as `fastgpt bench attention ...`. Providers: loop, tril, torch, sdpa, compile, ext
(CPU: the C++ fused kernel), and triton (CUDA only: on CPU it would be the Triton interpreter,
a correctness tool, not a fast path). Modes: fwd, bwd (backward alone, from a kept graph), fwd+bwd. Reports median ms with the
p20-p80 spread, TFLOP/s (causal FLOPs: 2*B*H*T*T*D forward, 2.5x that backward), peak memory
and the speedup over tril, each row as soon as it is measured (a progress bar on stderr when
that is a terminal). The CPU default (T 64, 128, 256; D 64) finishes in a few minutes on 2
cores; --full adds D=128 and runs ``loop`` up to B*T = 1024 rows (256 by default); a case
whose estimated memory exceeds what is free is skipped, and its row says so.

    python bench/bench_attention.py --device cpu [--quick | --full] [--T 64 128 256] [--D 64]
                                    [--dtype float32] [--providers tril sdpa] [--modes fwd]
                                    [--csv F] [--plot DIR]
"""

import sys

from fastgpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "attention", *sys.argv[1:]]))

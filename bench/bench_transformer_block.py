"""One GPT block (fastgpt.ops.transformer_block): the ``torch`` and ``ext`` backends side by side.

A thin front end of the shared harness (fastgpt/tools/bench/harness.py; cases in
fastgpt/tools/bench/suites.py):
the same as `fastgpt bench transformer-block ...`. Providers: ``torch`` (the block written with
torch.nn.functional, attention by its automatic choice) and ``ext`` (fastgpt._C's C++ forward and
backward; CPU only). Shapes (B, T, C, H heads): the baby preset's block (12, 64, 128, 4) and
(8, 256, 384, 6), no biases, in float32 and bfloat16 (a CPU without native bfloat16 emulates
it: there the default times bfloat16 at the baby block only, --full at both). Modes: fwd, bwd
(backward alone, from a kept graph), fwd+bwd. Reports median ms with the p20-p80 spread,
TFLOP/s (matmul FLOPs: forward 2*B*T*12*C*C for the linears + 2*B*H*T*T*D for causal
attention; backward 2x and 2.5x), peak memory and the speedup over ``torch``, each row as soon
as it is measured.

    python bench/bench_transformer_block.py --device cpu [--full] [--B 12] [--T 64 256] [--C 128]
                                            [--H 4] [--dtype bfloat16] [--modes fwd+bwd] [--csv F]
    pytest bench/bench_transformer_block.py --benchmark-only [--bench-full]   (pytest-benchmark)
"""

import sys

from fastgpt.cli import main

SUITE = "transformer-block"


# pytest-benchmark: the suite's cases (quick sizes unless --bench-full), timed as test_bench_ops
# does; pytest puts bench/ on sys.path, so its helpers import without a package
def pytest_generate_tests(metafunc):
    from test_bench_ops import parametrize_cases
    parametrize_cases(metafunc, suites=[SUITE])


def test_transformer_block(benchmark, case, bench_device):
    from test_bench_ops import run_case
    run_case(benchmark, case, bench_device)


if __name__ == "__main__":
    sys.exit(main(["bench", SUITE, *sys.argv[1:]]))

"""The Triton cross-entropy kernels compile for sm_80 and sm_90 without spilling (no GPU needed).

Compiles run through `fastgpt compile-report`'s workers: subprocesses without TRITON_INTERPRET
(tests/conftest.py sets it here), one per architecture, in parallel. fp16 shares bf16's code
shape, so the test compiles fp32 and bf16; `fastgpt compile-report` compiles every config.
"""

import pytest

from fastgpt.tools.aot import ARCH_LIMITS
from fastgpt.tools.compile_report import compile_all
from fastgpt.kernels import cross_entropy as ce

DTYPES = ("fp32", "bf16")


@pytest.fixture(scope="module")
def compiled():
    """Both architectures compile in parallel, one worker process each (fastgpt compile-report's)."""
    rows = compile_all([80, 90], ["fastgpt.kernels.cross_entropy"], list(DTYPES))
    return {arch: [r for r in rows if r["arch"] == arch] for arch in (80, 90)}


@pytest.mark.parametrize("arch", [80, 90])
def test_cross_entropy_kernels_compile_without_spills(compiled, arch):
    rows = compiled[arch]
    assert len(rows) == len(ce.aot_configs(dtypes=DTYPES))
    assert {r["kernel"] for r in rows} == {"cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel"}
    for r in rows:
        print(f"sm_{arch} {r['kernel']} {r['config']} regs={r['registers']} "
              f"spill={r['spill_bytes']} smem={r['shared_bytes']}")
    bad = [r for r in rows if r["problems"] or r["spill_bytes"]]
    assert not bad, "\n".join(f"{r['kernel']} {r['config']}: {r['problems']}" for r in bad)
    assert all(r["shared_bytes"] <= ARCH_LIMITS[arch]["smem_per_block"] for r in rows)


def test_block_choice():
    assert ce.block_v(65) == 128 and ce.block_v(50257) == 4096
    assert ce.num_warps_for(128) == 4 and ce.num_warps_for(4096) == 8

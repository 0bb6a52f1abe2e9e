"""Ahead-of-time compilation for real GPUs (fastgpt.tools.aot), no GPU needed.

The compile runs in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it for this
process, and interpreted kernels cannot be compiled).
"""

import pytest

from fastgpt.tools.aot import (ARCH_LIMITS, KernelResources, PtxasFunction, occupancy_warps_per_sm,
                               parse_ptxas_log, warps_by_registers)
from fastgpt.tools.compile_report import compile_all
from fastgpt.kernels import attention as attn

# Every shipped GPU config of the attention kernels (fp16 configs, which bf16 shares, and the
# fp32 ones) with and without dropout: whether ptxas spills is not monotone in register pressure,
# and the no-dropout variants have spilled where the dropout ones did not.
# `fastgpt compile-report --arch sm_80,sm_90` also compiles bf16.
DTYPES = ("fp16", "fp32")


@pytest.fixture(scope="module")
def compiled():
    """Both architectures compile in parallel, one worker process each (fastgpt compile-report's)."""
    rows = compile_all([80, 90], ["fastgpt.kernels.attention"], list(DTYPES))
    return {arch: [r for r in rows if r["arch"] == arch] for arch in (80, 90)}


@pytest.mark.parametrize("arch", [80, 90])
def test_every_shipped_attention_config_compiles_without_spills(compiled, arch):
    rows = compiled[arch]
    assert len(rows) == len(attn.aot_configs(dtypes=DTYPES))
    assert {r["config"]["DROPOUT"] for r in rows} == {True, False}
    for r in rows:
        print(f"sm_{arch} {r['kernel']} {r['config']} regs={r['registers']} "
              f"spill={r['spill_bytes']} smem={r['shared_bytes']} warps/SM={r['warps_per_sm']}")
    bad = [r for r in rows if r["problems"]]
    assert not bad, "\n".join(f"{r['kernel']} {r['config']}: {r['problems']}" for r in bad)
    assert all(r["shared_bytes"] <= ARCH_LIMITS[arch]["smem_per_block"] for r in rows)
    assert all(r["warps_per_sm"] > 0 for r in rows)


def test_config_lists_keep_the_diagonal_on_whole_blocks():
    for block_d, configs in attn.FWD_CONFIGS.items():
        for bm, bn, _, _ in configs:
            assert bm % bn == 0, (block_d, bm, bn)
    for block_d, configs in attn.BWD_CONFIGS.items():
        for bm, bn, _, _ in configs:
            assert bn % bm == 0, (block_d, bm, bn)     # dK/dV; dQ uses the swap
    assert set(attn.FWD_CONFIGS) == set(attn.BWD_CONFIGS) == {16, 32, 64, 128}
    bm, bn, _, _ = attn.INTERPRET_FWD
    assert bm % bn == 0
    bm, bn, _, _ = attn.INTERPRET_BWD
    assert bn % bm == 0


def test_parse_ptxas_log():
    # Triton's log for one kernel (sm_90 compiles as sm_90a), then a device function ptxas did not
    # inline: its properties follow the kernel's and its spills count as the config's
    log = ("ptxas info    : 0 bytes gmem\n"
           "ptxas info    : Compiling entry function 'attn_fwd' for 'sm_90a'\n"
           "ptxas info    : Function properties for attn_fwd\n"
           "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 1 barriers, 380 bytes cmem[0]\n"
           "ptxas info    : Compile time = 446.332 ms\n"
           "ptxas info    : Function properties for helper\n"
           "    0 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n")
    kernel, helper = parse_ptxas_log(log)
    assert kernel == PtxasFunction("attn_fwd", 90, True, 168, 4, 4, 8, 0)
    assert kernel.spill_bytes == 8
    assert helper == PtxasFunction("helper", 90, False, 0, 12, 16, 0, 0)
    assert parse_ptxas_log("nothing here") == []


def test_occupancy():
    res = KernelResources("k", 80, dict(num_warps=4), registers=128, shared_bytes=48 * 1024)
    # registers: 128*32 = 4096 per warp -> 16 warps' worth -> 4 blocks; smem: 164/48 -> 3 blocks
    assert occupancy_warps_per_sm(res, 80) == 12
    assert occupancy_warps_per_sm(res, 90) == 16       # 228/48 -> 4 blocks
    tiny = KernelResources("k", 90, dict(num_warps=8), registers=16, shared_bytes=0)
    assert occupancy_warps_per_sm(tiny, 90) == 64
    huge = KernelResources("k", 80, dict(num_warps=4), registers=64, shared_bytes=200 * 1024)
    assert occupancy_warps_per_sm(huge, 80) == 0
    # registers alone (the extension's kernels: block size unknown), capped at 64 warps
    assert [warps_by_registers(r, 80) for r in (1, 40, 128, 255)] == [64, 51, 16, 8]


def test_refuses_to_run_under_the_interpreter(monkeypatch):
    from fastgpt.tools.aot import compile_for_arch
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_for_arch(attn.attn_fwd, {}, {}, 80, 4, 3)

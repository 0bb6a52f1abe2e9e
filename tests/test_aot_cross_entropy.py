"""The Triton cross-entropy kernels compile for sm_80 and sm_90 without spilling (no GPU needed).

Compiles run in subprocesses without TRITON_INTERPRET (tests/conftest.py sets it here), one per
architecture, in parallel. fp16 shares bf16's code shape, so the test compiles fp32 and bf16;
`python -m fastgpt.aot fastgpt.kernels.cross_entropy` compiles every shipped config.
"""

import json
import os
import subprocess
import sys

import pytest

from fastgpt.aot import ARCH_LIMITS
from fastgpt.kernels import cross_entropy as ce

DTYPES = ("fp32", "bf16")
_SCRIPT = """
import json, sys
from fastgpt.aot import AOTConfig, check, compile_for_arch
from fastgpt.kernels.cross_entropy import aot_configs
arch = int(sys.argv[1])
for c in map(lambda c: AOTConfig(*c), aot_configs(dtypes=%r)):
    r = compile_for_arch(c.kernel, c.signature, c.constexprs, arch, c.num_warps, c.num_stages)
    print(json.dumps(dict(kernel=r.kernel, config={k: str(v) for k, v in r.config.items()},
                          registers=r.registers, spill_bytes=r.spill_bytes,
                          shared_bytes=r.shared_bytes, problems=check(r))), flush=True)
""" % (DTYPES,)


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {arch: subprocess.Popen([sys.executable, "-c", _SCRIPT, str(arch)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in (80, 90)}
    out = {}
    for arch, p in procs.items():
        stdout, stderr = p.communicate(timeout=900)
        assert p.returncode == 0, f"sm_{arch} AOT compile failed:\n{stderr[-4000:]}"
        out[arch] = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return out


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

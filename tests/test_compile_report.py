"""`fastgpt compile-report`: a config made to spill fails --strict; the ext ptxas log is read.

Compiles run in subprocesses without TRITON_INTERPRET (the command starts them itself). The
end-to-end test compiles a tiny kernel module written to tmp_path, not the shipped kernels
(tests/test_aot*.py compile those).
"""

import os
import subprocess
import sys
import textwrap

import pytest

from fastgpt.tools.compile_report import config_str, parse_archs, parse_ext_log
from fastgpt.errors import FastGPTError

KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl

    @triton.jit
    def scale_by_sum(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        # all BLOCK values stay live across the reduction: a huge BLOCK on one warp must spill
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(y_ptr + offs, x * tl.sum(x, axis=0) + tl.exp(x), mask=offs < n)

    SIG = {"x_ptr": "*fp32:16", "y_ptr": "*fp32:16", "n": "i32", "BLOCK": "constexpr"}

    # (BLOCK, num_warps): the first fits easily, the second keeps 512 values per thread live
    CONFIGS = [(256, 4), (16384, 1)]

    def aot_configs():
        return [(scale_by_sum, SIG, {"BLOCK": b}, w, 1) for b, w in CONFIGS]
''')


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernels")
    (d / "spilly_kernels.py").write_text(KERNELS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(d), env.get("PYTHONPATH", "")])
    js = d / "report.json"

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "fastgpt", "compile-report", "--modules",
                               "spilly_kernels", "--arch", "sm_80", "--json", str(js), *extra],
                              env=env, capture_output=True, text=True, timeout=600)
    return run("--strict"), js


def test_strict_fails_on_a_spilling_config(report):
    p, js = report
    assert p.returncode == 1, p.stdout + p.stderr
    rows = [line for line in p.stdout.splitlines() if line.split()[:2] == ["sm_80", "scale_by_sum"]]
    assert len(rows) == 2
    small, huge = sorted(rows, key=lambda line: "BLOCK=16384" in line)
    assert small.endswith("ok") and "BLOCK=256" in small
    assert "PROBLEM: spills" in huge
    assert "1 config(s) with problems" in p.stdout


def test_rows_are_well_formed(report):
    import json
    _, js = report
    rows = json.loads(js.read_text())
    assert {r["kernel"] for r in rows} == {"scale_by_sum"}
    for r in rows:
        assert r["arch"] == 80 and r["dtype"] == "fp32"
        assert 0 < r["registers"] <= 255 and r["shared_bytes"] >= 0
        assert 0 < r["warps_per_sm"] <= r["max_warps"] == 64
    assert [r["spill_bytes"] > 0 for r in sorted(rows, key=lambda r: r["config"]["BLOCK"])] == \
        [False, True]


def test_strict_passes_when_nothing_spills(tmp_path):
    (tmp_path / "fine_kernels.py").write_text(
        KERNELS.replace("[(256, 4), (16384, 1)]", "[(256, 4)]"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-m", "fastgpt", "compile-report", "--modules",
                        "fine_kernels", "--arch", "sm_90", "--strict"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "sm_90  scale_by_sum" in p.stdout and "# sm_90: 1 configs" in p.stdout


EXT_LOG = """\
ptxas info    : Compiling entry function '_ZN7fastgpt12_GLOBAL__N_113embedding_fwdEv' for 'sm_80'
ptxas info    : Function properties for _ZN7fastgpt12_GLOBAL__N_113embedding_fwdEv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 380 bytes cmem[0]
ptxas info    : Compiling entry function '_Z7bwd_kerv' for 'sm_90'
ptxas info    : Function properties for _Z7bwd_kerv
    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]
"""


def test_ext_log_rows():
    rows = parse_ext_log(EXT_LOG, [80, 90])
    assert [(r["arch"], r["registers"], r["spill_bytes"]) for r in rows] == \
        [(80, 40, 0), (90, 255, 16)]
    # 40 registers x 32 threads = 1280 per warp -> 65536 // 1280 = 51 warps; 255 -> 8192 -> 8
    assert [r["warps_per_sm"] for r in rows] == [51, 8]
    assert rows[1]["shared_bytes"] == 4096 and rows[1]["problems"] == ["spills 16 bytes"]
    assert not rows[0]["problems"]
    assert [r["arch"] for r in parse_ext_log(EXT_LOG, [90])] == [90]


def test_arch_and_config_formatting():
    assert parse_archs("sm_80,90") == [80, 90]
    with pytest.raises(FastGPTError, match="sm_75"):
        parse_archs("sm_75")
    assert config_str({"BLOCK_M": 64, "DROPOUT": True, "UPCAST": False, "num_warps": 4}) == \
        "bm=64 drop=1 w=4"

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

from fastgpt.tools.compile_report import EXT_LOG_ENV, config_str, parse_archs, parse_ext_log
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


def compile_report(folder, *args):
    """`fastgpt compile-report` run in ``folder`` (also on the module path), without the
    interpreter and without an extension log that the environment or ./build would add."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", EXT_LOG_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "fastgpt", "compile-report", *args], env=env,
                          cwd=folder, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernels")
    (d / "spilly_kernels.py").write_text(KERNELS)
    js = d / "report.json"
    return compile_report(d, "--modules", "spilly_kernels", "--arch", "sm_80", "--json", str(js),
                          "--strict"), js


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
    p = compile_report(tmp_path, "--modules", "fine_kernels", "--arch", "sm_90", "--strict")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "sm_90  scale_by_sum" in p.stdout and "# sm_90: 1 configs" in p.stdout


# nvcc 13.0 -Xptxas -v, trimmed: a template kernel in nested and anonymous namespaces (sm_80
# prints cmem, sm_90 does not), a kernel that spills, and a device function ptxas did not inline,
# whose properties follow the kernel it was compiled with
EXT_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN7fastgpt13embedding_gpu36_GLOBAL__N__4ba538a8_4_k_cu_03227e156kernelINS1_3FwdIfEEEEvNT_6ParamsE' for 'sm_80'
ptxas info    : Function properties for _ZN7fastgpt13embedding_gpu36_GLOBAL__N__4ba538a8_4_k_cu_03227e156kernelINS1_3FwdIfEEEEvNT_6ParamsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 376 bytes cmem[0]
ptxas info    : Compile time = 20.660 ms
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z5heavyPfPKfi' for 'sm_90'
ptxas info    : Function properties for _Z5heavyPfPKfi
    1536 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1536 bytes cumulative stack size, 4096 bytes smem
ptxas info    : Compile time = 446.332 ms
ptxas info    : Function properties for _Z6helperPKfi
    0 bytes stack frame, 960 bytes spill stores, 1128 bytes spill loads
"""


def test_ext_log_rows():
    rows = parse_ext_log(EXT_LOG, [80, 90])
    assert [(r["arch"], r["kernel"], r.get("registers"), r["spill_bytes"]) for r in rows] == \
        [(80, "kernel<Fwd<float> >", 40, 0), (90, "heavy", 255, 16), (90, "helper", None, 2088)]
    # 40 registers x 32 threads = 1280 per warp -> 65536 // 1280 = 51 warps; 255 -> 8192 -> 8
    assert [r["warps_per_sm"] for r in rows[:2]] == [51, 8]
    assert rows[1]["shared_bytes"] == 4096 and rows[1]["problems"] == ["spills 16 bytes"]
    assert rows[2]["problems"] == ["device function spills 2088 bytes"]
    assert not rows[0]["problems"]
    assert [r["arch"] for r in parse_ext_log(EXT_LOG, [90])] == [90, 90]


def test_ext_only_reads_the_log_and_strict_fails_on_its_spills(tmp_path):
    """What .ci/check_cuda_ext.sh runs on the extension's build log: no Triton compiles."""
    (tmp_path / "ok.log").write_text(EXT_LOG.split("ptxas info    : 0 bytes gmem\n")[1])
    (tmp_path / "spills.log").write_text(EXT_LOG)
    ok = compile_report(tmp_path, "--ext-only", "--ext-log", "ok.log", "--strict")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "modules: none" in ok.stdout and "# sm_80: 1 configs" in ok.stdout
    assert [line.split()[:2] for line in ok.stdout.splitlines() if line.startswith("sm_")] == \
        [["sm_80", "kernel<Fwd<float>"]]
    bad = compile_report(tmp_path, "--ext-only", "--ext-log", "spills.log", "--strict")
    assert bad.returncode == 1 and "2 config(s) with problems" in bad.stdout, bad.stdout
    missing = compile_report(tmp_path, "--ext-only")
    assert missing.returncode == 2 and "--ext-log" in missing.stderr


def test_arch_and_config_formatting():
    assert parse_archs("sm_80,90") == [80, 90]
    with pytest.raises(FastGPTError, match="sm_75"):
        parse_archs("sm_75")
    assert config_str({"BLOCK_M": 64, "DROPOUT": True, "UPCAST": False, "num_warps": 4}) == \
        "bm=64 drop=1 w=4"

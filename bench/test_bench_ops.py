"""The ops' benchmark cases through pytest-benchmark (see bench/conftest.py)."""

import argparse

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from fastgpt.bench_suites import SUITES, build  # noqa: E402
from fastgpt.benchmark import SkipCase, environment  # noqa: E402


def _cases(config):
    full = config.getoption("--bench-full")
    device = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    args = argparse.Namespace(device=device, dtype=None, providers=None, modes=None, T=None, D=None,
                              B=None, H=None, N=None, C=None, V=None, quick=not full)
    return [c for suite in SUITES.values() for c in suite.cases(args)]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = _cases(metafunc.config)
        metafunc.parametrize("case", cases, ids=[
            f"{c.op}-{c.mode}-{c.provider}-{c.shape_str().replace(' ', ',')}" for c in cases])


def test_op(benchmark, case, bench_device):
    import torch._functorch.config as functorch_config
    functorch_config.donated_buffer = False   # bwd mode retains compiled graphs
    try:
        built = build(case, bench_device)
    except SkipCase as e:
        pytest.skip(str(e))
    fn = built.fn
    if bench_device.startswith("cuda"):
        def fn():
            built.fn()
            torch.cuda.synchronize()
    benchmark.group = f"{case.op} {case.mode} {case.dtype} {case.shape_str()}"
    benchmark.extra_info.update(environment(bench_device), provider=case.provider,
                                flops=built.flops, bytes=built.bytes)
    benchmark(fn)

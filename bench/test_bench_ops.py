"""The ops' benchmark cases through pytest-benchmark (see bench/conftest.py).

``parametrize_cases`` and ``run_case`` are shared with the per-op files that also run under
pytest (bench/bench_transformer_block.py).
"""

import argparse

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from fastgpt.bench_suites import SUITES, build  # noqa: E402
from fastgpt.benchmark import SkipCase, environment  # noqa: E402


def _cases(config, suites=None):
    full = config.getoption("--bench-full")
    device = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    args = argparse.Namespace(device=device, dtype=None, providers=None, modes=None, T=None, D=None,
                              B=None, H=None, N=None, C=None, V=None, quick=not full)
    return [c for name, suite in SUITES.items() if suites is None or name in suites
            for c in suite.cases(args)]


def parametrize_cases(metafunc, suites=None):
    """Parametrize the ``case`` argument with the cases of ``suites`` (default: every suite)."""
    if "case" in metafunc.fixturenames:
        cases = _cases(metafunc.config, suites)
        # the dtype is part of the id: a suite may time one shape in several dtypes
        metafunc.parametrize("case", cases, ids=[
            f"{c.op}-{c.mode}-{c.provider}-{c.dtype}-{c.shape_str().replace(' ', ',')}"
            for c in cases])


def pytest_generate_tests(metafunc):
    parametrize_cases(metafunc)


def run_case(benchmark, case, device):
    import torch._functorch.config as functorch_config
    functorch_config.donated_buffer = False   # bwd mode retains compiled graphs
    try:
        built = build(case, device)
    except SkipCase as e:
        pytest.skip(str(e))
    fn = built.fn
    if device.startswith("cuda"):
        def fn():
            built.fn()
            torch.cuda.synchronize()
    benchmark.group = f"{case.op} {case.mode} {case.dtype} {case.shape_str()}"
    benchmark.extra_info.update(environment(device), provider=case.provider,
                                flops=built.flops, bytes=built.bytes)
    benchmark(fn)


def test_op(benchmark, case, bench_device):
    run_case(benchmark, case, bench_device)

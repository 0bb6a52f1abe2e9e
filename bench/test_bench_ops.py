"""The ops' benchmark cases through pytest-benchmark (see bench/conftest.py).

``parametrize_cases`` and ``run_case`` are shared with the per-op files that also run under
pytest (bench/bench_transformer_block.py); the suites those files time are left out here.
"""

import argparse

import pytest
import torch

from fastgpt.tools.bench.harness import SkipCase
from fastgpt.tools.bench.suites import SUITES, build
from fastgpt.tools.environment import environment

OWN_FILES = {"transformer-block"}   # timed by bench/bench_transformer_block.py


def _device(config):
    return config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")


def _cases(config, suites):
    """The suites' cases at `fastgpt bench --quick` sizes (--bench-full: the default sizes),
    less those the list itself marks as not run (the `loop` attention beyond its rows)."""
    args = argparse.Namespace(device=_device(config), dtype=None, providers=None, modes=None,
                              T=None, D=None, B=None, H=None, N=None, C=None, V=None,
                              quick=not config.getoption("--bench-full"), full=False)
    return [c for name in suites for c in SUITES[name].cases(args) if not c.skip]


def parametrize_cases(metafunc, suites):
    """Parametrize the ``case`` argument with the cases of ``suites``."""
    if "case" in metafunc.fixturenames:
        cases = _cases(metafunc.config, suites)
        # on a GPU every case needs it, and one a backend cannot run there (e.g. the C++-only
        # ext attention) skips; on a CPU a case that cannot run fails the run (the skip rule)
        marks = [pytest.mark.cuda] if _device(metafunc.config).startswith("cuda") else []
        # the dtype is part of the id: a suite may time one shape in several dtypes
        metafunc.parametrize("case", [pytest.param(c, marks=marks, id=(
            f"{c.op}-{c.mode}-{c.provider}-{c.dtype}-{c.shape_str().replace(' ', ',')}"))
            for c in cases])


def pytest_generate_tests(metafunc):
    parametrize_cases(metafunc, [s for s in SUITES if s not in OWN_FILES])


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

"""`pytest bench/ --benchmark-only`: the `fastgpt bench` cases timed by pytest-benchmark.

Save results with ``--benchmark-json FILE`` (or ``--benchmark-autosave``) and compare commits
with ``--benchmark-compare``. Cases come from fastgpt.tools.bench.suites (the quick sizes unless
``--bench-full``); Triton runs only on CUDA (on CPU it would be the interpreter). Not part of
`pytest tests`; CI runs every file here once with ``--benchmark-disable`` (`make test`), so the
scripts cannot rot. The per-op scripts (bench_<op>.py) are collected too, for any pytest entry
they have. As in tests/, only a test marked ``cuda`` may be skipped (tests/conftest.py's rule).
"""

import importlib.util
from pathlib import Path

import pytest


def _tests_conftest():
    """tests/conftest.py as a module of its own (both files are named conftest)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("fastgpt_tests_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_configure(config):
    _tests_conftest().register_skip_rule(config)


def pytest_collect_file(file_path, parent):
    # bench_<op>.py beside the test_*.py files; a file named on the command line is collected
    # by pytest itself
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and file_path.parent == Path(__file__).parent
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true",
                     help="the default sizes of `fastgpt bench` instead of the quick ones")
    parser.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if present)")


@pytest.fixture(scope="session")
def bench_device(request):
    import torch
    return request.config.getoption("--bench-device") or \
        ("cuda" if torch.cuda.is_available() else "cpu")

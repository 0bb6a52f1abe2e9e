"""`pytest bench/ --benchmark-only`: the `fastgpt bench` cases timed by pytest-benchmark.

Save results with ``--benchmark-json FILE`` (or ``--benchmark-autosave``) and compare commits
with ``--benchmark-compare``. Cases come from fastgpt.bench_suites (the quick sizes unless
``--bench-full``); Triton runs only on CUDA (on CPU it would be the interpreter). Not part of
`pytest tests`.
"""

import pytest


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true",
                     help="the default sizes of `fastgpt bench` instead of the quick ones")
    parser.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if present)")


@pytest.fixture(scope="session")
def bench_device(request):
    import torch
    return request.config.getoption("--bench-device") or \
        ("cuda" if torch.cuda.is_available() else "cpu")

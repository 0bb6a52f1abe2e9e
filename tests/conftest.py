"""Test setup: Triton kernels run through the interpreter on CPU tensors, and the skip rule.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
when pytest configures itself, before it imports any test module (and so fastgpt's kernels);
not at import, so that bench/conftest.py can load this file for its skip rule alone.

Only a test marked ``cuda`` (it needs an NVIDIA GPU) may be skipped: any other skip fails the
run (exit 1) with the skipped tests and their reasons listed, since a skipped test checks nothing
and nobody reads the "s" in the progress line. bench/conftest.py applies the same rule.
"""

import os
import tempfile

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _reason(report) -> str:
    r = report.longrepr
    text = r[2] if isinstance(r, tuple) and len(r) == 3 else str(r)   # (path, line, message)
    return text.removeprefix("Skipped: ")


class SkipRule:
    """Records skips of tests without the ``cuda`` mark; fails the session if there were any."""

    NAME = "fastgpt-skip-rule"

    def __init__(self, config):
        self.config = config
        self.skipped: list[tuple[str, str]] = []   # (test id, reason)

    def _may_skip(self, item) -> bool:
        if item.get_closest_marker("cuda") is not None:
            return True
        # what the user selected with pytest-benchmark's --benchmark-only / --benchmark-skip
        opt = self.config.getoption
        timed = "benchmark" in getattr(item, "fixturenames", ())
        return bool(opt("benchmark_skip", False) if timed else opt("benchmark_only", False))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        if report.skipped and not hasattr(report, "wasxfail") and not self._may_skip(item):
            self.skipped.append((item.nodeid, _reason(report)))

    def pytest_collectreport(self, report):
        if report.skipped:          # a whole module: importorskip, skip(allow_module_level=True)
            self.skipped.append((report.nodeid, _reason(report)))

    def pytest_sessionfinish(self, session):
        if self.skipped and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if not self.skipped:
            return
        tr = terminalreporter
        tr.section("skipped without the cuda mark", sep="=", red=True, bold=True)
        tr.line(f"{len(self.skipped)} test(s) skipped; only tests marked cuda (they need an "
                f"NVIDIA GPU) may skip, so this run fails. Make them pass, fail, or mark them:")
        for nodeid, reason in self.skipped:
            tr.line(f"  {nodeid}: {reason}")


def register_skip_rule(config) -> None:
    """Install the rule once per session (tests/ and bench/ may both be collected)."""
    if config.pluginmanager.get_plugin(SkipRule.NAME) is None:
        config.pluginmanager.register(SkipRule(config), SkipRule.NAME)


def pytest_configure(config):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # measured dispatch (on by default on CUDA) caches its choices under XDG_CACHE_HOME: tests
    # keep theirs out of the user's ~/.cache, and start from an empty cache
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="fastgpt-test-cache-")
    # CI's CPUs may lack native bf16 (AVX2 only), where `--dtype bfloat16` is refused as too
    # slow (fastgpt.precision); the tests run that code path for correctness, subprocesses too.
    # tests/test_precision.py unsets it where it checks the refusal.
    os.environ["FASTGPT_ALLOW_EMULATED_BF16"] = "1"
    register_skip_rule(config)

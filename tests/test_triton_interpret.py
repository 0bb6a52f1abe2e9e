"""TRITON_INTERPRET is read in one place (fastgpt.ops._triton) with Triton's own meaning."""

import subprocess
import sys

import pytest

from fastgpt.ops._triton import interpreting

VALUES = ["1", "0", "true", "TRUE", "On", "yes", "2", "", "off", "false", " 1"]


@pytest.mark.parametrize("value", VALUES)
def test_interpreting_agrees_with_triton(value, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    # triton reads the variable when its knob is first used: ask a fresh process
    code = "import triton; print(bool(triton.knobs.runtime.interpret))"
    env = {"TRITON_INTERPRET": value, "PATH": ""}
    triton_says = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                 text=True, check=True, timeout=120).stdout.strip()
    assert str(interpreting()) == triton_says, value


def test_unset_is_off(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not interpreting()

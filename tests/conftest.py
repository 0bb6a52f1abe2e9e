"""Test setup: Triton kernels run through the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before the tests import fastgpt's kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

"""What the Triton backends share: whether Triton runs kernels through its interpreter, and the
dtype their kernels store outputs in there.

``TRITON_INTERPRET`` is read here and nowhere else, with Triton's own meaning (``1``, ``true``,
``on`` or ``yes``, any case, turn the interpreter on; anything else leaves it off), so that every
backend, ``fastgpt check`` and the AOT tools agree with the kernels Triton actually defines.
Reading the variable does not import triton (~0.2 s that a CPU training run never needs).
"""

from __future__ import annotations

import os

import torch

ENV_VAR = "TRITON_INTERPRET"
_ON = ("1", "true", "on", "yes")


def interpreting() -> bool:
    """True when TRITON_INTERPRET asks Triton to run kernels on the CPU."""
    return os.environ.get(ENV_VAR, "").lower() in _ON


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes an output of ``dtype`` in. The interpreter converts fp32 to bf16
    by truncation, a bias that builds up in a backward; GPUs round to nearest. So when
    interpreting, bf16 outputs are stored in fp32 and torch rounds them, as a GPU would."""
    return torch.float32 if dtype == torch.bfloat16 and interpreting() else dtype

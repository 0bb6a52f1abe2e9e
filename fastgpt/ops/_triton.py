"""What the Triton backends share: whether Triton runs kernels through its interpreter.

``TRITON_INTERPRET`` is read here and nowhere else, with Triton's own meaning (``1``, ``true``,
``on`` or ``yes``, any case, turn the interpreter on; anything else leaves it off), so that every
backend, ``fastgpt check`` and the AOT tools agree with the kernels Triton actually defines.
Reading the variable does not import triton (~0.2 s that a CPU training run never needs).
"""

from __future__ import annotations

import os

ENV_VAR = "TRITON_INTERPRET"
_ON = ("1", "true", "on", "yes")


def interpreting() -> bool:
    """True when TRITON_INTERPRET asks Triton to run kernels on the CPU."""
    return os.environ.get(ENV_VAR, "").lower() in _ON

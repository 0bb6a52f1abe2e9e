"""What the Triton backends share: whether Triton runs kernels through its interpreter, the
kernel modules imported on first use, the dtype kernels store outputs in under the interpreter,
and one way to make a torch op of a kernel launcher.

``TRITON_INTERPRET`` is read here and nowhere else, with Triton's own meaning (``1``, ``true``,
``on`` or ``yes``, any case, turn the interpreter on; anything else leaves it off), so that every
backend, ``fastgpt check`` and the AOT tools agree with the kernels Triton actually defines.
Reading the variable does not import triton (~0.2-0.5 s that a CPU training run never needs);
neither does importing this module: the kernel modules load on a backend's first use.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import sys
from typing import Callable, Optional

import torch

ENV_VAR = "TRITON_INTERPRET"
_ON = ("1", "true", "on", "yes")
PACKAGE = "fastgpt.kernels"


def interpreting() -> bool:
    """True when TRITON_INTERPRET asks Triton to run kernels on the CPU."""
    return os.environ.get(ENV_VAR, "").lower() in _ON


@functools.cache
def kernels(module: str):
    """The kernel module ``fastgpt.kernels.<module>``, imported (and its kernels defined, for
    the GPU or the interpreter as TRITON_INTERPRET says then) on first use."""
    return importlib.import_module(f"{PACKAGE}.{module}")


def triton_missing() -> Optional[str]:
    """None when triton is installed, else why not. Found without importing anything: the kernel
    modules load on a backend's first launch, so an availability check (a help text, a bench
    with TRITON_INTERPRET unset) never fixes them for the GPU or for the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def loaded_for_gpu(module: str, kernel: str) -> bool:
    """True when the module's kernels were defined while TRITON_INTERPRET was off: setting it
    afterwards cannot turn them into interpreted ones."""
    loaded = sys.modules.get(f"{PACKAGE}.{module}")
    return loaded is not None and type(getattr(loaded, kernel)).__name__ != "InterpretedFunction"


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes an output of ``dtype`` in. The interpreter converts fp32 to bf16
    by truncation, a bias that builds up in a backward; GPUs round to nearest. So when
    interpreting, bf16 outputs are stored in fp32 and torch rounds them, as a GPU would."""
    return torch.float32 if dtype == torch.bfloat16 and interpreting() else dtype


def define_op(name: str, launch: Callable, fake: Callable):
    """The op ``name`` ("fastgpt::x"), a ``torch.library.triton_op`` whose body is ``launch``
    (which starts its kernels through ``wrap_triton``), so torch.compile traces into the kernels.

    Interpreted kernels are plain Python that cannot run on fake tensors, so under
    TRITON_INTERPRET (read at call time) the body calls an opaque twin instead: the custom op
    "fastgpt::_x_interpreted" running ``launch``, with ``fake`` as its shape-only kernel. Define
    ops on a backend's first use, not at import: a triton_op imports torch._inductor (~1.2 s).
    """
    namespace, _, op = name.partition("::")
    twin = torch.library.custom_op(f"{namespace}::_{op}_interpreted", launch, mutates_args=())
    twin.register_fake(fake)

    def body(*args):
        return twin(*args) if interpreting() else launch(*args)
    # the op's schema is launch's signature, its annotations resolved where launch lives
    body.__signature__ = inspect.signature(launch, eval_str=True)
    return torch.library.triton_op(name, body, mutates_args=())

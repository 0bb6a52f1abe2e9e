"""Loading fastgpt._C, the C++/CUDA extension (csrc/), once for every backend that uses it.

It is imported lazily, on the first availability check, so ``import fastgpt`` works (and the
automatic choice falls back to plain PyTorch) when it was not built. Backend modules register
what must happen right after the import (fake kernels for torch.compile) with ``on_load``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from fastgpt.ops import registry

_UNTRIED = object()
_state: dict = {"reason": _UNTRIED}
_on_load: list[Callable[[], None]] = []


def on_load(fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn`` once fastgpt._C has been imported (decorator); at once if it already was
    (a module imported after the first availability check, e.g. fastgpt.optim)."""
    _on_load.append(fn)
    if _state["reason"] is None:
        fn()
    return fn


def _load() -> Optional[str]:
    try:
        import fastgpt._C  # noqa: F401  (loading it registers the torch.ops.fastgpt.* schemas)
    except ImportError as e:
        return f"fastgpt._C is not built (FASTGPT_SKIP_EXT=1 or no compiler at install time): {e}"
    for fn in _on_load:
        fn()
    return None


@registry.constant_under_compile
def available() -> Optional[str]:
    """None when fastgpt._C loads, else why not. Imports the extension on first call."""
    if _state["reason"] is _UNTRIED:
        _state["reason"] = _load()
    return _state["reason"]


@registry.constant_under_compile
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the loaded extension has a kernel of ``op`` (e.g. "fastgpt::x") for that key."""
    return available() is None and torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)

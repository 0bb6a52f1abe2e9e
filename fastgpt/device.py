"""Where a run computes: the ``--device`` names every command accepts, and what the CPU offers.

``/proc/cpuinfo`` is read once per process: its model name goes into every benchmark's
environment line, its flags decide whether bfloat16 is native (fastgpt.precision).
"""

from __future__ import annotations

import functools
import platform
from typing import Optional

import torch

from fastgpt.errors import FastGPTError

DEVICE_NAMES = "auto, cpu, cuda, cuda:N"
# the CPU features that decide which kernels run fast (fastgpt.precision, csrc/*_cpu.cpp)
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")


def resolve_device(name: Optional[str]) -> torch.device:
    """``auto`` (or None): cuda when torch sees a GPU, else cpu; ``cpu``, ``cuda`` and ``cuda:N``
    name themselves. Anything else, or cuda without a GPU, is an error saying what to use."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    index = name[len("cuda:"):] if name.startswith("cuda:") else ""
    if name not in ("cpu", "cuda") and not index.isdigit():
        raise FastGPTError(f"unknown device {name!r}; devices are: {DEVICE_NAMES}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FastGPTError(f"device {name!r} requested but this torch sees no CUDA device "
                           f"(torch {torch.__version__}); use --device cpu")
    return torch.device(name)


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo ({} where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break            # the end of the first processor's block
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or "unknown"


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bfloat16 matmuls run natively, faster than float32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def speed_flags() -> str:
    """The SPEED_FLAGS this CPU has, space-separated ("none" if none)."""
    return " ".join(f for f in SPEED_FLAGS if f in cpu_flags()) or "none"


def describe(device: torch.device) -> str:
    """The device as a run's header and a benchmark's environment name it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({speed_flags()})"

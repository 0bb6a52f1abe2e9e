"""Keep the CPU memory a training step frees for the next step (glibc's malloc).

Why: glibc serves every block of 32 MiB or more with its own mmap and unmaps it when it is
freed, so each large activation of each CPU step is fresh memory, and its first touch faults
in pages the kernel must zero. At ``shakespeare-char``'s size (activations of 25-100 MB) the
kernel's page zeroing took 13.6% of a run's CPU samples on the AVX2 EPYC (perf, git 88430ce).
How: ``mallopt(M_MMAP_MAX, 0)`` serves every block from the heap and
``mallopt(M_TRIM_THRESHOLD, INT_MAX)`` keeps freed heap memory for reuse instead of returning
it, as a caching allocator does: the next step's blocks come back without faults, and the
process keeps its peak heap until it exits (peak RSS +4% at shakespeare-char).
Only for runs whose activations reach that size: smaller blocks already come back from glibc's
heap (its mmap threshold rises to 32 MiB once such a block is freed), and at the baby preset's
size (1.5 MB) keeping them measured 1-3% slower per step (four alternated pairs), not faster.
Limits: Linux with glibc only; left alone with FASTGPT_KEEP_FREED_MEMORY=0, or when the user
configured malloc (the MALLOC_*_ variables, a glibc.malloc tunable) or preloads another
allocator.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from typing import Optional

M_TRIM_THRESHOLD = -1   # glibc's malloc.h
M_MMAP_MAX = -4
INT_MAX = 2 ** 31 - 1
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20   # 64-bit glibc: blocks this large always get an mmap
OPT_OUT = "FASTGPT_KEEP_FREED_MEMORY"   # "0": leave malloc as it is
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                 "MALLOC_TOP_PAD_")


def _why_not(largest_block: int) -> Optional[str]:
    if largest_block < GLIBC_MMAP_THRESHOLD_MAX:
        return (f"blocks of at most {largest_block / 2 ** 20:.1f} MiB, which glibc's heap "
                f"reuses")
    if os.environ.get(OPT_OUT) == "0":
        return f"{OPT_OUT}=0"
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "not Linux with glibc"
    for name in USER_SETTINGS:
        if name in os.environ:
            return f"{name} is set"
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return "another allocator is preloaded (LD_PRELOAD)"
    return None


KEPT = "freed blocks kept for reuse"   # how the training header says it
_kept = False   # whether this process keeps freed memory


def keep_freed_memory(largest_block: int) -> Optional[str]:
    """Make glibc keep freed memory for reuse, for steps whose largest block has
    ``largest_block`` bytes; None when it took effect (now or before), else why not (then
    nothing changed)."""
    global _kept
    if _kept:
        return None
    reason = _why_not(largest_block)
    if reason is None:
        libc = ctypes.CDLL(None)   # the process's own C library
        if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, INT_MAX) != 1:
            reason = "mallopt refused"
    _kept = reason is None
    return reason


def kept() -> bool:
    """Whether this process keeps freed memory (keep_freed_memory took effect)."""
    return _kept

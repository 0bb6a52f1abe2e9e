"""fastgpt.host_memory: glibc keeps the memory of large freed blocks for the next step.

Each case runs in a fresh interpreter (mallopt changes the whole process): with the setting, a
freed 256 MiB tensor stays resident (its pages come back without faults); without it, or when
the run's blocks are small or the user configured malloc, nothing changes and the pages go
back to the system. The training run turns it on at shakespeare-char's size, not baby's.
"""

import os
import platform
import subprocess
import sys

import pytest

from fastgpt import config as cfgmod
from fastgpt.host_memory import GLIBC_MMAP_THRESHOLD_MAX
from fastgpt.train import _largest_activation

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

PROBE = """
import os, sys, torch
from fastgpt import host_memory

def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

print(host_memory.keep_freed_memory(int(sys.argv[1])), host_memory.kept())
t = torch.ones(64 * 2 ** 20)         # 256 MiB, touched
before = resident_mib()
del t
print(round(before - resident_mib()))  # MiB handed back to the system
"""


def mine(name):   # the settings these cases choose themselves
    return name.startswith("MALLOC_") or name == "FASTGPT_KEEP_FREED_MEMORY"


def probe(largest_block, **env):
    out = subprocess.run([sys.executable, "-c", PROBE, str(largest_block)], text=True,
                         capture_output=True, check=True,
                         env={**{k: v for k, v in os.environ.items() if not mine(k)},
                              **env}).stdout.splitlines()
    reason, kept = out[0].rsplit(" ", 1)
    return reason, kept == "True", int(out[1])


def test_large_blocks_stay_resident_once_kept():
    reason, kept, returned = probe(64 << 20)
    assert (reason, kept) == ("None", True)
    assert returned < 16, returned


def test_small_blocks_opt_out_and_user_settings_change_nothing():
    for env, why in [({}, "blocks of at most 1.5 MiB, which glibc's heap reuses"),
                     ({"FASTGPT_KEEP_FREED_MEMORY": "0"}, "FASTGPT_KEEP_FREED_MEMORY=0"),
                     ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "MALLOC_TRIM_THRESHOLD_ is set")]:
        reason, kept, returned = probe(3 << 19 if not env else 64 << 20, **env)
        assert (reason, kept) == (why, False)
        assert returned > 240, (env, returned)   # the 256 MiB went back


def test_training_keeps_them_at_shakespeare_char_size_only():
    def largest(preset):
        m, t = cfgmod.preset(preset)
        return _largest_activation(m, t)
    assert largest("baby") < GLIBC_MMAP_THRESHOLD_MAX <= largest("shakespeare-char")

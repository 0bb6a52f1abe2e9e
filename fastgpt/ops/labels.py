"""Profiler labels: a ``record_function`` range around fastgpt's work, opened only while a
profiler records.

An open ``record_function`` costs ~15 us even when no profiler listens (it dispatches an op to
start a RecordFunction); asking whether one records costs ~0.3 us, so a training step pays that
and nothing more unless it is being profiled. Under torch.compile no range is opened: compiled
graphs drop them (Dynamo warns once per graph), so a compiled region is never labelled.
"""

from __future__ import annotations

import contextlib

import torch


def recording() -> bool:
    """Whether a profiler records now, outside a region being compiled."""
    return not torch.compiler.is_compiling() and torch._C._autograd._profiler_enabled()


@contextlib.contextmanager
def labelled(name: str):
    """``record_function(name)`` while a profiler records; nothing otherwise."""
    if not recording():
        yield
        return
    with torch.profiler.record_function(name):
        yield

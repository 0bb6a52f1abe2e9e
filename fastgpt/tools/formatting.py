"""Numbers in the tools' tables: one spelling for a missing value and for infinity."""

from __future__ import annotations

from typing import Optional


def number(x: Optional[float], spec: str, missing: str = "-") -> str:
    """``format(x, spec)``; ``missing`` for None, "inf" for infinity."""
    if x is None:
        return missing
    return "inf" if x == float("inf") else format(x, spec)

"""The one error type users see: a message that says what was wrong, the value, and what is allowed.

The CLI prints these without a traceback and exits non-zero; library callers can catch them.
Subclassing ValueError keeps `except ValueError` working for callers who expect it.
fastgpt._C's input checks cannot raise FastGPTError (torch turns them into ValueError or
IndexError); ``user_error`` tells them from other errors by their message.
"""

from __future__ import annotations

import re
from typing import Optional


class FastGPTError(ValueError):
    pass


# fastgpt._C's input checks (csrc/checks.h and each op's own) start with the op's name, e.g.
# "fastgpt::embedding_forward: index 70 is out of range ..."; TORCH_CHECK_VALUE raises
# ValueError, TORCH_CHECK_INDEX IndexError. Other C++ failures (RuntimeError) are bugs.
_EXTENSION_CHECK = re.compile(r"fastgpt::\w+: \S")


def user_error(e: BaseException) -> Optional[str]:
    """The one-line message of an error in the user's input (a FastGPTError, or an input check
    of fastgpt's C++ extension), or None for any other error, which keeps its traceback."""
    if isinstance(e, FastGPTError):
        return str(e)
    if isinstance(e, (ValueError, IndexError)):
        first = str(e).split("\n", 1)[0]   # torch may append a C++ stack trace
        if _EXTENSION_CHECK.match(first):
            return first
    return None

"""The one error type users see: a message that says what was wrong, the value, and what is allowed.

The CLI prints these without a traceback and exits non-zero; library callers can catch them.
Subclassing ValueError keeps `except ValueError` working for callers who expect it.
"""


class FastGPTError(ValueError):
    pass

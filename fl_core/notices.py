"""Warnings that a process prints once, however many runs it builds."""
from __future__ import annotations

import warnings

_warned: set[str] = set()


def warn_once(message: str, stacklevel: int = 2) -> None:
    """``warnings.warn(message)`` the first time this process meets ``message``; silent after that.
    ``stacklevel`` counts from the caller of ``warn_once``, as ``warnings.warn``'s does from its own."""
    # Python's own once-per-location rule is reset whenever any library enters catch_warnings, so a
    # process that builds the same data for many runs (a notebook's grid) would repeat it each time.
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=stacklevel + 1)

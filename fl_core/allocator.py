"""Keep freed memory in the process, so that training steps on a CPU do not page-fault.

PyTorch's CPU tensors come from ``malloc``. glibc's ``malloc`` gives a large block back to the
kernel when it is freed (``munmap`` for blocks it mapped, trimming the heap for the others), so a
training step, which frees its activations and allocates the same sizes again in the next step,
gets fresh pages every time: the kernel zeroes each 4 KiB page on first touch. For ResNet-8 steps
on 2 CPU cores that was 17-32% of the time (``benchmarks/allocator.py``). ``keep_freed_memory`` turns
both off (``mallopt``: no ``mmap`` for large blocks, trimming only beyond 2 GiB), so freed blocks
are reused. It changes no arithmetic: only where tensors live.

The cost: the process keeps its peak heap instead of shrinking after it. ``FL_CORE_MALLOC=default``
leaves glibc as it is; on other C libraries (macOS, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "FL_CORE_MALLOC"
CHOICES = ("keep", "default")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
_TRIM_BEYOND = 2**31 - 1  # mallopt takes an int

_state: str | None = None


def allocator_setting() -> str:
    """What ``keep_freed_memory`` did in this process: ``keep``, ``default`` or ``not glibc``
    (``unset`` before it is called)."""
    return _state or "unset"


def keep_freed_memory() -> str:
    """Apply ``$FL_CORE_MALLOC`` (``keep``, the default, or ``default``) to this process once;
    returns ``allocator_setting()``. Raises ``ValueError`` on any other value."""
    global _state
    choice = os.environ.get(ENV, "keep")
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r} is not one of {', '.join(CHOICES)}")
    if _state is not None:
        return _state
    if choice == "default":
        _state = "default"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _state = "not glibc"
    else:
        libc = ctypes.CDLL(None)
        applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_BEYOND) == 1
        _state = "keep" if applied else "default"
    return _state

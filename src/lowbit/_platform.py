"""The machine description printed beside measured numbers (training cards, benchmark reports),
and handing freed heap memory back to the OS."""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

__all__ = ["cpu_name", "trim_heap"]

_MALLOC_TRIM = None


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or what :mod:`platform` knows elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op). Loading frees a
    layer's codes and temporaries as its kernel is built, and a kernel's first call frees the
    weight it repacks; without this glibc keeps those fragments resident (its mmap threshold
    rises after the first large free, so later large buffers come from the heap), and the
    process's RSS grows by their sum."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)

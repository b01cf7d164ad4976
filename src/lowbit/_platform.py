"""The machine description printed beside measured numbers (training cards, benchmark reports),
and handing freed heap memory back to the OS."""

from __future__ import annotations

import ctypes
import platform
from typing import Callable
from pathlib import Path

__all__ = ["cpu_features", "cpu_name", "resolve_device", "trim_heap"]

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


# The flags that decide which CPU kernels are fast or exact (lowbit.kernels.vnni, .bf16), in the
# order they are printed. A VM often reports only "AMD EPYC" as the model name, and the same name
# covered Zen 3 (no VNNI), Zen 4 and Zen 5 machines in this project's runs.
_ISA_FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"), ("avx_vnni", "AVX-VNNI"),
              ("avx512_bf16", "AVX-512 BF16"), ("amx_int8", "AMX-INT8"), ("amx_bf16", "AMX-BF16"))


def cpu_features(cpuinfo: str | None = None) -> str:
    """The CPU's x86 family/model and the instruction sets lowbit's kernels depend on, e.g.
    ``"x86 family 26 model 2: AVX2, AVX-512, VNNI, AVX-512 BF16"``; ``""`` where /proc/cpuinfo is
    missing (not Linux) or lists none of them. ``cpuinfo`` (for tests): that file's text."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():  # the first processor's block is enough
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    isa = ", ".join(name for flag, name in _ISA_FLAGS if flag in flags)
    where = (f"x86 family {fields['cpu family']} model {fields['model']}"
             if "cpu family" in fields and "model" in fields else "")
    return ": ".join(p for p in (where, isa) if p)


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


def resolve_device(device, error: Callable[[str], Exception], no_cuda_fix: str):
    """``device`` (None means the CPU) as a ``torch.device`` that lowbit supports and this
    machine has; otherwise raise ``error(message)``, the message naming the problem and, for a
    missing GPU, ``no_cuda_fix``."""
    import torch

    try:
        d = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise error(f"unknown device {device!r}: use 'cpu' or 'cuda'") from None
    if d.type not in ("cpu", "cuda"):
        raise error(f"device {d.type!r} is not supported: use 'cpu' or 'cuda'")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device 'cuda' was asked for, but this machine has no CUDA GPU (or this PyTorch build has"
                    f" no CUDA); {no_cuda_fix}")
    return d

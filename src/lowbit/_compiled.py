"""Small ``torch.compile``-d elementwise helpers for eager inference, and their on/off switch.

Quantizing an activation in eager PyTorch is several passes over the tensor (scale, clamp,
round, cast), which on the bundled model costs more than the int8 convolution that follows. One
compiled function fuses them into one loop. Each helper is compiled per *input kind* (dtype, rank,
layout; :func:`input_key`) with ``dynamic=True``, so a model that mixes float32/bf16, 2-D/4-D and
NCHW/NHWC inputs never reaches dynamo's recompile limit, and every layer shares one kernel (its
scale and bounds are tensor inputs, not constants).

``LOWBIT_COMPILE_QUANT=0`` turns the helpers off (the eager code computes the same values; the
tests check both). They are never used inside a graph that is itself being compiled: there the
whole graph is fused anyway. A compilation failure (no C++ compiler) switches them off for the
process and the caller falls back to eager.

Before lowbit compiles anything it pins inductor's vector width (:func:`pin_vector_width`): on a
CPU-only machine inductor's on-disk graph cache is not keyed on the vector ISA it generated code
for, and a cached graph built for another width is run as is — wrong values or heap corruption.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch

from ._chunked import map_chunked

__all__ = ["disable_compiled_helpers", "input_key", "pin_vector_width", "run_compiled", "use_compiled_helpers"]


@functools.lru_cache(maxsize=1)
def pin_vector_width() -> int | None:
    """Set ``torch._inductor.config.cpp.simdlen`` to the width inductor would pick anyway (512 on
    AVX-512, 256 on AVX2), unless the user set it; returns the width in force.

    Why: on a machine without a GPU, inductor's FX graph cache key carries no CPU description
    (torch 2.13, ``CacheBase.get_system``), so a graph compiled for 16-lane AVX-512 loops is
    reused where the picked ISA is 8-lane AVX2 (``ATEN_CPU_CAPABILITY=avx2``, or a cache directory
    shared between machines) and the reverse. Measured on a Zen 4 CPU with one cache directory:
    lowbit's per-tensor quantizer, compiled under ``ATEN_CPU_CAPABILITY=avx2`` after a default
    run, gave wrong values in every shape tried (the bundled W8A8 model's images came out NaN),
    and a default run after an AVX2 one aborted in ``malloc``. The width is part of inductor's
    config, which *is* in the key, so pinning it keeps the two apart. The generated code does not
    change: it is the width inductor picks when ``simdlen`` is unset."""
    try:
        import torch._inductor.config as inductor_config
        from torch._inductor.cpu_vec_isa import pick_vec_isa
    except ImportError:  # a PyTorch build without inductor: nothing is compiled
        return None
    if inductor_config.cpp.simdlen is None:
        width = pick_vec_isa().bit_width()
        if width:  # 0: no vector ISA, inductor emits scalar code whatever the key
            inductor_config.cpp.simdlen = width
    return inductor_config.cpp.simdlen


def use_compiled_helpers() -> bool:
    """Whether eager code may use compiled helpers: yes unless ``LOWBIT_COMPILE_QUANT=0``, and
    never inside a graph being compiled."""
    # is_compiling first: traced, the environment lookup would become guards on os.environ
    return not torch.compiler.is_compiling() and os.environ.get("LOWBIT_COMPILE_QUANT", "1") != "0"


def disable_compiled_helpers() -> None:
    """Turn the compiled helpers off for this process (after a compilation failure)."""
    os.environ["LOWBIT_COMPILE_QUANT"] = "0"


def input_key(x: torch.Tensor) -> tuple:
    """What a compiled helper specialises on besides sizes: dtype, rank and layout."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return (x.dtype, x.dim(), cl)


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable, key: tuple) -> Callable:
    pin_vector_width()
    return torch.compile(fn, dynamic=True)


# Calling a compiled function costs 50–90 µs in dynamo's guards and wrappers whatever the input
# size; the eager ops cost a few µs each plus ~1 ns per element. Below this many elements (the
# time-embedding Linears' inputs, at 4×512 one per ResNet) eager is the faster of the two.
MIN_COMPILED_ELEMENTS = 1 << 14


def run_compiled(fn: Callable, x: torch.Tensor, *args, elementwise: bool = False) -> torch.Tensor:
    """``fn(x, *args)``, through its compiled version when the helpers are on. ``fn`` must be a
    hashable, long-lived callable (a module-level function or a ``functools.partial`` of one
    with hashable arguments): it is the cache key. ``elementwise=True`` (``fn`` treats every
    element alike and accepts 1-D input): without the helpers, eager code runs it in chunks
    (:func:`lowbit._chunked.map_chunked`), so that its temporaries stay small. Inputs of fewer
    than :data:`MIN_COMPILED_ELEMENTS` elements always run the eager code."""
    if use_compiled_helpers() and x.numel() >= MIN_COMPILED_ELEMENTS:
        try:
            return _compiled(fn, input_key(x))(x, *args)
        except Exception:  # no C++ compiler, unsupported platform: the eager code is exact too
            disable_compiled_helpers()
    if elementwise and not torch.compiler.is_compiling():  # traced, the plain form fuses
        return map_chunked(fn, x, *args)
    return fn(x, *args)

"""A ``torch.compile``-d model that skips dynamo's guard checks on calls it has already seen.

Every call of a compiled function first evaluates its *guards* — the checks that the cached
graph still applies (input shapes, strides and dtypes, grad mode, and one check per module
attribute and parameter the graph read). On the SD-like UNet that is thousands of checks, and
measured on the Zen 4 CPU (1 thread, W8A8 + compile, batch 4): 247 ms per denoising step with
the guards, 230 ms without — 7 % of the step, and a sampler repeats the same call every step.

PyTorch's ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)`` runs only the guards that
tell the cached graphs apart. It is "unsafe" because an input that needs a graph not yet
compiled would then run a wrong one. :class:`GuardSkipping` makes it safe for inference: it
keeps its own key of everything the guards check about a call (each tensor argument's shape,
stride, storage offset, dtype, device and requires_grad; grad/inference mode; the default
dtype; the module's train/eval flag) and skips the guards only for a key it has already called
with the full guards. A new key goes through the full guards (and compiles if needed) first.
What the key cannot see — a module mutated in place after the first call (a new attribute
value, a swapped submodule) — must not happen to a model being sampled: the skipped guards are
the ones that would have caught it, and the cached graph would run with the old value (checked
on torch 2.13: silently). Where dynamo itself notices that no cached graph fits, the call is
retried with the full guards. ``LOWBIT_SKIP_GUARDS=0`` turns the skipping off.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable

import torch
import torch._dynamo
from torch import nn

from ._compiled import pin_vector_width

__all__ = ["GuardSkipping", "call_key", "skipping_available"]


def skipping_available() -> bool:
    """Whether this PyTorch has the guard-skipping stance (2.6+) and ``LOWBIT_SKIP_GUARDS`` is
    not ``0``."""
    if os.environ.get("LOWBIT_SKIP_GUARDS", "1") == "0" or not hasattr(torch._dynamo, "set_stance"):
        return False
    # the signature, not a trial call: calling set_stance outside a `with` changes the stance
    return "skip_guard_eval_unsafe" in inspect.signature(torch._dynamo.set_stance).parameters


_UNKNOWN = object()  # marks an argument the key cannot describe


def _arg_key(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), a.stride(), a.storage_offset(), a.dtype, a.device, a.requires_grad)
    if isinstance(a, (tuple, list)):
        return (type(a).__name__, tuple(_arg_key(b) for b in a))
    if isinstance(a, dict):
        return ("D", tuple((k, _arg_key(v)) for k, v in sorted(a.items(), key=lambda kv: str(kv[0]))))
    if a is None or isinstance(a, (bool, int, float, str, torch.dtype, torch.device)):
        return (type(a).__name__, a)
    return _UNKNOWN  # something the key cannot describe: never skip the guards for it


def call_key(args: tuple, kwargs: dict, module: nn.Module | None = None) -> tuple | None:
    """What the guards of a static-shape compiled call depend on, as a hashable key; ``None``
    when an argument is of a kind the key cannot describe."""
    parts = (_arg_key(args), _arg_key(kwargs))
    if any(x is _UNKNOWN for x in _flatten(parts)):
        return None
    state = (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.get_default_dtype(),
             None if module is None else module.training)
    return parts + (state,)


def _flatten(x: Any):
    if isinstance(x, tuple):
        for y in x:
            yield from _flatten(y)
    else:
        yield x


class GuardSkipping:
    """``torch.compile(fn, **compile_kwargs)`` that skips the guards on calls whose
    :func:`call_key` it has seen (module docstring). ``fn``: a module or function."""

    def __init__(self, fn: Callable, **compile_kwargs: Any) -> None:
        pin_vector_width()  # keeps inductor's cache apart per vector ISA (lowbit._compiled)
        self.compiled = torch.compile(fn, **compile_kwargs)
        self.module = fn if isinstance(fn, nn.Module) else None
        self.seen: set = set()
        self.skipped = 0  # calls that ran without the full guards (tests read it)
        self.enabled = skipping_available()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = call_key(args, kwargs, self.module) if self.enabled else None
        if key is not None and key in self.seen:
            try:
                # torch._dynamo's set_stance, which torch.compiler.set_stance forwards to: the
                # forwarding itself was measured at 430 us per call, this one at 7 us
                with torch._dynamo.set_stance("default", skip_guard_eval_unsafe=True):
                    out = self.compiled(*args, **kwargs)
                self.skipped += 1
                return out
            except RuntimeError as e:
                # dynamo found no cached graph for the call and refuses to compile under this
                # stance: something the key does not see changed. Forget the key; full guards.
                if "skip_guard_eval_unsafe" not in str(e):
                    raise
                self.seen.discard(key)
        out = self.compiled(*args, **kwargs)
        if key is not None:
            self.seen.add(key)  # only after a successful call under the full guards
        return out

"""A loaded UNet wrapped for sampling the fast way: bf16 activations and/or ``torch.compile``.

``lowbit bench`` measures its fastest CPU configuration as a checkpoint loaded with
``dtype=torch.bfloat16`` (bf16 between the quantized layers) and the whole UNet under
``torch.compile`` (docs/performance*.md), its guards checked once per kind of call
(:mod:`lowbit._guards`). :func:`sampling_model` gives that configuration the ``model(x, t)``
interface the samplers call — float32 in, float32 noise prediction out — so that ``lowbit
evaluate`` and ``lowbit sample`` can score and draw exactly what the benchmark times.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .._guards import GuardSkipping
from ..errors import EvaluationError

__all__ = ["DTYPES", "sampling_model"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class _SamplingModel(nn.Module):
    def __init__(self, model: nn.Module, dtype: torch.dtype, compile: bool) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype
        # dynamic=False: the sampler's batches have one size (a smaller last batch is padded, see
        # _pad), and static shapes are what the benchmark measured; the guards are checked once
        # per kind of call, not every step (lowbit._guards: 7 % of an SD-like W8A8 step)
        self._fn = GuardSkipping(model, dynamic=False) if compile else model
        self.compiled = compile
        self.batch = 0  # the largest batch compiled so far

    def _pad(self, x: torch.Tensor, t: torch.Tensor, *extra) -> tuple:
        """A batch smaller than one already compiled, padded to that size with copies of its last
        sample: compiling the UNet again for the smaller shape took 10 s with inductor's cache
        warm and 57 s cold (bundled model, Zen 4), against about 1 s for computing the padding
        rows over 20 steps. The UNet computes each sample on its own (GroupNorm, attention and
        convolutions never mix samples in eval mode), so the real rows are unaffected but for
        the float rounding of kernels that block by batch size. ``t`` and the conditioning
        arguments (``extra``: class labels, embeddings) are padded alike where they have one
        row per sample. Returns (x, t, *extra, real rows)."""
        b = x.shape[0]
        if b >= self.batch:
            self.batch = b
            return (x, t, *extra, b)
        extra_rows = self.batch - b

        def pad(v):
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b:
                return torch.cat([v, v[-1:].expand(extra_rows, *v.shape[1:])])
            return v

        return (pad(x), pad(t), *map(pad, extra), b)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *extra) -> torch.Tensor:
        # t.clone(): the sampler's t is a view into the scheduler's timestep table at a new
        # storage offset each step, and a compiled model would recompile for every offset.
        # ``extra``: further model arguments (a class-conditional model's labels), passed as given
        args = (x.to(self.dtype), t.clone(), *extra)
        rows = x.shape[0]
        if self.compiled:
            *args, rows = self._pad(*args)
            try:
                with warnings.catch_warnings():
                    # dynamo notes every lru_cache it traces through in diffusers (is_torch_version): noise
                    warnings.filterwarnings("ignore", message=".*functools.lru_cache", category=UserWarning)
                    out = self._fn(*args)
            except Exception as e:  # no C++ compiler, an op inductor cannot lower: eager is exact too
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                              "sampling eagerly instead", stacklevel=2)
                self._fn, self.compiled = self.model, False
                out = self.model(*args)
        else:
            out = self._fn(*args)
        out = out.sample if hasattr(out, "sample") else out
        return out[:rows].float()


def sampling_model(model: nn.Module, dtype: "str | torch.dtype" = torch.float32, compile: bool = False) -> nn.Module:
    """``model`` behind the samplers' interface, run in ``dtype`` ("float32"/"bfloat16" or the
    torch dtype) and, with ``compile=True``, under ``torch.compile`` (compiled on the first batch;
    if compilation fails, a warning and eager sampling; repeated calls of the same kind skip
    dynamo's guard checks, so ``model`` must not be changed in place once sampling has begun:
    :mod:`lowbit._guards`; a batch smaller than one already compiled is padded to that size, which
    assumes the model computes each sample on its own, as diffusion UNets in eval mode do;
    arguments after ``(x, t)``, such as a class-conditional model's labels, are passed through and
    padded alike). ``model`` must already hold its float
    weights in ``dtype``: a checkpoint loaded with ``lowbit.load(..., dtype=...)``, or a float
    model moved with ``.to(dtype)``. Returns ``model`` itself when there is nothing to change."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise EvaluationError(f"unknown activation dtype {dtype!r}: use {' or '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise EvaluationError(f"unsupported activation dtype {dtype}: use torch.float32 or torch.bfloat16")
    if dtype == torch.float32 and not compile:
        return model
    return _SamplingModel(model, dtype, compile).eval()

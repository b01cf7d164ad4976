"""Range calibration: observers (min-max, percentile, MSE-optimal clipping) and ``calibrate``.

Activation ranges come from running the model on calibration inputs with every activation
quantizer in "observe" mode, then turning each observer's statistics into a scale/zero-point.
For diffusion models the inputs should be recorded along the FP sampler's trajectory at many
timesteps (Q-Diffusion / PTQ4DM): activation ranges drift strongly with t, so one timestep alone
calibrates badly. Weight ranges need no data; :func:`weight_range` computes them per channel or
per group directly from the weight.

MSE clipping searches a shrink factor alpha of the observed range that minimises the squared
quantization error; for minifloats this is the per-tensor exponent-bias search of Chen et al.
2024 (a scale is a continuous bias).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import CalibrationError, FormatError
from .formats import QFormat
from .quantizer import Quantizer, grouped, quant_dequant, scale_zero_from_range

OBSERVERS = ("minmax", "percentile", "mse")
_SAMPLE_CAP = 1 << 18  # values kept per quantizer for percentile/MSE (enough for 1e-4 tails)
_PER_BATCH = 1 << 14


def _check_observer(name: str) -> str:
    if name not in OBSERVERS:
        raise FormatError(f"unknown observer {name!r}: use one of {', '.join(OBSERVERS)}")
    return name


# Shrink factors tried by the MSE search: fine steps near 1 (Gaussian-like weights clip a little),
# then geometric steps down to 1 % (heavy-tailed activations want their rare outliers clipped hard).
_ALPHAS = torch.cat([torch.linspace(1.0, 0.3, 36), torch.logspace(-0.55, -2, 12)]).tolist()


def mse_clip(xg: torch.Tensor, fmt: QFormat, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink [lo, hi] (shape [C, ng]) by the factor in [0.01, 1] that minimises the per-group
    squared error of quantizing ``xg`` ([C, ng, G]); returns the best (lo, hi)."""
    best_err = torch.full(lo.shape, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for alpha in _ALPHAS:
        s, z = scale_zero_from_range(fmt, lo * alpha, hi * alpha)
        err = (quant_dequant(xg, s.unsqueeze(-1), z.unsqueeze(-1), fmt) - xg).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * alpha, best_lo)
        best_hi = torch.where(better, hi * alpha, best_hi)
    return best_lo, best_hi


def weight_range(w: torch.Tensor, q: Quantizer, observer: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel/per-group (lo, hi) of a weight for quantizer ``q`` using ``observer``."""
    _check_observer(observer)
    xg = grouped(w.detach().float(), q.scale_shape)
    lo, hi = xg.amin(-1), xg.amax(-1)
    if observer == "percentile":
        lo, hi = torch.quantile(xg, 0.0001, dim=-1), torch.quantile(xg, 0.9999, dim=-1)
    elif observer == "mse":
        lo, hi = mse_clip(xg, q.fmt, lo, hi)
    return lo, hi


class Observer:
    """Streaming statistics of one activation quantizer's inputs (per-tensor)."""

    def __init__(self, kind: str = "minmax", percentile: float = 0.9999, seed: int = 0) -> None:
        self.kind = _check_observer(kind)
        self.percentile = percentile
        self.lo = torch.tensor(float("inf"))
        self.hi = torch.tensor(float("-inf"))
        self.batches = 0
        self.samples: list[torch.Tensor] = []
        self._kept = 0
        self._gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor, label: str = "") -> None:
        """Record one input tensor; raises CalibrationError on NaN/Inf."""
        x = x.detach().float().flatten()
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise CalibrationError(
                f"NaN/Inf reached the input of {label or 'a quantized layer'} during calibration;"
                " remove non-finite values from the calibration data (or fix the model producing them)"
            )
        self.lo = torch.minimum(self.lo, x.min().cpu())
        self.hi = torch.maximum(self.hi, x.max().cpu())
        self.batches += 1
        if self.kind != "minmax":
            # a uniform random subsample per batch keeps memory bounded on big activations
            x = x.cpu()
            if x.numel() > _PER_BATCH:
                x = x[torch.randint(x.numel(), (_PER_BATCH,), generator=self._gen)]
            self.samples.append(x)
            self._kept += len(x)
            if self._kept > 2 * _SAMPLE_CAP:
                allv = torch.cat(self.samples)
                self.samples = [allv[torch.randperm(len(allv), generator=self._gen)[:_SAMPLE_CAP]]]
                self._kept = _SAMPLE_CAP

    def range(self, fmt: QFormat) -> tuple[torch.Tensor, torch.Tensor]:
        """The calibrated (lo, hi) for ``fmt``."""
        if self.kind == "minmax" or not self.samples:
            return self.lo, self.hi
        sample = torch.cat(self.samples)
        if self.kind == "percentile":
            return torch.quantile(sample, 1 - self.percentile), torch.quantile(sample, self.percentile)
        lo, hi = mse_clip(sample.view(1, 1, -1), fmt, self.lo.view(1, 1), self.hi.view(1, 1))
        return lo.view(()), hi.view(())


def activation_quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    """All enabled activation quantizers of a quantized model (name, module)."""
    from .nn import QuantModule  # local: nn imports calibration for weight ranges

    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantModule):
            for qname, q in mod.activation_quantizers():
                if q.enabled:
                    out.append((f"{name}.{qname}" if name else qname, q))
    return out


def _run_batch(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _check_finite_batch(batch: Any, i: int) -> None:
    tensors = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else [batch]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise CalibrationError(
                f"calibration batch {i} contains NaN/Inf values; remove or fix those samples before calibrating"
            )


def _drop_kernels(model: nn.Module) -> None:
    """Back to emulated compute: kernels bypass the quantizers (and their observers) and hold
    snapshots of the old scales."""
    for m in model.modules():
        if getattr(m, "kernel", None) is not None:
            if getattr(m, "codes_released", False):
                raise CalibrationError("this model's codes were released for inference; recalibrate the"
                                       " simulated model (or a checkpoint loaded with compute='emulated')")
            m.kernel = None
        if getattr(m, "fused_qkv", None) is not None:  # an attention processor's fused Q/K/V kernel
            m.fused_qkv = None


@torch.no_grad()
def calibrate(model: nn.Module, data: Iterable[Any] | None = None, *,
              forward_loop: Callable[[nn.Module], None] | None = None,
              observer: str | None = None, progress: bool = True) -> nn.Module:
    """Set every activation quantizer's range from calibration inputs.

    Pass either ``data`` — an iterable of batches; a tensor batch runs ``model(x)``, a tuple runs
    ``model(*x)`` and a dict ``model(**x)`` — or ``forward_loop(model)``, a function that runs
    the model however it needs (e.g. a whole sampler). ``observer`` overrides the per-layer
    choice from the plan (``minmax``, ``percentile`` or ``mse``). Returns the model.
    """
    if (data is None) == (forward_loop is None):
        raise CalibrationError("pass exactly one of data= (an iterable of inputs) or forward_loop= (a function)")
    quants = activation_quantizers(model)
    if not quants:
        return model  # weight-only plans need no activation ranges
    _drop_kernels(model)
    for name, q in quants:
        q.observer = Observer(observer or getattr(q, "observer_kind", "minmax"))
        q.label = name
    was_training = model.training
    model.eval()
    try:
        if forward_loop is not None:
            forward_loop(model)
        else:
            n = 0
            for i, batch in enumerate(tqdm(data, desc="calibrating", disable=None if progress else True, leave=False)):
                _check_finite_batch(batch, i)
                _run_batch(model, batch)
                n += 1
            if n == 0:
                raise CalibrationError("the calibration set is empty: pass at least one batch of inputs")
        unseen = [name for name, q in quants if q.observer.batches == 0]
        if len(unseen) == len(quants):
            raise CalibrationError("no quantized layer received any input during calibration; check forward_loop/data")
        for _, q in quants:
            if q.observer.batches:
                lo, hi = q.observer.range(q.fmt)
                q.set_range(lo, hi)
        if unseen:
            import warnings

            warnings.warn(
                f"{len(unseen)} activation quantizer(s) saw no calibration input and stay uncalibrated"
                f" (first: {unseen[0]}); they raise if run. Calibrate with inputs that reach them.",
                stacklevel=2,
            )
    finally:
        for _, q in quants:
            q.observer = None
        model.train(was_training)
    return model

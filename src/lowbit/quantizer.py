"""Quantizer: a number format applied with a scale (and zero-point) at a granularity.

One :class:`Quantizer` module turns a float tensor into a format's grid and back. It has two forms
with one explicit conversion between them:
  * simulated — :meth:`Quantizer.forward` fake-quantizes (quantize then dequantize in float). The
    rounding has a straight-through gradient and ``scale`` is an ``nn.Parameter``, so learned
    rounding, LSQ-style step-size learning and distillation can train through it;
  * stored — :meth:`Quantizer.encode` gives integer codes (uint8) and :meth:`Quantizer.decode`
    turns codes back into floats. ``decode(encode(x)) == forward(x)`` bit for bit.

Scales are laid out as ``[C, n_groups]``: the tensor is viewed as ``[C, n_groups, G]`` where axis
0 is the output channel (weights) and groups run along the flattened remaining dims, so one code
path serves per-tensor (1×1), per-channel (C×1) and per-group (C×K/G) scales.
Signed formats (intB, all minifloats) are symmetric: zero-point 0. Unsigned ints are asymmetric
with an integer zero-point, so that 0.0 (padding, ReLU/SiLU floors) stays exactly representable.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
from torch import nn

from ._chunked import quantize_chunked
from ._compiled import run_compiled, use_compiled_helpers
from .errors import CalibrationError, FormatError
from .formats import QFormat, round_minifloat_clamped

_MIN_SCALE = 1e-12  # an all-zero channel still gets a positive, finite scale


@dataclass(frozen=True)
class Granularity:
    """How many scales a tensor gets: one (``tensor``), one per output channel (``channel``), or
    one per group of ``group_size`` consecutive elements along the input dimension (``group``)."""

    kind: str
    group_size: int = 0

    @staticmethod
    def parse(spec: "str | Granularity") -> "Granularity":
        """Parse ``"tensor"``, ``"channel"`` or ``"group128"`` (also ``"group:128"``, ``"g128"``)."""
        if isinstance(spec, Granularity):
            return spec
        s = str(spec).strip().lower()
        if s in ("tensor", "per-tensor", "per_tensor"):
            return Granularity("tensor")
        if s in ("channel", "per-channel", "per_channel"):
            return Granularity("channel")
        m = re.fullmatch(r"(?:group|g)[:_]?(\d+)", s)
        if m and int(m.group(1)) > 0:
            return Granularity("group", int(m.group(1)))
        raise FormatError(f"unknown granularity {spec!r}: use 'tensor', 'channel' or 'groupN' (e.g. 'group64')")

    @property
    def name(self) -> str:
        return f"group{self.group_size}" if self.kind == "group" else self.kind

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """Shape ``[C, n_groups]`` of the scale for a tensor of ``shape``."""
        if self.kind == "tensor":
            return (1, 1)
        if len(shape) < 2:
            raise FormatError(f"granularity {self.name!r} needs a tensor with >= 2 dims, got shape {tuple(shape)}")
        c, k = shape[0], int(torch.Size(shape[1:]).numel())
        if self.kind == "channel":
            return (c, 1)
        if k % self.group_size:
            raise FormatError(
                f"group size {self.group_size} does not divide the input dimension {k} of a tensor of shape"
                f" {tuple(shape)}; pick a group size that divides {k}"
            )
        return (c, k // self.group_size)


def grouped(x: torch.Tensor, scale_shape: tuple[int, int]) -> torch.Tensor:
    """View ``x`` as ``[C, n_groups, G]`` matching a scale of ``scale_shape``."""
    c, ng = scale_shape
    return x.reshape(c, ng, -1)


class _RoundSTE(torch.autograd.Function):
    """Round onto the format grid; identity gradient (straight-through estimator)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, fmt: QFormat | None) -> torch.Tensor:  # type: ignore[override]
        return torch.round(y) if fmt is None else fmt.round(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def quant_dequant(xg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, fmt: QFormat, ste: bool = False) -> torch.Tensor:
    """The reference arithmetic of fake quantization on a ``[C, ng, G]`` view (``s``, ``z`` are
    ``[C, ng, 1]``); ``ste=True`` gives the rounding a straight-through gradient.

    Ints round first and add the integer zero-point after: adding it before rounding would let
    float32 absorb low fraction bits of x/s and round twice. x·(1/s) (not x/s) matches PyTorch's
    fused fake-quant kernels bit for bit. The clamp gives zero gradient outside the range (LSQ).
    """
    if fmt.kind == "int":
        # clamping to integer bounds before rounding gives the same values as after, and the
        # zero gradient for every x/s outside the range
        y = torch.clamp(xg * (1.0 / s), fmt.min_value - z, fmt.max_value - z)
        q = (_RoundSTE.apply(y, None) if ste else torch.round(y)) + z
    else:
        y = torch.clamp(xg / s, fmt.min_value, fmt.max_value)
        q = _RoundSTE.apply(y, fmt) if ste else fmt.round(y)
    return (q - z) * s


def scale_zero_from_range(fmt: QFormat, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point that map the real range [lo, hi] onto ``fmt``.

    Symmetric formats cover ±max(|lo|, |hi|) with zero-point 0; unsigned ints cover [lo, hi]
    widened to include 0, with an integer zero-point so that 0.0 is exactly representable.
    """
    lo, hi = lo.float(), hi.float()
    if fmt.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = torch.clamp(amax / fmt.max_value, min=_MIN_SCALE)
        return scale, torch.zeros_like(scale)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / fmt.max_value, min=_MIN_SCALE)
    zero = torch.clamp(torch.round(-lo / scale), 0, fmt.max_value)
    return scale, zero


class Quantizer(nn.Module):
    """Fake-quantizes (simulated form) or encodes/decodes (stored form) tensors in one format.

    ``shape`` is the tensor shape for per-channel/per-group scales (weights); activation
    quantizers use ``granularity='tensor'`` and accept any input shape. ``fmt=None`` is a no-op.
    """

    def __init__(self, fmt: QFormat | None, granularity: "str | Granularity" = "tensor",
                 shape: tuple[int, ...] | None = None, device: "torch.device | str | None" = None) -> None:
        super().__init__()
        self.fmt = fmt
        self.granularity = Granularity.parse(granularity)
        if self.granularity.kind != "tensor" and shape is None:
            raise FormatError(f"granularity {self.granularity.name!r} needs the tensor shape (weights only)")
        self.scale_shape = self.granularity.scale_shape(tuple(shape)) if shape is not None else (1, 1)
        self.scale = nn.Parameter(torch.ones(self.scale_shape, device=device))
        self.register_buffer("zero", torch.zeros(self.scale_shape, device=device))
        # Saved with the state so that a loaded model knows its ranges are real.
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool, device=device))
        # the exact fast minifloat rounding for this format, looked up here (a cached function
        # called inside a compiled graph is a hazard); None for ints and formats without one
        self._fp_fast = _fp_qdq_fn(fmt) if fmt is not None and fmt.kind == "fp" else None
        self.observer = None  # set by lowbit.calibrate while observing
        self.label = ""  # the owning layer's name, for error messages

    def extra_repr(self) -> str:
        return f"{self.fmt}, {self.granularity.name}" if self.fmt else "off"

    @property
    def enabled(self) -> bool:
        return self.fmt is not None

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set scale/zero so that [lo, hi] (shape ``scale_shape`` or scalar) maps onto the grid."""
        scale, zero = scale_zero_from_range(self.fmt, lo, hi)
        with torch.no_grad():
            self.scale.copy_(scale.expand(self.scale_shape))
            self.zero.copy_(zero.expand(self.scale_shape))
            self.calibrated.fill_(True)

    def _check_ready(self) -> None:
        if not bool(self.calibrated):
            raise CalibrationError(
                f"quantizer {self.label or '(unnamed)'} has no range yet: run lowbit.calibrate(model, data)"
                " (or pass calib= to lowbit.quantize) before running the model"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Simulated form: quantize-dequantize ``x`` (observe it instead while calibrating)."""
        if self.fmt is None:
            return x
        if self.observer is not None:
            self.observer.update(x, self.label)
            return x
        compiling = torch.compiler.is_compiling()
        if not compiling:  # bool(tensor) would break a torch.compile graph; eager runs check it
            self._check_ready()
        # under torch.compile the reference arithmetic is plain elementwise ops that inductor fuses
        # into neighbouring kernels; the fused eager kernels below are opaque to it
        inference = not (torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad))
        if inference and not compiling:
            fast = self._fast_forward(x)
            if fast is not None:
                return fast
        elif inference and self._fp_fast is not None and self.scale_shape == (1, 1):
            # compiled minifloat (attention operands): the same values by the exact fast rounding,
            # which inductor vectorises; fmt.round's bitcasts/copysign compile to scalar loops
            # (bundled FP8 compiled: ~20 ms of a ~210 ms step went to these quantizers)
            return self._fp_fast(x, self.scale.reshape(()).float())
        xg = grouped(x, self.scale_shape)
        out = quant_dequant(xg, self.scale.unsqueeze(-1), self.zero.unsqueeze(-1), self.fmt, ste=True)
        return out.reshape(x.shape).to(x.dtype)

    def _fast_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Single-kernel inference paths, bit-identical to the reference arithmetic (tested):
        per-tensor ints as one compiled loop (in chunks with no full-size temporaries when the
        compiled helpers are off), per-channel/group ints PyTorch's
        fused fake-quant; for minifloats the exact fast rounding
        (:meth:`QFormat.round_clamped`), compiled into one loop for per-tensor scales."""
        fmt, (c, ng) = self.fmt, self.scale_shape
        if fmt.kind == "int":
            s = self.scale.detach().reshape(-1).float().contiguous()
            z = self.zero.detach().reshape(-1).to(torch.int32).contiguous()
            lo, hi = int(fmt.min_value), int(fmt.max_value)
            if c * ng == 1:  # activations: no full-size temporaries (see lowbit._chunked)
                s0, z0 = s.reshape(()), z.reshape(()).float()
                if use_compiled_helpers():  # one loop writing only the output: faster, as lean
                    params = torch.stack([1.0 / s0, lo - z0, hi - z0, s0])
                    return run_compiled(_int_qdq, x, params, elementwise=True)
                return quantize_chunked(x, 1.0 / s0, lo - z0, hi - z0, mul=s0)
            y = torch.fake_quantize_per_channel_affine(x.float().reshape(c * ng, -1), s, z, 0, lo, hi)
            return y.reshape(x.shape).to(x.dtype)
        if c * ng == 1 and _fp_qdq_fn(fmt) is not None:  # per tensor (activations): one compiled loop
            return run_compiled(_fp_qdq_fn(fmt), x, self.scale.detach().reshape(()).float(), elementwise=True)
        xg = grouped(x.float(), self.scale_shape)
        s = self.scale.detach().unsqueeze(-1)
        y = fmt.round_clamped(torch.clamp(xg / s, fmt.min_value, fmt.max_value))
        return (y * s).reshape(x.shape).to(x.dtype)


    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Stored form: integer codes (uint8, same shape as ``x``)."""
        self._check_ready()
        xg = grouped(x.float(), self.scale_shape)
        s, z, fmt = self.scale.unsqueeze(-1), self.zero.unsqueeze(-1), self.fmt
        if fmt.kind == "int":
            q = torch.clamp(torch.round(xg * (1.0 / s)) + z, fmt.min_value, fmt.max_value)
        else:
            q = torch.clamp(xg / s, fmt.min_value, fmt.max_value)
        return fmt.encode(q).reshape(x.shape)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Float values of stored codes; equals the simulated output bit for bit."""
        q = grouped(self.fmt.decode(codes), self.scale_shape)
        return ((q - self.zero.unsqueeze(-1)) * self.scale.unsqueeze(-1)).reshape(codes.shape)


def _int_qdq(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    # per-tensor INT quantize-dequantize, params = [1/s, lo - z, hi - z, s] (float32 tensor
    # inputs, so one compiled kernel serves every quantizer): lowbit._chunked's arithmetic in one
    # pass. Eager attention operands of the SD-like W8A8 model took ~15 ms of a ~265 ms step in
    # 64K-element chunks (12M elements per step), a few ms as one compiled loop.
    return (torch.clamp(x.float() * params[0], params[1], params[2]).round() * params[3]).to(x.dtype)


def _fp_qdq(x: torch.Tensor, s: torch.Tensor, lo: float, hi: float, fast: tuple) -> torch.Tensor:
    # the reference arithmetic of quant_dequant for a minifloat with per-tensor scale s (0-dim);
    # plain numbers only (format properties read inside a compiled graph would break it)
    return (round_minifloat_clamped(torch.clamp(x.float() / s, lo, hi), *fast) * s).to(x.dtype)


@functools.lru_cache(maxsize=None)
def _fp_qdq_fn(fmt: QFormat):
    # one callable per format (run_compiled caches compiled versions by it); None: no fast form
    fast = fmt.fast_round_args()
    return None if fast is None else functools.partial(_fp_qdq, lo=fmt.min_value, hi=fmt.max_value, fast=fast)

"""bf16 compute for formats without an integer kernel: FP8/FP6/FP4 minifloats and weight-only INT.

There is no fast FP8 arithmetic on CPU (``torch._scaled_mm`` runs but is slower than fp32, and
there is no fp8 convolution; ``DESIGN.md``), while bf16 convolution and matmul run 2–3× faster
than fp32 on AVX-512 BF16 hardware. So minifloat layers keep their 1-byte codes on disk and
compute in bf16 with the *unscaled* format values:

    y[c] = s_x · s_w[c] · Σ (x/s_x)_q · w_q[c]  +  bias[c]

Every value of an ExMy format with at most 7 mantissa bits, and every integer of at most 8 bits,
is exactly representable in bf16, so the activations are exact and oneDNN accumulates in float32. The
per-channel weight scale and the activation scale are folded into the bf16 weight, so each layer
is a single bf16 convolution/GEMM with its bias; that rounds each scaled weight and each output to
bf16 (relative error ≤ 2⁻⁸, far below any 8-bit format's step). Folding needs one scale per
output channel, so group-wise weights stay emulated.

Weight-only layers (``w4a16``: no activation quantizer) run the same way with the input cast to
bf16 — the "16-bit activations" the recipe names.

On a CPU whose oneDNN has no bf16 kernels (AVX2 only, e.g. AMD Zen 3) PyTorch falls back to a
reference bf16 convolution 60× slower than fp32 (measured: 1.59 s against 25 ms), and oneDNN's
weight reorder refuses outright; :func:`cpu_bf16_available` says so and these layers stay emulated.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..errors import FormatError
from .._compiled import run_compiled
from ..formats import round_minifloat_clamped
from . import onednn
from .._platform import trim_heap

__all__ = ["Bf16Kernel", "cpu_bf16_available", "exact_in_bf16"]


@functools.lru_cache(maxsize=1)
def cpu_bf16_available() -> bool:
    """True if oneDNN runs bf16 convolutions and matmuls on this CPU (AVX-512 BW/VL/DQ,
    AVX-NE-CONVERT or AMX): PyTorch's own check, the one its bf16 weight reorder enforces."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def exact_in_bf16(fmt) -> bool:
    """True if every value of ``fmt`` (unscaled) is a bf16 number (checked on the value table:
    mantissa width alone is not enough — a large exponent bias can push values below bf16's range)."""
    if fmt.kind == "int":
        return fmt.bits <= 8  # |v| <= 255 needs 8 significant bits; bf16 has 8
    v = fmt.values().float()
    return bool(torch.equal(v.to(torch.bfloat16).float(), v))


def _values_eager(x: torch.Tensor, params: torch.Tensor, fmt, fast: tuple | None,
                  nhwc: bool = False) -> torch.Tensor:
    # params = [s, lo, hi, zero] (float32). INT: (code − zero) = round(clamp(x·(1/s), lo, hi));
    # FP: clamp(x/s, lo, hi) rounded onto the minifloat grid — the Quantizer's own arithmetic.
    # ``fast`` = fmt.fast_round_args(), computed outside: reading format properties inside a
    # compiled graph would break it.
    s, lo, hi = params[0], params[1], params[2]
    if fmt.kind == "int":
        v = torch.clamp(x.float() * (1.0 / s), lo, hi).round_()
    else:
        v = torch.clamp(x.float() / s, lo, hi)
        v = round_minifloat_clamped(v, *fast) if fast is not None else fmt.round(v)
    v = v.to(torch.bfloat16)
    # a convolution's input goes NHWC (oneDNN's fast bf16 layout) in the same pass; a Linear's
    # contiguous (inductor would keep a transposed input's strides, and F.linear on those runs
    # as copies and bmm: SD-like FP8 eager 458 -> 500 ms per step)
    # (1-D: a chunk of lowbit._chunked.map_chunked, laid out by the caller)
    if v.dim() != 4:
        return v.contiguous()
    return v.contiguous(memory_format=torch.channels_last) if nhwc else v.contiguous()


@functools.lru_cache(maxsize=None)
def _values_fn(fmt, nhwc: bool):
    # one callable per format and layout: run_compiled caches its compiled versions by this object
    return functools.partial(_values_eager, fmt=fmt, fast=fmt.fast_round_args(), nhwc=nhwc)


def _fold_scales(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``bf16(values[c] · scale[c])`` per output channel ``c``, the product in float64 (PyTorch
    casts it to bf16 through float32). A few channels at a time, same values as the whole-weight
    product: float64 copies of a whole weight (8 bytes per weight, twice over with the product)
    made the transient peak of loading an SD-like FP8 checkpoint."""
    out = torch.empty(values.shape, dtype=torch.bfloat16, device=values.device)
    per_channel = max(1, values[0].numel()) if len(values) else 1
    step = max(1, (1 << 16) // per_channel)
    bshape = (-1,) + (1,) * (values.dim() - 1)
    for i in range(0, len(values), step):
        out[i:i + step] = values[i:i + step].double().mul_(scale[i:i + step].reshape(bshape))
    return out


class _ActValues:
    """Unscaled format values of an activation quantizer, as bf16. In a compiled model the
    arithmetic fuses into the kernel that computes the activation (GroupNorm, SiLU); in eager
    models it is one compiled helper (:mod:`lowbit._compiled`)."""

    def __init__(self, fmt, scale: float, zero: float, device: "torch.device | str | None" = None) -> None:
        if not exact_in_bf16(fmt):
            raise FormatError(f"{fmt.name} activations are not exact in bf16; use the emulated path")
        self.fmt = fmt
        # bounds read once here: computing them inside a compiled graph would break it
        lo, hi = (fmt.min_value - zero, fmt.max_value - zero) if fmt.kind == "int" else (fmt.min_value, fmt.max_value)
        # on the layer's device, like its weights
        self.params = torch.tensor([float(scale), lo, hi, float(zero)], dtype=torch.float32).to(device)
        # looked up now, not per call: a cached function called inside torch.compile is a hazard
        self.fns = {nhwc: _values_fn(fmt, nhwc) for nhwc in (False, True)}

    def __call__(self, x: torch.Tensor, nhwc: bool = False) -> torch.Tensor:
        """The values of ``x`` (bf16); ``nhwc``: in channels-last layout (4-D inputs)."""
        # (an earlier version looked minifloats up in a 65,536-entry table by bf16 bit pattern;
        # the gather had to stay an opaque operator, unfused, and cost the bundled FP8 compiled
        # step 256-275 ms against 233 ms for the fused arithmetic)
        v = run_compiled(self.fns[nhwc], x, self.params, elementwise=True)
        # (eager chunks come back in x's layout; a no-op otherwise)
        return v.contiguous(memory_format=torch.channels_last) if nhwc and v.dim() == 4 else v


class Bf16Kernel:
    """``linear`` or ``conv2d`` in bf16: activations as exact unscaled format values, weights as
    ``bf16(w_q · s_w[c] · s_x)`` — the scales folded into the weight so that the whole layer is
    one bf16 GEMM/convolution with its bias (one rounding of each weight to bf16, relative error
    ≤ 2⁻⁸, beside the output's; both far below an 8-bit format's step).

    ``w_values`` are the unscaled weight values ``[O, ...]`` (``decode(codes) − zero``),
    ``w_scale`` ``[O]``; ``act`` is ``(fmt, scale, zero)`` or ``None`` for weight-only layers;
    ``conv`` the ``(stride, padding, dilation, groups)`` of a convolution or ``None`` for linear."""

    path = "bf16"

    def __init__(self, w_values: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 act: tuple | None, conv: tuple | None = None) -> None:
        self.act = _ActValues(*act, device=w_values.device) if act is not None else None
        s_x = float(act[1]) if act is not None else 1.0
        self.w = _fold_scales(w_values, w_scale.reshape(-1).double() * s_x)
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)
        self.conv = conv
        self.packed_for, self.kid = None, None
        if conv is not None:
            self.w = self.w.contiguous(memory_format=torch.channels_last)
            if self.w.device.type == "cpu" and cpu_bf16_available():
                # laid out for oneDNN on the first call, for its input shape (see repack_for)
                self.kid = onednn.register(self)

    def repack_for(self, shape: tuple) -> None:
        """Lay the bf16 weight out for convolution inputs of ``shape``, as the int8 kernels do: a
        plain weight is re-laid out by oneDNN on every call (51 reorders, 21 ms, 4.6 % of an
        SD-like FP8 step)."""
        if self.packed_for != shape:
            (stride, padding, dilation, groups), w = self.conv, self.w
            w = w.to_dense() if w.is_mkldnn else w
            self.w = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), list(padding), list(stride),
                                                              list(dilation), groups, list(shape))
            del w
            self.packed_for = shape
            trim_heap()

    def run(self, v: torch.Tensor, nhwc: bool) -> torch.Tensor:
        """oneDNN's bf16 convolution with the packed weight on NHWC bf16 values ``v`` (CPU)."""
        self.repack_for(tuple(v.shape))
        stride, padding, dilation, groups = self.conv
        y = torch.ops.mkldnn._convolution_pointwise(v.contiguous(memory_format=torch.channels_last), self.w,
                                                    self.bias, list(padding), list(stride), list(dilation), groups,
                                                    "none", [], "")
        return y if nhwc else y.contiguous()

    def fake(self, v: torch.Tensor, nhwc: bool) -> torch.Tensor:
        """Output shape/layout of :meth:`run` (for ``torch.compile``)."""
        return onednn.conv_output_like(v, self.w.shape[0], tuple(self.w.shape[2:]), self.conv, torch.bfloat16, nhwc)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        nhwc = self.conv is not None
        v = self.act(x, nhwc) if self.act is not None else x.to(torch.bfloat16)
        if self.conv is None:
            y = F.linear(v, self.w, self.bias)
        elif self.kid is not None:  # (compiled, the consumer reads the NHWC output in place)
            y = onednn.run_op(v.contiguous(memory_format=torch.channels_last), self.kid,
                              torch.compiler.is_compiling())
        else:
            # oneDNN's NHWC bf16 convolution is the fast one; the output goes back to NCHW, as
            # Int8Conv2dKernel's does (NHWC GroupNorm downstream is far slower)
            y = F.conv2d(v.contiguous(memory_format=torch.channels_last), self.w, self.bias, *self.conv)
            if not torch.compiler.is_compiling():  # (compiled, the consumer reads NHWC in place)
                y = y.contiguous()
        return y.to(x.dtype)  # bf16 in a bf16 model, float32 otherwise

"""Native W8A8 Conv2d and Linear on CPU through oneDNN's integer primitives.

PyTorch ships oneDNN's int8 convolution and matmul as plain-tensor operators
(``torch.ops.onednn.qconv2d_pointwise`` / ``qlinear_pointwise`` with their ``*_prepack``
companions); they are what PyTorch's own PT2E ``X86InductorQuantizer`` lowers to, and on the
measured Zen4 CPU they run 8–10× faster than the fp32 convolution they replace (``DESIGN.md``).
We call them on ordinary uint8/int8 tensors — never PyTorch's deprecated quantized tensors — with

* activations: uint8 codes with a per-tensor scale ``s_x`` and zero-point ``z_x``. lowbit's
  activation quantizers may be any INT format up to 8 bits (uint8, int8, uint4, ...); every one
  maps onto uint8 codes exactly (signed codes are shifted by 128 together with their zero-point),
  so the kernel computes the same integers as the simulated layer;
* weights: int8 codes, symmetric, one scale per output channel (int4 codes are widened to int8 —
  the values are unchanged — which is how W4A8 runs: packed int4 on disk, int8 in memory);
* the epilogue ``acc · s_x · s_w[c] + bias[c]`` fused inside oneDNN, output float32 (or bf16
  when the model runs bf16 activations between its quantized layers).

The activation quantization ``clamp(round(x · (1/s_x)), lo − z, hi − z) + z`` is the same
arithmetic as :func:`lowbit.quantizer.quant_dequant`. In eager PyTorch it costs four passes over
the tensor — more than the int8 convolution itself — so it runs as one ``torch.compile``-d kernel
when a C++ compiler is available (it is also fused into the preceding GroupNorm/SiLU when the
whole model is compiled). ``LOWBIT_COMPILE_QUANT=0`` turns that off.
"""

from __future__ import annotations

import functools
import itertools
import weakref

import torch

from .._chunked import quantize_chunked
from .._platform import trim_heap
from .._compiled import disable_compiled_helpers, input_key, run_compiled, use_compiled_helpers
from ..errors import FormatError
from . import vnni

__all__ = ["Int8Conv2dKernel", "Int8LinearKernel", "available", "disable_compiled_helpers", "quantize_u8",
           "use_compiled_helpers", "input_key"]

_NO_POSTOP: list = []

# Kernels by id, for the custom operator below. ``torch.compile`` treats the operator as an
# opaque call (inductor would otherwise insist on lowering oneDNN's ops itself, which needs the
# prepacked weight frozen into the graph as a constant) while still fusing the activation
# quantization into whatever elementwise work precedes it (GroupNorm, SiLU).
_REGISTRY: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_IDS = itertools.count()


def register(kernel) -> int:
    """Enter ``kernel`` (an object with ``run(x, nhwc)`` and ``fake(x, nhwc)``) in the registry
    of :func:`run_op`; returns its id. (:mod:`.int8_attention`'s operator keeps its kernels here
    too: one id space.)"""
    kid = next(_IDS)
    _REGISTRY[kid] = kernel
    return kid


# Defined through ``torch.library.define``/``impl`` rather than the ``custom_op`` decorator:
# ``custom_op`` wraps each call in Python autograd and aliasing checks, measured 20 µs per call
# against 4 µs (112 calls per SD-like step: ~2 ms, 1 % of a compiled W8A8 step). The codes are
# uint8 and never need gradients, so nothing is lost.
torch.library.define("lowbit::onednn_run", "(Tensor codes, int kid, bool nhwc) -> Tensor")


@torch.library.impl("lowbit::onednn_run", "CPU")
def _run_cpu(codes: torch.Tensor, kid: int, nhwc: bool) -> torch.Tensor:
    return _REGISTRY[kid].run(codes, nhwc)


@torch.library.register_fake("lowbit::onednn_run")
def _run_fake(codes: torch.Tensor, kid: int, nhwc: bool) -> torch.Tensor:
    return _REGISTRY[kid].fake(codes, nhwc)


def run_op(codes: torch.Tensor, kid: int, nhwc: bool) -> torch.Tensor:
    """One opaque operator for every oneDNN kernel: ``kid`` picks the kernel (conv or linear);
    ``nhwc``: a convolution returns oneDNN's NHWC output as is (else NCHW)."""
    return torch.ops.lowbit.onednn_run.default(codes, kid, nhwc)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True if this PyTorch build has oneDNN's int8 conv/linear operators and the CPU runs them
    exactly (directly, or with split weights where it lacks VNNI: :mod:`.vnni`)."""
    try:
        ops = torch.ops.onednn
        _ = (ops.qconv2d_pointwise, ops.qconv_prepack, ops.qlinear_pointwise, ops.qlinear_prepack)
    except (AttributeError, RuntimeError):
        return False
    if not torch.backends.mkldnn.is_available() or torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return False
    return vnni.pair_limit() != 0


def conv_output_like(x: torch.Tensor, out_channels: int, kernel_size: tuple, args: tuple, dtype: torch.dtype,
                     nhwc: bool) -> torch.Tensor:
    """An empty tensor shaped like a convolution's output for input ``x`` (``args`` =
    ``(stride, padding, dilation, groups)``), NHWC if ``nhwc``: the fake kernels' answer."""
    n, _, h, w = x.shape
    (sh, sw), (ph, pw), (dh, dw), _ = args
    kh, kw = kernel_size
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return torch.empty((n, out_channels, ho, wo), dtype=dtype, device=x.device,
                       memory_format=torch.channels_last if nhwc else torch.contiguous_format)


def _quantize_plain(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    # params = [1/s, lo, hi, zero] as a float32 tensor: as tensor *inputs* one compiled kernel
    # serves every layer (Python floats would be specialised, one recompile per layer).
    # Clamp before rounding (as quant_dequant does): the same codes, and no overflow for huge x.
    # float32 first: a bf16 input times a 0-dim float32 tensor would stay bf16 and round x·(1/s)
    # early. This is the form torch.compile fuses into one loop (the helper, or the whole model).
    inv_scale, lo, hi, zero = params[0], params[1], params[2], params[3]
    return torch.clamp(x.float() * inv_scale, lo, hi).round().add(zero).to(torch.uint8)


def _quantize_eager(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    # the same arithmetic in chunks through one small float32 buffer (lowbit._chunked): eager,
    # the full-size float32 temporaries fragmented the heap and raised sampling's peak RSS
    inv_scale, lo, hi, zero = params[0], params[1], params[2], params[3]
    return quantize_chunked(x, inv_scale, lo, hi, add=zero, out_dtype=torch.uint8)


def _quantize_nhwc(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    # the codes written channels-last by the quantizing loop itself: converting them afterwards
    # is a separate strided copy, which PyTorch runs at ~1 ns per element (measured: 4×128×32×32
    # bf16 input, 0.95 ms as quantize + conversion, 0.53 ms as this one compiled kernel)
    return _quantize_plain(x, params).contiguous(memory_format=torch.channels_last)


def _contiguous(y: torch.Tensor) -> torch.Tensor:
    return y.contiguous()


# below this many elements PyTorch's own strided copy was as fast as the compiled one
_COMPILED_COPY_MIN = 1 << 18


def to_nchw(y: torch.Tensor) -> torch.Tensor:
    """``y.contiguous()``: an NHWC convolution output in the NCHW layout of an eager model around
    it, through a compiled copy for large tensors when the compiled helpers are on (inductor
    tiles the transpose: 4×128×32×32 bf16, 0.35 against 0.67 ms; same values)."""
    if y.is_contiguous() or y.numel() < _COMPILED_COPY_MIN or not use_compiled_helpers():
        return y.contiguous()
    return run_compiled(_contiguous, y)


def quantize_u8(x: torch.Tensor, params: torch.Tensor, compiled: bool | None = None) -> torch.Tensor:
    """uint8 activation codes ``clamp(x · inv_scale, lo, hi).round() + zero`` where ``params`` is
    the float32 tensor ``[inv_scale, lo, hi, zero]``; ``lo``/``hi`` are the format bounds minus
    the zero-point (so ``lo + zero >= 0`` and ``hi + zero <= 255``). ``compiled=None`` uses the compiled kernel unless the environment
    variable ``LOWBIT_COMPILE_QUANT`` is ``0``. Codes are identical either way (tested)."""
    if torch.compiler.is_compiling():  # inside a compiled model: plain ops, fused by inductor
        return _quantize_plain(x, params)
    if compiled is None:
        compiled = use_compiled_helpers()
    return run_compiled(_quantize_plain, x, params) if compiled else _quantize_eager(x, params)


class _ActCodes:
    """How an activation quantizer's codes map onto oneDNN's uint8 input."""

    def __init__(self, fmt, scale: float, zero: float) -> None:
        if fmt.kind != "int" or fmt.bits > 8:
            raise FormatError(f"native int8 needs an INT activation format of at most 8 bits, got {fmt.name}")
        offset = 128 if fmt.signed else 0  # signed codes [-128, 127] -> uint8 [0, 255]
        self.scale = float(scale)
        self.inv_scale = float(1.0 / torch.tensor(scale, dtype=torch.float32))  # as Quantizer does
        self.lo = float(fmt.min_value - zero)
        self.hi = float(fmt.max_value - zero)
        self.zero = int(zero) + offset  # codes = round(clamp(...)) + zero lie in [min, max] + offset ⊂ [0, 255]
        self.max_code = int(self.hi) + self.zero
        self.params = torch.tensor([self.inv_scale, self.lo, self.hi, self.zero], dtype=torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_u8(x, self.params)

    def nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """The codes of 4-D ``x`` laid out channels-last (what oneDNN's convolution reads), in
        one compiled pass when the helpers are on; otherwise in ``x``'s layout (the kernel
        converts them)."""
        if use_compiled_helpers():
            return run_compiled(_quantize_nhwc, x, self.params)
        return quantize_u8(x, self.params, compiled=False)


def _check_weight(codes: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    if codes.dtype != torch.int8:
        raise FormatError(f"weight codes must be int8 values, got {codes.dtype}")
    return w_scale.reshape(-1).float().contiguous()


class Int8Conv2dKernel:
    """W8A8 ``conv2d`` on oneDNN; call it with the float input, get the float32 output.

    oneDNN computes in NHWC, but the output is returned NCHW, the layout of the model around it:
    eager GroupNorm on NHWC bf16 with few channels runs far slower than on NCHW (24 channels:
    12 ms vs 0.5 ms), which costs more than the conversion. (The layout is fixed, not the
    input's: under ``torch.compile`` inductor may pick a different layout for the codes than
    the fake kernel saw.)

    ``w_int8`` holds the integer weight values ``[O, I/groups, kh, kw]``, ``w_scale`` ``[O]``,
    ``act_fmt``/``act_scale``/``act_zero`` the input quantizer. Zero padding only (the layer pads
    other modes itself)."""

    path = "native int8 (oneDNN)"  # split weights (.split, lowbit.kernels.vnni) are the same path

    def __init__(self, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 act_fmt, act_scale: float, act_zero: float, stride, padding, dilation, groups: int,
                 out_dtype: torch.dtype = torch.float32) -> None:
        self.out_dtype = out_dtype
        self.w_scale = _check_weight(w_int8, w_scale)
        self.act = _ActCodes(act_fmt, act_scale, act_zero)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.args = (list(stride), list(padding), list(dilation), int(groups))
        self.w_zero = torch.zeros(w_int8.shape[0], dtype=torch.int64)
        self.out_channels, self.kernel_size = w_int8.shape[0], tuple(w_int8.shape[2:])
        self.split = vnni.needs_split(w_int8, self.act.max_code)  # no VNNI: exact only as two halves
        # packed on the first call, for its input shape (see repack_for); until then the int8
        # values are the only copy. Packing once at load and again per shape left the first
        # weight's freed pages resident (SD-like W4A8 sampling peak: see docs/performance.md).
        self.packed, self.packed_for = w_int8.clone(memory_format=torch.contiguous_format), None
        self.kid = register(self)

    def _prepack(self, w_int8: torch.Tensor, x_shape: list | None) -> torch.Tensor:
        return torch.ops.onednn.qconv_prepack(w_int8, self.w_scale, self.act.scale, self.act.zero, *self.args,
                                              x_shape)

    def weight_int8(self) -> torch.Tensor:
        """The integer weight values ``[O, I/groups, kh, kw]`` (before the first call the kernel's
        own tensor, after it a copy out of the packed weight)."""
        if self.packed_for is None:
            return self.packed
        w = self.packed.to_dense()
        return vnni.unsplit_weight(w) if self.split else w

    def repack_for(self, shape: tuple) -> None:
        """Re-lay the packed weight for inputs of ``shape``. oneDNN's convolution picks its weight
        blocking from the whole problem (batch and spatial size too); a weight packed for another
        shape is re-laid out on *every* call — measured 1 ms per 512×512×3×3 conv at 8×8, 5 % of an
        SD-like step. The input shape is only known at run time, so the first call with a new
        shape repacks (from the packed weight itself, which is the only copy once a model's codes
        are released: ``to_dense`` gives back the exact int8 values)."""
        if self.packed_for != shape:
            if self.packed_for is not None:
                w_int8 = self.packed.to_dense()  # already split where the kernel splits
            else:
                w_int8 = vnni.split_weight(self.packed) if self.split else self.packed
            x_shape = list(shape)
            if self.split:
                x_shape[1] *= 2
            self.packed, self.packed_for = self._prepack(w_int8, x_shape), shape
            del w_int8
            trim_heap()  # the old weight is freed: give its pages back (W4A8 SD-like: 192 -> 180 MB)

    def run(self, codes: torch.Tensor, nhwc: bool = False) -> torch.Tensor:
        """The oneDNN call on uint8 codes (any layout; oneDNN wants NHWC, converting the codes
        is 4× cheaper than converting the float input). Output NCHW unless ``nhwc``."""
        self.repack_for(tuple(codes.shape))
        q = codes.contiguous(memory_format=torch.channels_last)
        if self.split:
            q = vnni.duplicate_channels(q, self.args[3])
        y = torch.ops.onednn.qconv2d_pointwise(q, self.act.scale, self.act.zero, self.packed, self.w_scale,
                                                self.w_zero, self.bias, *self.args, 1.0, 0, self.out_dtype,
                                                "none", _NO_POSTOP, "")
        return y if nhwc else to_nchw(y)

    def fake(self, codes: torch.Tensor, nhwc: bool = False) -> torch.Tensor:
        """Output shape/layout of :meth:`run` (for ``torch.compile``)."""
        return conv_output_like(codes, self.out_channels, self.kernel_size, self.args, self.out_dtype, nhwc)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # in a compiled model inductor writes the codes NHWC inside the kernel that computes
            # them and reads the NHWC output inside the kernel that consumes it: no copies
            y = run_op(self.act(x).contiguous(memory_format=torch.channels_last), self.kid, True)
        else:
            y = run_op(self.act.nhwc(x), self.kid, False)
        return y if x.dtype == self.out_dtype else y.to(x.dtype)


class Int8LinearKernel:
    """W8A8 ``linear`` on oneDNN (``w_int8`` ``[N, K]`` integer values, ``w_scale`` ``[N]``)."""

    path = "native int8 (oneDNN)"  # split weights (.split, lowbit.kernels.vnni) are the same path

    def __init__(self, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 act_fmt, act_scale: float, act_zero: float, out_dtype: torch.dtype = torch.float32) -> None:
        self.out_dtype = out_dtype
        self.w_scale = _check_weight(w_int8, w_scale)
        self.act = _ActCodes(act_fmt, act_scale, act_zero)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.out_features, self.in_features = w_int8.shape
        self.w_zero = torch.zeros(self.out_features, dtype=torch.int64)
        # [N, K], the layout qlinear_prepack takes: the first call packs it without another copy
        self.packed, self.packed_for = w_int8.clone(memory_format=torch.contiguous_format), None
        self.split = vnni.needs_split(w_int8, self.act.max_code)
        self.kid = register(self)

    @classmethod
    def concat(cls, kernels: "list[Int8LinearKernel]") -> "Int8LinearKernel":
        """One kernel whose output is the outputs of ``kernels`` side by side (in order). They
        must read the same input with the same activation quantizer (same codes) and write the
        same dtype; each output column is computed as before (the same integer accumulation,
        per-column scale and bias), so the fused result equals the separate ones up to the
        rounding of oneDNN's float epilogue (bit-identical on Zen 4, within an ulp on AMX)."""
        first = kernels[0]
        if not cls.can_concat(kernels):
            raise FormatError("only Linear kernels with the same input quantizer, width and output dtype can be fused")
        fused = cls.__new__(cls)
        fused.out_dtype, fused.act, fused.in_features = first.out_dtype, first.act, first.in_features
        fused.out_features = sum(k.out_features for k in kernels)
        fused.w_scale = torch.cat([k.w_scale for k in kernels])
        fused.w_zero = torch.zeros(fused.out_features, dtype=torch.int64)
        fused.bias = (None if all(k.bias is None for k in kernels) else
                      torch.cat([torch.zeros(k.out_features) if k.bias is None else k.bias for k in kernels]))
        # [sum N, K], the layout of an unpacked kernel, written in place: no full-size temporaries
        # (a concatenated copy and its transpose stayed in the heap: +7 MB RSS, SD-like W4A8)
        fused.packed = torch.empty(fused.out_features, fused.in_features, dtype=torch.int8)
        start = 0
        for k in kernels:
            fused.packed[start:start + k.out_features] = k.weight_int8()
            start += k.out_features
        fused.split = vnni.needs_split(fused.packed, fused.act.max_code)
        fused.packed_for, fused.kid = None, register(fused)
        return fused

    def rows(self, start: int, stop: int) -> "Int8LinearKernel":
        """A kernel for output columns ``[start, stop)`` only (weight rows, scales and bias of
        those columns; the same input quantizer and output dtype): each column is computed as
        before. The inverse of :meth:`concat`."""
        part = type(self).__new__(type(self))
        part.out_dtype, part.act, part.in_features = self.out_dtype, self.act, self.in_features
        part.out_features = stop - start
        part.w_scale = self.w_scale[start:stop].clone()
        part.w_zero = torch.zeros(part.out_features, dtype=torch.int64)
        part.bias = None if self.bias is None else self.bias[start:stop].clone()
        part.packed = self.weight_int8()[start:stop].clone()
        part.split = vnni.needs_split(part.packed, part.act.max_code)
        part.packed_for, part.kid = None, register(part)
        return part

    @staticmethod
    def can_concat(kernels: "list[Int8LinearKernel]") -> bool:
        """True if :meth:`concat` applies: same input width, quantizer and output dtype."""
        first = kernels[0]
        return all(k.in_features == first.in_features and k.out_dtype == first.out_dtype
                   and torch.equal(k.act.params, first.act.params) and k.act.scale == first.act.scale
                   for k in kernels)

    def weight_int8(self) -> torch.Tensor:
        """The integer weight values ``[N, K]``: before the first call the kernel's own tensor
        (read it, do not modify it), after it a copy out of the packed weight."""
        if self.packed_for is None:
            return self.packed
        w = self.packed.to_dense().t().contiguous()
        return vnni.unsplit_weight(w) if self.split else w

    def repack_for(self, shape: tuple) -> None:
        """Re-lay the packed weight for ``[M, K]`` inputs of ``shape`` (as the convolution does:
        a matmul packed for its real M measured 8–16 % faster); oneDNN holds the packed weight as ``[K, N]``."""
        if self.packed_for != shape:
            w_int8 = self.weight_int8()
            x_shape = list(shape)
            if self.split:
                w_int8, x_shape[1] = vnni.split_weight(w_int8), 2 * x_shape[1]
            self.packed, self.packed_for = torch.ops.onednn.qlinear_prepack(w_int8, x_shape), shape
            del w_int8
            trim_heap()

    def run(self, codes: torch.Tensor, nhwc: bool = False) -> torch.Tensor:
        """The oneDNN call on 2-D uint8 codes ``[M, K]`` (``nhwc`` does not apply)."""
        self.repack_for(tuple(codes.shape))
        q = vnni.duplicate_columns(codes) if self.split else codes.contiguous()
        return torch.ops.onednn.qlinear_pointwise(q, self.act.scale, self.act.zero, self.packed,
                                                   self.w_scale, self.w_zero, self.bias, 1.0, 0, self.out_dtype,
                                                   "none", _NO_POSTOP, "")

    def fake(self, codes: torch.Tensor, nhwc: bool = False) -> torch.Tensor:
        """Output shape of :meth:`run` (for ``torch.compile``)."""
        return codes.new_empty((codes.shape[0], self.out_features), dtype=self.out_dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = run_op(self.act(x.reshape(-1, self.in_features)), self.kid, False)
        y = y.reshape(*lead, self.out_features)
        return y if x.dtype == self.out_dtype else y.to(x.dtype)

"""Choosing and installing the compute path of each quantized layer (``set_compute``).

A quantized layer can run four ways; its report row says which one it runs:

``native int8``  integer GEMM/convolution: oneDNN on CPU (:mod:`.onednn`), ``torch._int_mm`` on
                 CUDA (:mod:`.int_mm` for Linear, :mod:`.int_mm_conv` for ``groups=1`` Conv2d).
                 Needs INT weights of ≤ 8 bits with symmetric tensor/channel scales and a
                 calibrated per-tensor INT activation quantizer. On CPUs without VNNI, layers
                 whose pairs of products could overflow int16 run split weights (:mod:`.vnni`):
                 exact, twice the integer work (``kernel.split``; benchmarks say so).
``native fp8``   FP8 E4M3 × E4M3 Linear on ``torch._scaled_mm`` (:mod:`.scaled_mm`): chosen by
                 ``auto`` on CUDA GPUs with FP8 tensor cores (compute capability ≥ 8.9); ``"fp8"``
                 forces it on any device (on CPU it is slower than bf16, but computes the same).
``bf16``         exact unscaled operands in bf16, scales in float32 (:mod:`.bf16`): minifloat
                 formats (FP8, FP6, FP4) and weight-only layers, and grouped INT convolutions on CUDA;
                 on CPU only where oneDNN has bf16 kernels (not on AVX2-only CPUs).
``emulated``     dequantize, then float32 (:mod:`lowbit.nn`): everything else — group-wise scales,
                 formats with more than 8 significant bits, and tiny layers.

Attention matmuls (a QuantAttnProcessor's Q·Kᵀ and P·V) run on int8 codes where
:mod:`.int8_attention` says they pay (``auto``: eager CPU models from 1,024 tokens; ``"int8"``:
always) and emulated otherwise; the processor's ``compute_path`` says which.

``path="auto"`` picks the first that applies, per layer, from the formats, the device and the
layer's shape; ``"int8"``, ``"bf16"`` or ``"emulated"`` forces a path wherever it applies (layers
it cannot run stay emulated, and say so). Kernels snapshot the layer's codes and scales: call
:func:`set_compute` after calibration, and again (or with ``"emulated"``) after changing them.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import PlanError
from . import onednn
from .int8_attention import Int8AttentionKernel, attention_int8_ok
from .bf16 import Bf16Kernel, cpu_bf16_available, exact_in_bf16
from .fuse import fuse_attention_projections, unfuse_attention_projections
from .fuse_gelu import fuse_gelu_feed_forwards, unfuse_gelu_feed_forwards
from .groupnorm import use_nhwc_group_norm
from .int_mm import IntMMLinearKernel
from .int_mm_conv import IntMMConv2dKernel
from .scaled_mm import Fp8LinearKernel, fp8_available, is_e4m3fn

__all__ = ["PATHS", "choose_path", "install_attention_kernels", "set_compute"]

PATHS = ("auto", "int8", "fp8", "bf16", "emulated")

# Below this reduction length an int8 kernel has too little work to amortise the activation
# quantization: the 1-channel conv_in, the 3-channel RGB stem, tiny embeddings.
_MIN_REDUCTION = 16


def _reduction(layer) -> int:
    shape = layer.weight_shape
    return int(torch.Size(shape[1:]).numel())


def _weight_ok(layer) -> bool:
    wq = layer.weight_quant
    if type(layer).__name__ == "QuantConv2d" and _numeric_padding(layer) is None:
        return False
    return (wq.enabled and wq.granularity.kind in ("tensor", "channel")
            and bool(torch.all(wq.zero == 0)))


def _int8_ok(layer, device: torch.device) -> bool:
    wq, aq = layer.weight_quant, layer.input_quant
    if not (_weight_ok(layer) and wq.fmt.kind == "int" and wq.fmt.bits <= 8):
        return False
    if not (aq.enabled and aq.fmt.kind == "int" and aq.fmt.bits <= 8 and aq.granularity.kind == "tensor"
            and bool(aq.calibrated)):
        return False
    if _reduction(layer) < _MIN_REDUCTION:
        return False
    if device.type == "cpu":
        return onednn.available()
    if device.type == "cuda":  # _int_mm: Linear, and Conv2d as an im2col GEMM (groups=1); uint8 activations
        kind = type(layer).__name__
        return aq.fmt.name == "uint8" and (kind == "QuantLinear" or (kind == "QuantConv2d" and layer.groups == 1))
    return False


def _fp8_ok(layer, device: torch.device, forced: bool) -> bool:
    wq, aq = layer.weight_quant, layer.input_quant
    if type(layer).__name__ != "QuantLinear" or not (_weight_ok(layer) and is_e4m3fn(wq.fmt)):
        return False
    if not (aq.enabled and is_e4m3fn(aq.fmt) and aq.granularity.kind == "tensor" and bool(aq.calibrated)):
        return False
    return forced or fp8_available(device)


def _bf16_ok(layer, device: torch.device) -> bool:
    wq, aq = layer.weight_quant, layer.input_quant
    if device.type == "cpu" and not cpu_bf16_available():
        return False  # no bf16 kernels in oneDNN here: PyTorch's fallback is 60x slower than fp32
    if not (_weight_ok(layer) and exact_in_bf16(wq.fmt)):
        return False
    return not aq.enabled or (aq.granularity.kind == "tensor" and exact_in_bf16(aq.fmt) and bool(aq.calibrated))


def choose_path(layer, requested: str = "auto", device: "torch.device | None" = None) -> str:
    """The path ``layer`` (a QuantLinear/QuantConv2d) will run for ``requested``."""
    if requested not in PATHS:
        raise PlanError(f"unknown compute path {requested!r}: use one of {', '.join(PATHS)}")
    device = device or layer.weight_quant.scale.device
    if requested == "emulated" or type(layer).__name__ == "QuantEmbedding":
        return "emulated"  # a table lookup is a gather: no kernel (it decodes the rows it reads)
    if requested == "auto" and _reduction(layer) < _MIN_REDUCTION:
        return "emulated"  # too little work per output to pay for quantizing the input
    if requested in ("auto", "int8") and _int8_ok(layer, device):
        return "int8"
    if requested in ("auto", "fp8") and _fp8_ok(layer, device, forced=requested == "fp8"):
        return "fp8"
    if requested in ("auto", "bf16") and _bf16_ok(layer, device):
        return "bf16"
    return "emulated"


def _weight_values(layer) -> torch.Tensor:
    """Unscaled integer/minifloat values of the weight, ``decode(codes) − zero``."""
    wq = layer.weight_quant
    codes = layer.weight_codes_now()
    fmt = wq.fmt
    if fmt.kind == "int" and fmt.signed and bool(torch.all(wq.zero == 0)):
        # two's complement in the low `bits` bits: sign-extend in int8 (1 byte per weight, where
        # decoding through float32 would hold 4 per weight of the largest layer while loading)
        shift = 8 - fmt.bits
        return ((codes.view(torch.int8) << shift) >> shift) if shift else codes.view(torch.int8)
    vals = fmt.decode(codes).reshape(wq.scale_shape[0], -1) - wq.zero.reshape(-1, 1)
    return vals.reshape(layer.weight_shape)


def _numeric_padding(layer) -> tuple[int, int] | None:
    """The conv's symmetric (pad_h, pad_w), or None if it pads asymmetrically ('same' with an
    even effective kernel), which the kernels' symmetric padding cannot express."""
    if layer.padding_mode != "zeros":
        return (0, 0)  # the layer pads the float input itself
    if layer.padding == "valid":
        return (0, 0)
    if layer.padding == "same":
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        return None if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)
    return tuple(layer.padding)


def _conv_args(layer) -> tuple:
    return (tuple(layer.stride), _numeric_padding(layer), tuple(layer.dilation), int(layer.groups))


def _build(layer, path: str, dtype: torch.dtype):
    wq, aq = layer.weight_quant, layer.input_quant
    w_scale = wq.scale.detach().reshape(-1).float().expand(layer.weight_shape[0]).contiguous()
    vals = _weight_values(layer)
    is_conv = type(layer).__name__ == "QuantConv2d"
    act = (aq.fmt, float(aq.scale.detach().reshape(-1)[0]), float(aq.zero.reshape(-1)[0])) if aq.enabled else None
    bias = None if layer.bias is None else layer.bias.detach()
    if path == "bf16":
        return Bf16Kernel(vals, w_scale, bias, act, _conv_args(layer) if is_conv else None)
    if path == "fp8":
        return Fp8LinearKernel(vals, w_scale, bias, act)
    w_int8 = vals.to(torch.int8)
    if layer.weight_quant.scale.device.type == "cuda":
        if is_conv:
            stride, padding, dilation, _ = _conv_args(layer)
            return IntMMConv2dKernel(w_int8, w_scale, bias, act[1], int(act[2]), stride, padding, dilation)
        return IntMMLinearKernel(w_int8, w_scale, bias, act[1], int(act[2]))
    if is_conv:
        return onednn.Int8Conv2dKernel(w_int8.cpu(), w_scale, bias, *act, *_conv_args(layer), out_dtype=dtype)
    return onednn.Int8LinearKernel(w_int8.cpu(), w_scale, bias, *act, out_dtype=dtype)


def _cast_float_tensors(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter and buffer to ``dtype`` — except the quantizers' scales and
    zero-points, which must stay exactly as calibrated."""
    from ..quantizer import Quantizer

    for m in model.modules():
        if isinstance(m, Quantizer):
            continue
        for name, p in list(m.named_parameters(recurse=False)):
            if p.is_floating_point():
                setattr(m, name, nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad))
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point():
                m._buffers[name] = b.to(dtype)


@torch.no_grad()
def set_compute(model: nn.Module, path: str = "auto", *, release_codes: bool = False,
                dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Install the compute path of every quantized Linear/Conv2d in ``model``; returns
    ``{layer name: path}``. ``release_codes=True`` drops each natively-run layer's code buffer
    (the kernel keeps its own int8/bf16 copy), so weights are held once — for inference-only
    models; such a model can no longer be saved (load it again with ``compute="emulated"``).

    ``dtype=torch.bfloat16`` also runs everything *between* the quantized layers (GroupNorm,
    SiLU, attention softmax, residual adds, the layers a plan leaves in float) in bf16, with the
    kernels writing bf16: on CPUs with AVX-512 BF16/AMX that halves the memory traffic of the
    elementwise work that dominates once the convolutions are int8. Feed the model bf16 inputs.
    Quantizer scales stay float32; the cost is bf16 rounding of the activations (report it)."""
    from ..nn import QuantWeightLayer  # nn imports kernels lazily too; avoid the cycle

    if path not in PATHS:
        raise PlanError(f"unknown compute path {path!r}: use one of {', '.join(PATHS)}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise PlanError(f"compute dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantWeightLayer)]
    released = [n for n, m in layers if m.codes_released]
    if released:  # the kernels hold the only copy of these weights: rebuilding would lose them
        raise PlanError(f"{released[0]!r} (and {len(released) - 1} more) released its codes for inference; load"
                        " the checkpoint again with the compute path you want")
    chosen = {name: install_kernel(layer, path, dtype, release_codes) for name, layer in layers}
    finish_compute(model, dtype, path)
    return chosen


def install_kernel(layer, path: str, dtype: torch.dtype, release_codes: bool) -> str:
    """One layer's part of :func:`set_compute` (``lowbit.load`` calls it as each layer's codes
    come off the file, so that only one layer is ever held twice); returns the path it runs."""
    p = choose_path(layer, path)
    layer.kernel = None if p == "emulated" else _build(layer, p, dtype)
    if release_codes and layer.kernel is not None and layer.stored:
        layer.release_codes()
    return layer.compute_path


def install_attention_kernels(model: nn.Module, path: str = "auto") -> int:
    """Give every QuantAttnProcessor of ``model`` the int8 attention kernel
    (:mod:`.attention`) where ``path`` (``"auto"``: from :data:`~.attention.MIN_TOKENS` tokens;
    ``"int8"``: every shape) and its quantizers allow it, else the emulated core; returns how
    many got one."""
    from ..nn import QuantAttnProcessor

    if path not in PATHS:
        raise PlanError(f"unknown compute path {path!r}: use one of {', '.join(PATHS)}")
    n = 0
    for m in model.modules():
        if isinstance(m, QuantAttnProcessor):
            ok = path in ("auto", "int8") and attention_int8_ok(m, m.q_quant.scale.device)
            m.kernel = Int8AttentionKernel(m, forced=path == "int8") if ok else None
            n += ok
    return n


def finish_compute(model: nn.Module, dtype: torch.dtype, path: str = "auto") -> None:
    """The model-wide part of :func:`set_compute` after every layer is installed: the attention
    matmuls' kernels for ``path`` (:func:`install_attention_kernels`), the float
    tensors in ``dtype``, and (where a layer runs a CPU kernel, whose compiled outputs are NHWC)
    GroupNorm in the form inductor vectorises on NHWC tensors (:mod:`.groupnorm`), one
    fused Q/K/V kernel per self-attention block whose projections allow it (:mod:`.fuse`), and
    GELU feed-forward blocks as two int8 GEMMs with GELU in the first's epilogue (:mod:`.fuse_gelu`)."""
    from ..nn import QuantWeightLayer

    install_attention_kernels(model, path)
    for m in model.modules():
        if type(m).__name__ == "QuantEmbedding":
            m.out_dtype = dtype  # its rows join the float work between the layers
    if dtype != torch.float32:
        _cast_float_tensors(model, dtype)
        on_cpu = any(m.weight_quant.scale.device.type == "cpu" for m in model.modules() if isinstance(m, QuantWeightLayer))
        if on_cpu and not cpu_bf16_available():
            warnings.warn("this CPU's oneDNN has no bf16 kernels (AVX2 only): bf16 activations run PyTorch's reference"
                          " path, many times slower than float32; use dtype=torch.float32 here", stacklevel=3)
    cpu_native = any(m.kernel is not None and m.weight_quant.scale.device.type == "cpu"
                     for m in model.modules() if isinstance(m, QuantWeightLayer))
    use_nhwc_group_norm(model, cpu_native)
    unfuse_attention_projections(model)
    fuse_attention_projections(model)  # one Q/K/V GEMM per self-attention block, where exact
    unfuse_gelu_feed_forwards(model)
    fuse_gelu_feed_forwards(model)  # GELU and requantization in the first FFN GEMM's epilogue

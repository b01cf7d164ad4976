"""A transformer feed-forward block as two int8 GEMMs, GELU and requantization fused into the first.

diffusers' ``FeedForward`` with a GELU activation (DiT and PixArt use it, with tanh-GELU) is
``Linear → GELU → Linear``. Run layer by layer, the first GEMM writes its float output, then a
separate pass computes GELU and quantizes it for the second GEMM. On the Zen 4 CPU that pass costs
more than the GEMM before it: in a compiled DiT-S step, inductor's tanh-GELU + quantization loop
ran at 2.2–2.9 ns per element, 41 ms of a 246 ms step (torch.profiler), because it evaluates tanh
element by element. oneDNN's matmul can apply GELU (``erf`` or ``tanh``) and quantize its output in
its epilogue, vectorised, while the tile is still in registers: ``qlinear_pointwise`` with post-op
``gelu`` and the second layer's input scale and zero-point as its output scale, uint8 output.
Measured at the DiT-S shape (1024×384 → 1536, one thread): 3.4 ms for the plain GEMM with bf16
output, 4.2 ms for GEMM + GELU + uint8 codes, against 3.4 + 5.1 ms as two passes.

The codes it writes are the second layer's input codes, computed from the float32 epilogue value
instead of the bf16-rounded layer output (so, if anything, closer to the exact value); against the
layer-by-layer codes they differ by at most one code, where a value lies at a rounding boundary
(tested). This is the same "linear + unary post-op + quantized output" fusion PyTorch's PT2E
lowering asks oneDNN for (``torch/_inductor/fx_passes/quantization.py``).

Stable Diffusion's UNet transformer blocks use GEGLU instead: ``h, g = Linear(x).chunk(2)``,
``h · GELU(g)``, then the second Linear. The product needs both halves, and oneDNN's quantized
matmul has no multiply post-op (PyTorch's ``qlinear_pointwise.binary`` takes ``sum``/``add``, and
no GELU with them), so there the first GEMM runs as two, one per half, and only the gate half
gets GELU (erf, as ``F.gelu``) in its epilogue; inductor's loop is left with the product and the
second layer's quantization. Measured at the 32×32-level shape of ``lowbit bench``'s
text-conditioned UNet (``zoo.sd_text``: 4096×128 → 2×512, bf16, one thread): that loop 2.97 ms
with GELU, 0.75 ms without; one compiled feed-forward block 8.5 → 6.9 ms there, 6.2 → 5.6 ms at
16×16 and 5.2 → 5.0 ms at 8×8 (medians of 30, interleaved; about 12 ms of a 580 ms step). With
float32 activations the result equals the layer-by-layer one (tested). With bf16 activations
GELU reads the float32 epilogue instead of the bf16-rounded gate, so the next layer's codes move
by one where a value sits at a rounding boundary: 37–38 dB SQNR against layer by layer for one
block at those shapes.

:func:`fuse_gelu_feed_forwards` replaces each qualifying ``FeedForward`` with a
:class:`GeluFeedForward` (or :class:`GegluFeedForward`) that holds the same ``net`` (so parameter
names and the per-layer report are unchanged); :func:`unfuse_gelu_feed_forwards` puts the
originals back.
"""

from __future__ import annotations

import torch
from torch import nn

from .._platform import trim_heap
from . import vnni
from .onednn import Int8LinearKernel, register, run_op

__all__ = ["GegluFeedForward", "GeluCodesKernel", "GeluFeedForward", "GeluOutKernel", "HalvesKernel",
           "fuse_gelu_feed_forwards", "unfuse_gelu_feed_forwards"]

_GELU_ALGORITHMS = {"none": "none", "tanh": "tanh"}  # diffusers' GELU.approximate -> oneDNN's gelu algorithm


def _gelu_gemm(k: Int8LinearKernel, codes: torch.Tensor, out_scale: float, out_zero: int,
               out_dtype: torch.dtype | None, algorithm: str) -> torch.Tensor:
    # k's GEMM with GELU in oneDNN's epilogue; out_dtype None: uint8 codes for out_scale/out_zero
    k.repack_for(tuple(codes.shape))
    q = vnni.duplicate_columns(codes) if k.split else codes.contiguous()
    return torch.ops.onednn.qlinear_pointwise(q, k.act.scale, k.act.zero, k.packed, k.w_scale, k.w_zero, k.bias,
                                               out_scale, out_zero, out_dtype, "gelu", [], algorithm)


def _layer_by_layer(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # a FeedForward's own forward: what the fused blocks run in training mode
    for m in net:
        x = m(x)
    return x


class GeluCodesKernel:
    """``fc1``'s oneDNN GEMM with GELU and the next layer's input quantization in its epilogue:
    ``[M, K]`` uint8 codes in, ``[M, N]`` uint8 codes (for the quantizer ``next_act``) out. It shares
    ``fc1``'s packed weight, so the layer itself still computes its own output when called alone."""

    path = Int8LinearKernel.path

    def __init__(self, fc1: Int8LinearKernel, next_act, approximate: str) -> None:
        self.fc1, self.next_act = fc1, next_act
        self.algorithm = _GELU_ALGORITHMS[approximate]
        self.kid = register(self)

    def run(self, codes: torch.Tensor, nhwc: bool = False) -> torch.Tensor:
        # output_scale/zero-point: oneDNN writes round(gelu(y) / scale) + zero, saturated to
        # uint8, which is the next quantizer's arithmetic when its codes span all of 0..255
        return _gelu_gemm(self.fc1, codes, self.next_act.scale, self.next_act.zero, None, self.algorithm)

    def fake(self, codes: torch.Tensor, nhwc: bool = False) -> torch.Tensor:
        return codes.new_empty((codes.shape[0], self.fc1.out_features), dtype=torch.uint8)


class GeluFeedForward(nn.Module):
    """A diffusers ``FeedForward`` (``GELU(proj) → Dropout → Linear [→ Dropout]``) whose two
    Linears run as :class:`GeluCodesKernel` then the second layer's kernel. It registers the
    original's ``net`` under the same name, so parameter names are unchanged; in training mode it
    runs ``net`` layer by layer, as the original does."""

    def __init__(self, original: nn.Module, gelu_codes: GeluCodesKernel, fc2: Int8LinearKernel) -> None:
        super().__init__()
        self.net = original.net
        # plain attributes, not submodules: the original shares ``net`` and must not be a second owner
        self.__dict__.update(_original=original, gelu_codes=gelu_codes, fc2=fc2)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.training:  # dropout active: the layers one by one
            return _layer_by_layer(self.net, hidden_states)
        k1 = self.gelu_codes.fc1
        lead = hidden_states.shape[:-1]
        codes = run_op(k1.act(hidden_states.reshape(-1, k1.in_features)), self.gelu_codes.kid, False)
        y = run_op(codes, self.fc2.kid, False).reshape(*lead, self.fc2.out_features)
        return y if y.dtype == hidden_states.dtype else y.to(hidden_states.dtype)


class GeluOutKernel:
    """``gate``'s oneDNN GEMM with erf-GELU in its epilogue and ``gate``'s float output dtype
    (GEGLU's gate half). It shares ``gate``'s packed weight."""

    path = Int8LinearKernel.path

    def __init__(self, gate: Int8LinearKernel) -> None:
        self.gate = gate
        self.kid = register(self)

    def run(self, codes: torch.Tensor, nhwc: bool = False) -> torch.Tensor:
        return _gelu_gemm(self.gate, codes, 1.0, 0, self.gate.out_dtype, "none")

    def fake(self, codes: torch.Tensor, nhwc: bool = False) -> torch.Tensor:
        return codes.new_empty((codes.shape[0], self.gate.out_features), dtype=self.gate.out_dtype)


class HalvesKernel:
    """GEGLU's first Linear as its two halves: ``cat(value(x), gate(x))``, what the layer computes
    when called on its own (each column from the same integers, scale and bias as the whole)."""

    def __init__(self, value: Int8LinearKernel, gate: Int8LinearKernel) -> None:
        self.value, self.gate, self.path = value, gate, value.path

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.value(x), self.gate(x)], -1)


class GegluFeedForward(nn.Module):
    """A diffusers ``FeedForward`` with GEGLU (``GEGLU(proj) → Dropout → Linear [→ Dropout]``)
    run as the value GEMM, the gate GEMM with GELU fused, their product and the second layer.
    Same ``net`` and names as the original; training mode runs ``net`` layer by layer."""

    def __init__(self, original: nn.Module, halves: HalvesKernel, fc2: Int8LinearKernel) -> None:
        super().__init__()
        self.net = original.net
        self.__dict__.update(_original=original, value=halves.value, gate_gelu=GeluOutKernel(halves.gate), fc2=fc2)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.training:
            return _layer_by_layer(self.net, hidden_states)
        v = self.value
        lead = hidden_states.shape[:-1]
        codes = v.act(hidden_states.reshape(-1, v.in_features))
        z = run_op(codes, v.kid, False) * run_op(codes, self.gate_gelu.kid, False)
        y = self.fc2(z).reshape(*lead, self.fc2.out_features)
        return y if y.dtype == hidden_states.dtype else y.to(hidden_states.dtype)


def _int8_kernel(layer) -> Int8LinearKernel | None:
    k = getattr(layer, "kernel", None)
    return k if type(k) is Int8LinearKernel else None


def _fusable(ff: nn.Module) -> tuple[Int8LinearKernel, Int8LinearKernel, str] | None:
    net = list(getattr(ff, "net", []))
    if type(ff).__name__ != "FeedForward" or len(net) not in (3, 4):
        return None
    gelu, fc2 = net[0], net[2]
    if type(gelu).__name__ != "GELU" or getattr(gelu, "approximate", None) not in _GELU_ALGORITHMS:
        return None
    if not all(isinstance(d, nn.Dropout) for d in [net[1], *net[3:]]):
        return None
    k1, k2 = _int8_kernel(getattr(gelu, "proj", None)), _int8_kernel(fc2)
    if k1 is None or k2 is None or k1.out_features != k2.in_features:
        return None
    # oneDNN saturates its output to 0..255: the next quantizer's clamp only if its codes span that
    if k2.act.lo + k2.act.zero != 0 or k2.act.max_code != 255:
        return None
    return k1, k2, gelu.approximate


def _geglu_halves(ff: nn.Module) -> tuple[HalvesKernel, Int8LinearKernel] | None:
    # for a GEGLU FeedForward whose Linears run oneDNN int8 kernels: its first layer's kernel as
    # two halves (installed on the layer, replacing the whole), and the second layer's kernel
    net = list(getattr(ff, "net", []))
    if type(ff).__name__ != "FeedForward" or len(net) not in (3, 4) or type(net[0]).__name__ != "GEGLU":
        return None
    if not all(isinstance(d, nn.Dropout) for d in [net[1], *net[3:]]):
        return None
    proj, k2 = getattr(net[0], "proj", None), _int8_kernel(net[2])
    k1 = getattr(proj, "kernel", None)
    if k2 is None or not (type(k1) is Int8LinearKernel or isinstance(k1, HalvesKernel)):
        return None
    if isinstance(k1, HalvesKernel):  # fused before (finish_compute runs again): keep the halves
        return (k1, k2) if k1.value.out_features == k2.in_features else None
    if k1.out_features != 2 * k2.in_features:
        return None
    halves = HalvesKernel(k1.rows(0, k2.in_features), k1.rows(k2.in_features, k1.out_features))
    proj.kernel = halves  # the weight is held once, in the halves
    return halves, k2


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    (model.get_submodule(parent) if parent else model)._modules[attr] = new


def fuse_gelu_feed_forwards(model: nn.Module) -> int:
    """Replace every ``FeedForward`` of ``model`` whose two Linears run oneDNN int8 kernels by a
    :class:`GeluFeedForward` (GELU; the second Linear with a full-range 8-bit input quantizer)
    or a :class:`GegluFeedForward` (GEGLU); returns how many. Call it after the kernels are
    installed (``set_compute`` does)."""
    fused = 0
    for name, ff in list(model.named_modules()):
        found = _fusable(ff) if name else None
        if found is not None:
            k1, k2, approximate = found
            _replace(model, name, GeluFeedForward(ff, GeluCodesKernel(k1, k2.act, approximate), k2))
            fused += 1
            continue
        geglu = _geglu_halves(ff) if name else None
        if geglu is not None:
            _replace(model, name, GegluFeedForward(ff, *geglu))
            fused += 1
    if fused:
        trim_heap()  # GEGLU's whole first-layer weights were replaced by their halves
    return fused


def unfuse_gelu_feed_forwards(model: nn.Module) -> None:
    """Put back every original ``FeedForward`` that :func:`fuse_gelu_feed_forwards` replaced."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (GeluFeedForward, GegluFeedForward)):
            _replace(model, name, m._original)

"""Quantized layers and the module swap that installs them.

* :class:`QuantLinear`, :class:`QuantConv2d` — a weight quantizer and an input-activation
  quantizer around ``F.linear`` / ``F.conv2d`` (any stride, padding, dilation, groups, padding
  mode). Simulated form keeps the float ``weight`` parameter and fake-quantizes it; stored form
  (after :meth:`QuantWeightLayer.freeze`) keeps only uint8 ``weight_codes`` plus scales.
* :class:`QuantAttnProcessor` — a diffusers attention processor that quantizes the operands of
  the two attention matmuls (Q·Kᵀ and softmax·V), following diffusers' ``AttnProcessor`` math,
  in blocks of bounded size (:mod:`lowbit._attention`).
* :func:`apply_specs` — swaps modules by name; works on any ``nn.Module``.

Compute here is emulated (dequantize, then float matmul/conv) until
:func:`lowbit.kernels.set_compute` installs a real kernel (native int8 or bf16) on a layer; the
layer then calls it and its ``compute_path`` says which one runs.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import BLOCK_ELEMENTS, attention_core
from .calibration import weight_range
from .errors import CheckpointError, PlanError
from .formats import parse_optional
from .plan import LayerSpec
from .quantizer import Quantizer


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 20·log10(‖ref‖ / ‖ref − approx‖) in dB (inf if exact)."""
    noise = (ref.double() - approx.double()).norm().item()
    signal = ref.double().norm().item()
    return math.inf if noise == 0 else 20 * math.log10(max(signal, 1e-300) / noise)


class QuantModule(nn.Module):
    """Base of every lowbit quantized module."""

    spec: LayerSpec
    compute_path = "emulated"

    def activation_quantizers(self) -> list[tuple[str, Quantizer]]:
        """(relative name, quantizer) of each activation quantizer of this module."""
        return [(n, m) for n, m in self.named_children() if isinstance(m, Quantizer) and n != "weight_quant"]


def _act_quantizer(spec: LayerSpec, device) -> Quantizer:
    q = Quantizer(parse_optional(spec.act), spec.act_granularity, device=device)
    q.observer_kind = spec.act_observer
    return q


class QuantWeightLayer(QuantModule):
    """Shared machinery of quantized Linear and Conv2d."""

    def __init__(self, weight_shape: tuple[int, ...], has_bias: bool, spec: LayerSpec, *,
                 stored: bool = False, device=None) -> None:
        super().__init__()
        self.spec = spec
        self.weight_shape = tuple(weight_shape)
        wfmt = parse_optional(spec.weight)
        self.weight_quant = Quantizer(wfmt, spec.weight_granularity if wfmt else "tensor",
                                      shape=self.weight_shape, device=device)
        self.input_quant = _act_quantizer(spec, device)
        if stored and wfmt is not None:
            self.register_buffer("weight_codes", torch.empty(self.weight_shape, dtype=torch.uint8, device=device))
        else:
            self.weight = nn.Parameter(torch.empty(self.weight_shape, device=device))
        self.bias = nn.Parameter(torch.empty(self.weight_shape[0], device=device)) if has_bias else None
        self.weight_sqnr_db: float | None = None
        self.kernel = None  # a lowbit.kernels kernel, installed by set_compute; None = emulated
        self.codes_released = False

    @property
    def compute_path(self) -> str:  # type: ignore[override]
        """``'emulated'`` or the installed kernel's path (e.g. ``'native int8 (oneDNN)'``, ``'bf16'``)."""
        return "emulated" if self.kernel is None else self.kernel.path

    def release_codes(self) -> None:
        """Drop the code buffer of a layer that runs a kernel (it holds its own copy of the weight)."""
        if self.kernel is None:
            raise PlanError("release_codes() needs a native kernel: run lowbit.kernels.set_compute first")
        del self.weight_codes
        self.codes_released = True

    def _check_codes(self) -> None:
        if self.codes_released:
            raise CheckpointError(
                "this layer's codes were released for inference (set_compute(release_codes=True) or"
                " lowbit.load(compute=...)); load the checkpoint again with compute='emulated' to save or edit it"
            )

    @property
    def stored(self) -> bool:
        """True in stored form (codes only, no float weight)."""
        return "weight_codes" in self._buffers

    @classmethod
    def _wrap(cls, m: nn.Module, spec: LayerSpec, stored: bool):
        # for the layers whose constructor takes the float module itself
        q = cls(m, spec, stored=stored)
        if not stored:
            q._adopt(m)
        return q

    def _adopt(self, module: nn.Module) -> None:
        """Take over a float layer's parameters (no copy) and set the weight range from them."""
        self.weight = module.weight
        self.bias = getattr(module, "bias", None)  # an Embedding has none
        if self.weight_quant.enabled:
            lo, hi = weight_range(self.weight, self.weight_quant, self.spec.weight_observer)
            self.weight_quant.set_range(lo, hi)
            with torch.no_grad():
                self.weight_sqnr_db = sqnr_db(self.weight, self.weight_quant(self.weight))

    def qweight(self) -> torch.Tensor:
        """The weight as the layer computes with it (dequantized codes or fake-quantized)."""
        self._check_codes()
        if not self.weight_quant.enabled:
            return self.weight
        if self.stored:
            return self.weight_quant.decode(self.weight_codes)
        return self.weight_quant(self.weight)

    @torch.no_grad()
    def weight_codes_now(self) -> torch.Tensor:
        """uint8 codes of the weight (computed from the float weight in simulated form)."""
        self._check_codes()
        return self.weight_codes if self.stored else self.weight_quant.encode(self.weight)

    @torch.no_grad()
    def freeze(self) -> None:
        """Convert to stored form: keep codes and scales, drop the float weight."""
        if self.stored or not self.weight_quant.enabled:
            return
        self.weight_sqnr_db = sqnr_db(self.weight, self.weight_quant(self.weight))
        codes = self.weight_quant.encode(self.weight)
        del self.weight
        self.register_buffer("weight_codes", codes)


class QuantLinear(QuantWeightLayer):
    """``nn.Linear`` with quantized weight and input."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: LayerSpec, **kw) -> None:
        super().__init__((out_features, in_features), bias, spec, **kw)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_float(cls, m: nn.Linear, spec: LayerSpec, stored: bool = False) -> "QuantLinear":
        q = cls(m.in_features, m.out_features, m.bias is not None, spec, stored=stored, device=m.weight.device)
        if not stored:
            q._adopt(m)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(self.input_quant(x), self.qweight().to(x.dtype), b)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.spec.describe()}"


class QuantConv2d(QuantWeightLayer):
    """``nn.Conv2d`` with quantized weight and input (input quantized before padding, so zero
    padding is exactly the zero code, as an integer kernel would see it)."""

    _HYPER = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
              "padding_mode", "_reversed_padding_repeated_twice")

    def __init__(self, conv: nn.Conv2d, spec: LayerSpec, stored: bool = False) -> None:
        super().__init__(tuple(conv.weight.shape), conv.bias is not None, spec, stored=stored,
                         device=conv.weight.device)
        for k in self._HYPER:
            setattr(self, k, getattr(conv, k))

    @classmethod
    def from_float(cls, m: nn.Conv2d, spec: LayerSpec, stored: bool = False) -> "QuantConv2d":
        return cls._wrap(m, spec, stored)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            # reflect/replicate/circular padding copies values, so padding the float input before
            # the kernel quantizes it equals padding the codes; the kernel itself pads with zeros
            if self.padding_mode != "zeros":
                x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return self.kernel(x)
        x = self.input_quant(x)
        w, b = self.qweight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)  # no-ops in fp32
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride},"
                f" groups={self.groups}, {self.spec.describe()}")


class QuantAttnProcessor(QuantModule):
    """diffusers attention processor with quantized matmul operands: Q and K before Q·Kᵀ, the
    softmax probabilities and V before probs·V (per-tensor, the layer spec's activation format).
    The projections (to_q/to_k/to_v/to_out) are ordinary Linear layers, quantized by their own
    plan entries."""

    # set by lowbit.kernels.fuse when to_q/to_k/to_v run as one int8 GEMM (self-attention only)
    fused_qkv = None
    qkv_sizes = None
    # the most attention-score elements computed at once (lowbit._attention); an instance may
    # set its own: larger is fewer, bigger matmuls, smaller is less memory
    block_elements = BLOCK_ELEMENTS

    def __init__(self, spec: LayerSpec, device=None) -> None:
        super().__init__()
        self.spec = spec
        # lowbit.kernels.int8_attention.Int8AttentionKernel, installed by set_compute; None = emulated
        self.kernel = None
        for n in ("q_quant", "k_quant", "p_quant", "v_quant"):
            setattr(self, n, _act_quantizer(spec, device))

    @property
    def compute_path(self) -> str:  # type: ignore[override]
        """``'emulated'`` or the installed kernel's path (``'native int8 (_int_mm) ...'``)."""
        return "emulated" if self.kernel is None else self.kernel.path

    def _qkv_is_current(self, attn: nn.Module) -> bool:
        # the fused kernel stands for the projections' own kernels only while they are its slices:
        # anything that reinstalls or drops a layer's kernel (set_compute, calibrate) ends it
        qkv = self.fused_qkv
        return qkv is not None and all(getattr(getattr(attn, n).kernel, "fused", None) is qkv
                                       for n in ("to_q", "to_k", "to_v"))

    # diffusers inspects the processor's __call__ signature to decide which kwargs to pass;
    # nn.Module.__call__ is (*args, **kwargs), so spell the signature out.
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states=None,
                attention_mask=None, temb=None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        b = c = h = w = None
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if self._qkv_is_current(attn) and encoder_hidden_states is None:
            query, key, value = self.fused_qkv(hidden_states).split(self.qkv_sizes, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key = attn.to_k(encoder_hidden_states)
            value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        kernel = self.kernel
        if kernel is not None and kernel.applies(query.shape[1], key.shape[1], query.shape[2]):
            # the two matmuls on int8 codes (lowbit.kernels.int8_attention), in blocks of query rows
            hidden_states = attn.batch_to_head_dim(kernel(attn, query, key, value, attention_mask,
                                                          self.block_elements))
            return self._finish(attn, hidden_states, residual, input_ndim, b, c, h, w)
        query, key, value = self.q_quant(query), self.k_quant(key), self.v_quant(value)
        # in blocks of heads or query rows (lowbit._attention) to bound memory; while calibrating
        # too if the probabilities' observer keeps only min/max (the same range block by block),
        # not if it samples the values (percentile/MSE must see the whole tensor at once)
        obs = self.p_quant.observer
        budget = self.block_elements if obs is None or getattr(obs, "kind", None) == "minmax" else math.inf
        hidden_states = attn.batch_to_head_dim(attention_core(attn, query, key, value, attention_mask,
                                                              self.p_quant, budget))
        return self._finish(attn, hidden_states, residual, input_ndim, b, c, h, w)

    @staticmethod
    def _finish(attn: nn.Module, hidden_states: torch.Tensor, residual: torch.Tensor, input_ndim: int,
                b, c, h, w) -> torch.Tensor:
        # the output projection, layout and residual after the attention core (diffusers' order)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class QuantEmbedding(QuantWeightLayer):
    """``nn.Embedding`` with a quantized table, weight-only: its inputs are indices, so the spec's
    activation format does not apply. ``channel`` granularity is one scale per row (entry).

    DiT's per-block class-label tables are 12 % of a DiT-S-like model's parameters; in fp32 they
    were a third of its W8A8 checkpoint (docs/performance-notes.md). A lookup is a gather, so
    there is no kernel to run: a stored table stays as its codes (one byte per entry in memory)
    and only the looked-up rows are decoded, bit-identical to decoding the whole table."""

    _HYPER = ("num_embeddings", "embedding_dim", "padding_idx", "scale_grad_by_freq", "sparse")

    def __init__(self, emb: nn.Embedding, spec: LayerSpec, stored: bool = False) -> None:
        if emb.max_norm is not None:  # max_norm renormalises rows of the table in place on lookup
            raise PlanError("an nn.Embedding with max_norm rewrites its table on every lookup and cannot be"
                            " quantized; keep it in float (a rule with spec=None)")
        super().__init__(tuple(emb.weight.shape), False, replace(spec, act=None), stored=stored,
                         device=emb.weight.device)
        for k in self._HYPER:
            setattr(self, k, getattr(emb, k))
        self.out_dtype = torch.float32  # the model's float dtype (set_compute's dtype)

    @classmethod
    def from_float(cls, m: nn.Embedding, spec: LayerSpec, stored: bool = False) -> "QuantEmbedding":
        return cls._wrap(m, spec, stored)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        wq = self.weight_quant
        if self.stored and wq.enabled and wq.scale_shape[0] == self.num_embeddings:
            self._check_codes()
            flat = idx.reshape(-1)
            q = wq.fmt.decode(self.weight_codes[flat]).reshape(len(flat), wq.scale_shape[1], -1)
            rows = (q - wq.zero[flat].unsqueeze(-1)) * wq.scale[flat].unsqueeze(-1)
            return rows.reshape(*idx.shape, self.embedding_dim).to(self.out_dtype)
        return F.embedding(idx, self.qweight(), self.padding_idx).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.spec.describe()}"


def _device(mod: nn.Module) -> torch.device:
    for t in list(mod.parameters()) + list(mod.buffers()):
        return t.device
    return torch.device("cpu")


def apply_specs(model: nn.Module, specs: dict[str, LayerSpec], *, stored: bool = False) -> nn.Module:
    """Swap each named module for its quantized counterpart (in place); returns the model.

    ``stored=True`` builds empty stored-form layers (codes, no float weights) for loading a
    checkpoint; otherwise the layers adopt the float weights and set their weight ranges.
    """
    modules = dict(model.named_modules())
    for name, spec in specs.items():
        mod = modules.get(name)
        if mod is None:
            raise PlanError(f"the plan names layer {name!r}, which this model does not have")
        if isinstance(mod, QuantModule):
            continue
        if hasattr(mod, "get_attention_scores") and hasattr(mod, "set_processor"):
            if parse_optional(spec.act) is not None:
                proc = QuantAttnProcessor(spec, device=_device(mod))
                mod.set_processor(proc)
                for n, q in proc.activation_quantizers():
                    q.label = f"{name}.processor.{n}"
            continue
        if isinstance(mod, nn.Conv2d):
            new = QuantConv2d.from_float(mod, spec, stored=stored)
        elif isinstance(mod, nn.Linear):
            new = QuantLinear.from_float(mod, spec, stored=stored)
        elif isinstance(mod, nn.Embedding):
            new = QuantEmbedding.from_float(mod, spec, stored=stored)
        else:
            raise PlanError(f"layer {name!r} is a {type(mod).__name__}; lowbit quantizes Linear, Conv2d, Embedding and attention")
        new.input_quant.label = f"{name}.input_quant"
        new.weight_quant.label = f"{name}.weight_quant"
        if name:
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, new)
        else:
            raise PlanError("the model itself is a single layer; wrap it in an nn.Sequential to quantize it")
    return model


def quant_layers(model: nn.Module) -> list[tuple[str, QuantModule]]:
    """All lowbit quantized modules in ``model`` with their plan names; an attention processor
    is named after its attention module (the name a plan rule matches)."""
    return [(n.removesuffix(".processor") if isinstance(m, QuantAttnProcessor) else n, m)
            for n, m in model.named_modules() if isinstance(m, QuantModule)]

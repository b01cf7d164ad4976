"""W8A8 linear on ``torch._int_mm`` (int8×int8→int32 GEMM), with its exact integer reference.

This is the Linear path on CUDA (``select.set_compute``); on CPU oneDNN (:mod:`.onednn`) is faster
because it fuses the epilogue, but this module's reference is the specification both are tested
against.

lowbit's quantized layers compute *emulated*: the int8 weight codes are dequantized and the input
fake-quantized, then a float ``F.linear`` runs. This module computes the same quantity with
integer arithmetic, which is what gives the speed on CPU (``torch._int_mm`` int8×int8→int32 is
several times faster than fp32 GEMM on the CPUs we measured):

* activations: unsigned 8-bit with a per-tensor scale ``s_x`` and integer zero-point ``z_x``,
  quantized exactly like :class:`lowbit.quantizer.Quantizer` does it:
  ``q_x = clamp(round(x · (1/s_x)) + z_x, 0, 255)`` in float32 (round half to even; round before
  adding the zero-point; ``1/s_x`` computed in float32 as the quantizer computes it);
* weights: signed int8 codes, symmetric (zero-point 0), per-output-channel scale ``s_w[N]``;
* ``y = s_x · s_w[n] · Σ_k (q_x[k] − z_x) · w[n, k] + bias[n]``.

:func:`linear_w8a8_reference` is the specification: exact integer accumulation in int64 and the
epilogue in float64. :func:`linear_w8a8` is the fast path. ``torch._int_mm`` only multiplies two
int8 operands, so the uint8 activation is shifted to int8 with ``a = q_x − 128`` and the result
corrected with the identity

    Σ_k (q_x − z_x) · w  =  Σ_k (q_x − 128) · w  +  (128 − z_x) · Σ_k w

where the column sums ``Σ_k w`` are precomputed once by :func:`prepare_linear_weight` (together
with the transposed, contiguous int8 weight that ``_int_mm`` wants as its second operand). The
int32 accumulator cannot overflow for K < 2**31 / (128 · 255) ≈ 65 000. Its value equals the
reference's int64 accumulator exactly (tested), so the two outputs differ only by float32 vs
float64 rounding in the epilogue.

Shapes: on CPU ``torch._int_mm`` accepts any M, K, N, so nothing is padded. Other devices (CUDA)
require M > 16 and K, N multiples of 8; there the weight is zero-padded once in
:func:`prepare_linear_weight` (zero rows/columns add nothing to the sums) and the activation rows
and columns are zero-padded per call, then the output is sliced back. Nothing falls back to the
reference. ``pad=True`` forces the padded layout on CPU as well (used by the tests).

Deliberately not used: PyTorch's deprecated quantized tensors (``torch.quantize_per_tensor``
objects, ``quantized::*`` ops). Signed-int8 *activations* are kept internal to the GEMM call; the
activation format exposed to callers is uint8 with a zero-point, the layout that stays fast under
``torch.compile`` freezing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FormatError

__all__ = [
    "IntMMLinearKernel",
    "PreparedLinearWeight",
    "linear_w8a8",
    "linear_w8a8_acc",
    "linear_w8a8_reference",
    "linear_w8a8_reference_acc",
    "prepare_linear_weight",
    "quantize_activation",
]

_MIN_M = 17  # torch._int_mm on CUDA needs M > 16
_ALIGN = 8  # ... and K, N multiples of 8


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _check_weight(w: torch.Tensor) -> None:
    if w.dtype != torch.int8:
        raise FormatError(
            f"weight codes must be int8, got {w.dtype}; lowbit stores int8 codes as uint8 two's complement:"
            " pass codes.view(torch.int8)"
        )
    if w.dim() != 2:
        raise FormatError(f"weight codes must be 2-D [N, K], got shape {tuple(w.shape)}")


def _check_zero(x_zero) -> int:
    z = int(x_zero)
    if float(x_zero) != z or not 0 <= z <= 255:
        raise FormatError(f"activation zero-point must be an integer in [0, 255], got {x_zero!r}")
    return z


def _inv_scale(x_scale, device) -> torch.Tensor:
    """``1/s`` as a float32 0-dim tensor, computed exactly as the Quantizer does (``1.0 / s``)."""
    s = torch.as_tensor(x_scale, dtype=torch.float32, device=device).reshape(())
    return 1.0 / s


def quantize_activation(x: torch.Tensor, x_scale, x_zero) -> torch.Tensor:
    """uint8 codes of ``x``: ``clamp(round(x·(1/s)) + z, 0, 255)``, bit-identical to
    ``Quantizer.encode`` with format ``uint8`` and per-tensor granularity."""
    z = _check_zero(x_zero)
    y = torch.round(x.float() * _inv_scale(x_scale, x.device)) + z
    return torch.clamp(y, 0, 255).to(torch.uint8)


def codes_minus_128(x: torch.Tensor, inv_scale: torch.Tensor, z: int) -> torch.Tensor:
    """``a = q_x − 128`` as int8 (the operand ``_int_mm`` takes), in ``x``'s layout:
    ``clamp(round(x/s) + z, 0, 255) − 128 == clamp(round(x/s) + (z − 128), −128, 127)``."""
    y = x.float() * inv_scale
    return y.round_().add_(z - 128).clamp_(-128, 127).to(torch.int8)  # y is fresh: in place is safe


# --------------------------------------------------------------------------- reference
def linear_w8a8_reference_acc(x: torch.Tensor, x_scale, x_zero, w_codes_int8: torch.Tensor) -> torch.Tensor:
    """Exact integer accumulator ``Σ_k (q_x − z_x) · w[n, k]`` as int64, shape ``[..., N]``."""
    _check_weight(w_codes_int8)
    z = _check_zero(x_zero)
    q = quantize_activation(x, x_scale, z).to(torch.int64) - z
    if q.shape[-1] != w_codes_int8.shape[1]:
        raise FormatError(f"input has {q.shape[-1]} features, the weight expects {w_codes_int8.shape[1]}")
    # float64 matmul is exact here: every product and partial sum is an integer below
    # K · 255 · 128 < 2**53, so no rounding can occur in any summation order (int64 matmul is
    # not implemented on every device)
    acc = torch.matmul(q.double(), w_codes_int8.double().t())
    return acc.to(torch.int64)


def linear_w8a8_reference(x: torch.Tensor, x_scale, x_zero, w_codes_int8: torch.Tensor,
                          w_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The specification of W8A8 linear: int64 accumulation, float64 epilogue
    ``acc · (s_x · s_w[n]) + bias[n]``; returned in ``x.dtype``. ``x`` is ``[..., K]``,
    ``w_codes_int8`` ``[N, K]`` int8, ``w_scale`` ``[N]`` (or anything reshaping to it)."""
    acc = linear_w8a8_reference_acc(x, x_scale, x_zero, w_codes_int8).double()
    s_x = torch.as_tensor(x_scale, dtype=torch.float32, device=x.device).double().reshape(())
    out = acc * (s_x * w_scale.reshape(-1).double())
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)


# --------------------------------------------------------------------------- fast path
@dataclass(frozen=True)
class PreparedLinearWeight:
    """Per-layer constants of the fast path, computed once by :func:`prepare_linear_weight`.

    ``w_t`` is the int8 weight transposed to ``[K_p, N_p]`` and contiguous (zero-padded to
    ``K_p``, ``N_p`` when ``padded``); ``colsum`` is ``Σ_k w[n, k]`` as int32 ``[N]``."""

    w_t: torch.Tensor
    colsum: torch.Tensor
    in_features: int
    out_features: int
    padded: bool


def prepare_linear_weight(w_codes_int8: torch.Tensor, pad: bool | None = None) -> PreparedLinearWeight:
    """Precompute the reusable part of :func:`linear_w8a8` for an int8 weight ``[N, K]``.

    ``pad=None`` pads only where ``torch._int_mm`` needs it (non-CPU devices); ``True`` or
    ``False`` forces the choice."""
    _check_weight(w_codes_int8)
    n, k = w_codes_int8.shape
    if pad is None:
        pad = w_codes_int8.device.type != "cpu"
    w_t = w_codes_int8.t()
    if pad:
        kp, np_ = _round_up(max(k, 1), _ALIGN), _round_up(max(n, 1), _ALIGN)
        w_t = torch.nn.functional.pad(w_t, (0, np_ - n, 0, kp - k))
    colsum = w_codes_int8.sum(dim=1, dtype=torch.int32)
    return PreparedLinearWeight(w_t.contiguous(), colsum.contiguous(), k, n, bool(pad))


def _as_prepared(weight) -> PreparedLinearWeight:
    return weight if isinstance(weight, PreparedLinearWeight) else prepare_linear_weight(weight)


def linear_w8a8_acc(x: torch.Tensor, x_scale, x_zero, weight) -> torch.Tensor:
    """int32 accumulator ``Σ_k (q_x − z_x) · w[n, k]`` via ``torch._int_mm``, shape ``[..., N]``;
    equal to :func:`linear_w8a8_reference_acc`. ``weight``: int8 ``[N, K]`` or prepared."""
    p = _as_prepared(weight)
    z = _check_zero(x_zero)
    k, n = p.in_features, p.out_features
    if x.shape[-1] != k:
        raise FormatError(f"input has {x.shape[-1]} features, the weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = codes_minus_128(x2, _inv_scale(x_scale, x.device), z)
    if p.padded:
        kp, mp = p.w_t.shape[0], max(m, _MIN_M)
        a = torch.zeros(mp, kp, dtype=torch.int8, device=x.device)
        a[:m, :k] = y
        acc = torch._int_mm(a, p.w_t)[:m, :n]
    elif m == 0:
        acc = torch.zeros(0, n, dtype=torch.int32, device=x.device)
    else:
        acc = torch._int_mm(y, p.w_t)
    if z != 128:
        acc = acc.add_((128 - z) * p.colsum)  # acc is fresh (or a view of a fresh tensor)
    return acc.reshape(*lead, n)


def linear_w8a8(x: torch.Tensor, x_scale, x_zero, weight, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Fast W8A8 linear: quantize ``x`` ([..., K], float) to uint8 with ``(x_scale, x_zero)``,
    int8 GEMM with int32 accumulation (``torch._int_mm``), float32 epilogue
    ``acc · (s_x · s_w[n]) + bias[n]``; returned in ``x.dtype``.

    ``weight`` is the int8 code tensor ``[N, K]`` or, to keep per-call work minimal, the result of
    :func:`prepare_linear_weight`. Matches :func:`linear_w8a8_reference` up to float32 rounding of
    the epilogue (the integer accumulators are identical)."""
    acc = linear_w8a8_acc(x, x_scale, x_zero, weight)
    s_x = torch.as_tensor(x_scale, dtype=torch.float32, device=x.device).reshape(())
    scale = s_x * w_scale.reshape(-1).float()
    out = acc.float().mul_(scale)
    if bias is not None:
        out.add_(bias.float())
    return out.to(x.dtype)


class IntMMLinearKernel:
    """A QuantLinear's W8A8 compute via :func:`linear_w8a8` (uint8 activations)."""

    path = "native int8 (_int_mm)"

    def __init__(self, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 x_scale: float, x_zero: int) -> None:
        self.weight = prepare_linear_weight(w_int8)
        self.w_scale = w_scale.reshape(-1).float().contiguous()
        self.bias = None if bias is None else bias.detach().float()
        self.x_scale = torch.tensor(float(x_scale), dtype=torch.float32, device=w_int8.device)
        self.x_zero = int(x_zero)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear_w8a8(x, self.x_scale, self.x_zero, self.weight, self.w_scale, self.bias)

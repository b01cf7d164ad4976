"""Native int8 attention matmuls on CPU: Q·Kᵀ and P·V as integer GEMMs on ``torch._int_mm``.

:class:`lowbit.nn.QuantAttnProcessor` quantizes both operands of both attention matmuls (Q and
K, the softmax probabilities P and V), per tensor. Emulated, it dequantizes them and multiplies
in float (bf16 in a bf16 model, where the scores and probabilities are rounded to bf16 as well).
Here the codes themselves are multiplied, in int32, which is exact, and the scales applied once.

``torch._int_mm`` multiplies int8 by int8; an asymmetric format's codes are uint8 with a
zero-point ``z``. Each operand is therefore held as ``c = u − 128`` (int8), whose value is
``s · (c + a)`` with ``a = 128 − z``. For one head,

    (Q + a)(K + b)ᵀ = QKᵀ + b · rowsum(Q) 1ᵀ + a · 1 rowsum(K)ᵀ + a·b·d
    (P + a')(V + b') = PV + b' · rowsum(P) 1ᵀ + a' · 1 colsum(V)ᵀ + a'·b'·keys

the integer GEMM plus rank-1 corrections, all int32 (no overflow below 33,000 keys and head
dimensions: ``255² · 33,000 < 2³¹``). The scores are then ``s_q·s_k·attn.scale · S (+ mask)``
in float32, the softmax float32, P's codes the same arithmetic as its quantizer, and the output
``s_p·s_v · O``. Against the emulated float32 path a probability can land on the neighbouring
code where float32 rounding of the scores crosses a rounding boundary (tested: every output
within two P steps of a float64 reference built from the quantizers' codes); the integer
products themselves are exact.

Where it pays (measured on a Zen 4 core, one thread, bf16 operands, against the emulated core,
both in blocks of at most 256K scores; ``docs/performance-notes.md``): in eager models 1.13× at
1,024 query and key tokens (8 heads of 64) and 1.25× at 4,096, but 0.8× at 256 tokens, where
the per-block calls and corrections cost more than the cheaper matmuls save. Inside a compiled
model inductor fuses the emulated core's quantizers and softmax into its own loops, and that
was faster at every size measured (1,024 tokens: 22.4 against 28.9 ms; 4,096: 81 against 89).
So ``auto`` runs int8 in eager models from :data:`MIN_TOKENS` query and key tokens up and the
emulated core otherwise; the forced ``"int8"`` path runs it at every shape, compiled too, as
one opaque operator. The work goes head by head (``_int_mm`` is 2-D), in blocks of query rows
that bound the int32 score block like the emulated core's (:mod:`lowbit._attention`).

Written by hand because no PyTorch operator computes attention with quantized probabilities.
CPU only: whether ``_int_mm`` is exact is probed once (:func:`int_mm_exact`), as :mod:`.vnni`
probes oneDNN; CUDA runs the emulated core.
"""

from __future__ import annotations

import functools

import torch

from .._compiled import run_compiled, use_compiled_helpers
from .onednn import _REGISTRY, _ActCodes, register

__all__ = ["MIN_TOKENS", "Int8AttentionKernel", "attention_int8_ok", "int_mm_exact"]

# auto runs int8 from this many query and key tokens up (see the module docstring)
MIN_TOKENS = 1024
# int32 headroom of the P·V sums: 255² · keys < 2³¹ (and the same for the head dimension)
MAX_REDUCTION = 33_000


@functools.lru_cache(maxsize=1)
def int_mm_exact() -> bool:
    """Whether ``torch._int_mm`` on this CPU returns the exact int32 products of int8 codes,
    extremes included (a kernel that sums pairs of products in saturating int16 would not)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (64, 256), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (256, 64), dtype=torch.int8, generator=g)
    a[:8], b[:, :8] = -128, -128  # every pair at the extreme: 128·128 + 128·128 overflows int16
    a[8:16], b[:, 8:16] = 127, -128
    try:
        got = torch._int_mm(a, b)
    except RuntimeError:
        return False
    return torch.equal(got.long(), a.long() @ b.long())


def _operand_ok(q) -> bool:
    return (q.enabled and q.fmt.kind == "int" and q.fmt.bits <= 8 and q.granularity.kind == "tensor"
            and bool(q.calibrated))


def attention_int8_ok(proc, device: torch.device) -> bool:
    """Whether ``proc`` (a QuantAttnProcessor) can run its matmuls on int8 codes on ``device``:
    all four operand quantizers per-tensor INT of at most 8 bits and calibrated, on a CPU whose
    ``_int_mm`` is exact."""
    quants = (proc.q_quant, proc.k_quant, proc.p_quant, proc.v_quant)
    return device.type == "cpu" and all(_operand_ok(q) for q in quants) and int_mm_exact()


class _Codes:
    """One operand quantizer as shifted int8 codes: value = ``scale · (code + offset)``."""

    def __init__(self, q) -> None:
        act = _ActCodes(q.fmt, float(q.scale.detach().reshape(-1)[0]), float(q.zero.detach().reshape(-1)[0]))
        self.scale = act.scale
        self.offset = 128 - act.zero
        # [1/s, lo, hi, zero − 128]: the quantizer's arithmetic, then the shift into int8
        self.values = [act.inv_scale, act.lo, act.hi, float(act.zero - 128)]
        self.params = torch.tensor(self.values, dtype=torch.float32)


def _codes(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    # clamp(x·(1/s), lo, hi).round() + z − 128: the uint8 code minus 128, in [-128, 127]
    return torch.clamp(x.float() * params[0], params[1], params[2]).round().add(params[3]).to(torch.int8)


def _probs(s: torch.Tensor, row: torch.Tensor, col: torch.Tensor, consts: torch.Tensor,
           mask: torch.Tensor | None, with_rowsum: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    # integer scores + corrections → float scores → softmax → P's shifted codes (and their row
    # sums where V's correction needs them); consts = [s_q·s_k·scale, 1/s_p, lo_p, hi_p, z_p − 128]
    x = (s + row + col).float() * consts[0]
    if mask is not None:
        x = x + mask.float()
    p = torch.clamp(x.softmax(-1) * consts[1], consts[2], consts[3]).round().add(consts[4]).to(torch.int8)
    return p, (p.sum(-1, keepdim=True, dtype=torch.int32) if with_rowsum else None)


def _output(o: torch.Tensor, row: torch.Tensor | None, col: torch.Tensor, scale: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    o = o + col if row is None else o + row + col
    return (o.float() * scale).to(dtype)


# The kernels are found by id, in the registry lowbit.kernels.onednn's operator uses. The int8
# core is one opaque operator inside a compiled model: traced, its per-head, per-block loop unrolled into a graph that took inductor 670 s to
# compile for the text-conditioned benchmark UNet (the emulated model, compiled before it in the
# same process: 152 s) and ran slower (677 against 549 ms per step, one probe). Opaque, it runs
# the eager code with the compiled helpers.
torch.library.define("lowbit::int8_attention",
                     "(Tensor query, Tensor key, Tensor value, Tensor? mask, int kid, float scale, float budget)"
                     " -> Tensor")


@torch.library.impl("lowbit::int8_attention", "CPU")
def _int8_attention_cpu(query, key, value, mask, kid: int, scale: float, budget: float) -> torch.Tensor:
    return _REGISTRY[kid].run(query, key, value, mask, scale, budget)


@torch.library.register_fake("lowbit::int8_attention")
def _int8_attention_fake(query, key, value, mask, kid: int, scale: float, budget: float) -> torch.Tensor:
    return query.new_empty(query.shape[0], query.shape[1], value.shape[2])


class Int8AttentionKernel:
    """The two attention matmuls of one QuantAttnProcessor on int8 codes (see the module
    docstring); a snapshot of its four quantizers, like a layer's kernel. ``forced``: run at
    every shape (the ``"int8"`` path), else only from :data:`MIN_TOKENS` tokens (``auto``)."""

    def __init__(self, proc, forced: bool = False) -> None:
        self.forced = forced
        self.q, self.k, self.p, self.v = (_Codes(x) for x in (proc.q_quant, proc.k_quant, proc.p_quant, proc.v_quant))
        self.path = "native int8 (_int_mm)" if forced else f"native int8 (_int_mm) from {MIN_TOKENS} tokens, eager"
        self.kid = register(self)

    def applies(self, queries: int, keys: int, head_dim: int) -> bool:
        """Whether a call with these sizes runs here (else the processor's emulated core)."""
        if max(keys, head_dim) > MAX_REDUCTION:
            return False
        if self.forced:
            return True
        # inside a compiled model inductor fuses the emulated core's quantizers and softmax into
        # its own loops, and that was the faster of the two at every measured size
        return not torch.compiler.is_compiling() and queries >= MIN_TOKENS and keys >= MIN_TOKENS

    def __call__(self, attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: torch.Tensor | None, budget: float) -> torch.Tensor:
        """``softmax(Q·Kᵀ·scale + mask) · V`` with every operand quantized, for ``(n, tokens,
        head_dim)`` float operands (not yet quantized); ``budget``: the most score elements
        per block."""
        return torch.ops.lowbit.int8_attention.default(query, key, value, mask, self.kid, float(attn.scale),
                                                       float(budget))

    def run(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
            scale: float, budget: float) -> torch.Tensor:
        """The operator's body (eager, with the compiled helpers where they are on)."""
        n, rows, keys, d = query.shape[0], query.shape[1], key.shape[1], query.shape[2]
        dtype = query.dtype
        qs, ks, vs = (self._quant(x, c) for x, c in ((query, self.q), (key, self.k), (value, self.v)))
        # rank-1 corrections (module docstring), int32; constants folded into one tensor each
        q_row = qs.sum(-1, keepdim=True, dtype=torch.int32) * self.k.offset        # b · rowsum(Q)
        k_col = (ks.sum(-1, dtype=torch.int32) * self.q.offset + self.q.offset * self.k.offset * d).unsqueeze(1)
        v_col = (vs.sum(1, keepdim=True, dtype=torch.int32) * self.p.offset + self.p.offset * self.v.offset * keys)
        consts = torch.tensor([self.q.scale * self.k.scale * scale, *self.p.values],
                              dtype=torch.float32)
        out_scale = torch.tensor(self.p.scale * self.v.scale, dtype=torch.float32)
        with_rowsum = self.v.offset != 0
        step = rows if rows * keys <= budget else max(64, int(budget // keys) // 64 * 64)
        heads = []
        for i in range(n):
            kt, parts = ks[i].t(), []
            for j in range(0, rows, step):
                m = None
                if mask is not None:
                    m = mask[i] if mask.shape[0] > 1 else mask[0]
                    m = m[j:j + step] if m.shape[0] > 1 else m
                s = torch._int_mm(qs[i, j:j + step], kt)
                p, p_row = self._probs(s, q_row[i, j:j + step], k_col[i], consts, m, with_rowsum)
                o = torch._int_mm(p, vs[i])
                parts.append(self._out(o, None if p_row is None else p_row * self.v.offset, v_col[i], out_scale,
                                       dtype))
                del s, p
            heads.append(parts[0] if len(parts) == 1 else torch.cat(parts, 0))
        return torch.stack(heads)

    @staticmethod
    def _quant(x: torch.Tensor, c: _Codes) -> torch.Tensor:
        return run_compiled(_codes, x, c.params) if use_compiled_helpers() else _codes(x, c.params)

    @staticmethod
    def _probs(s, row, col, consts, mask, with_rowsum):
        if use_compiled_helpers():
            return run_compiled(_PROBS[with_rowsum], s, row, col, consts, mask)
        return _probs(s, row, col, consts, mask, with_rowsum)

    @staticmethod
    def _out(o, row, col, scale, dtype):
        if use_compiled_helpers():
            return run_compiled(_OUTPUT[dtype], o, row, col, scale)
        return _output(o, row, col, scale, dtype)


# hashable, long-lived helpers for run_compiled (its cache key is the function)
_PROBS = {flag: functools.partial(_probs, with_rowsum=flag) for flag in (False, True)}
_OUTPUT = {dt: functools.partial(_output, dtype=dt) for dt in (torch.float32, torch.bfloat16, torch.float16)}

"""Number formats as data: integers of 2–8 bits and ExMy minifloats.

A :class:`QFormat` is a small frozen dataclass; there is no class per format. Each format can
list its representable values, round real numbers onto its grid (round-to-nearest-even,
saturating at the largest finite value), and encode grid values to integer codes (at most 8 bits,
held in uint8) and decode them back bit-exactly.

Minifloat layout is sign | exponent | mantissa with an exponent bias (default 2^(E-1) - 1) and
subnormals. Three conventions for the top exponent matter in practice:
  * ``ieee``  — the all-ones exponent encodes inf (mantissa 0) and NaN (FP8 E5M2);
  * ``fn``    — "finite": only the all-ones code encodes NaN, no inf (OCP FP8 E4M3FN, max 448);
  * ``none``  — every code is a finite number (OCP MX FP6 E3M2/E2M3, FP4 E2M1, and E3M0, E1M2).
The defaults follow the OCP 8-bit FP and MX specifications; low-bit FP quantization with searched
E/M splits and biases follows Chen et al. 2024 (arXiv 2408.06995).

Rounding is arithmetic (frexp → step size → round-half-even → saturate), while decoding uses a
table built bit by bit from the layout; tests check the two against each other and against
torch's float8 casts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from .errors import FormatError

MIN_BITS, MAX_BITS = 2, 8
_SPECIALS = ("ieee", "fn", "none")

# Strings that mean "leave this tensor in floating point".
FLOAT_NAMES = frozenset({"fp32", "float32", "float", "fp16", "bf16", "none", "keep"})


@dataclass(frozen=True)
class QFormat:
    """A quantization number format.

    ``kind`` is ``"int"`` or ``"fp"``. Integer formats are two's-complement when ``signed`` (used
    symmetrically) and unsigned otherwise (used with a zero-point). Minifloats have ``ebits``
    exponent bits, ``mbits`` mantissa bits, a sign bit, an exponent ``bias`` and a convention
    ``special`` for the top exponent (see the module docstring).
    """

    kind: str
    bits: int
    signed: bool = True
    ebits: int = 0
    mbits: int = 0
    bias: int = 0
    special: str = "none"

    def __post_init__(self) -> None:
        if self.kind not in ("int", "fp"):
            raise FormatError(f"unknown format kind {self.kind!r}: use 'int' or 'fp'")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise FormatError(
                f"bit width {self.bits} is out of range: lowbit formats have {MIN_BITS}-{MAX_BITS} bits"
                " (leave a tensor in floating point with 'fp32' or 'bf16' instead)"
            )
        if self.kind == "fp":
            if self.ebits < 1 or self.mbits < 0:
                raise FormatError(f"a minifloat needs >= 1 exponent bit and >= 0 mantissa bits, got e{self.ebits}m{self.mbits}")
            if 1 + self.ebits + self.mbits != self.bits:
                raise FormatError(
                    f"fp{self.bits}_e{self.ebits}m{self.mbits}: 1 sign + {self.ebits} exponent + {self.mbits} mantissa"
                    f" bits = {1 + self.ebits + self.mbits}, not {self.bits}; fix the bit count or the E/M split"
                )
            if not self.signed:
                raise FormatError("unsigned minifloats are not supported: minifloats always carry a sign bit")
            if self.special not in _SPECIALS:
                raise FormatError(f"unknown minifloat convention {self.special!r}: use one of {_SPECIALS}")
            if self.special == "ieee" and (self.ebits < 2 or self.mbits < 1):
                raise FormatError(
                    "the 'ieee' convention needs >= 2 exponent bits and >= 1 mantissa bit (the top exponent holds"
                    " inf with mantissa 0 and NaN with any other mantissa); use '_fn' or '_none' instead"
                )
            # the largest value, computed once here: a property that called a cached function
            # would break every torch.compile graph that reads it (dynamo cannot trace lru_cache)
            object.__setattr__(self, "_fp_max", float(_fp_table(self)[1].max()))
            if self.max_value <= 0:
                raise FormatError(f"{self.name} can represent no value but 0; give it more exponent or mantissa bits")
        object.__setattr__(self, "_decode_table", decode_table(self))

    # ----------------------------------------------------------------- constructors and names
    @staticmethod
    def int(bits: int, signed: bool = True) -> "QFormat":
        """A signed (symmetric) or unsigned (asymmetric, zero-point) integer format."""
        return QFormat("int", bits, signed=signed)

    @staticmethod
    def fp(ebits: int, mbits: int, bias: int | None = None, special: str | None = None) -> "QFormat":
        """A minifloat with ``ebits``/``mbits``; bias and convention default to the OCP choices."""
        bits = 1 + ebits + mbits
        if bias is None:
            bias = 2 ** (ebits - 1) - 1
        if special is None:
            special = _default_special(ebits, mbits)
        return QFormat("fp", bits, True, ebits, mbits, bias, special)

    @property
    def name(self) -> str:
        """The canonical string; ``parse(f.name) == f``."""
        if self.kind == "int":
            return f"{'' if self.signed else 'u'}int{self.bits}"
        s = f"fp{self.bits}_e{self.ebits}m{self.mbits}"
        if self.special != _default_special(self.ebits, self.mbits):
            s += f"_{self.special}"
        if self.bias != 2 ** (self.ebits - 1) - 1:
            s += f"_b{self.bias}"
        return s

    def __str__(self) -> str:
        return self.name

    @property
    def symmetric(self) -> bool:
        """True when the format is used without a zero-point (signed ints and all minifloats)."""
        return self.kind == "fp" or self.signed

    # ----------------------------------------------------------------- range
    @property
    def max_value(self) -> float:
        """Largest finite value (for unsigned ints: 2^bits - 1)."""
        if self.kind == "int":
            return float(2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1)
        return self._fp_max

    @property
    def min_value(self) -> float:
        """Smallest finite value (``-max_value`` for symmetric formats, except -2^(b-1) for ints)."""
        if self.kind == "int":
            return float(-(2 ** (self.bits - 1)) if self.signed else 0)
        return -self.max_value

    def values(self) -> torch.Tensor:
        """All distinct finite values of the format, ascending (±0 counted once)."""
        v = torch.unique(_finite(decode_table(self)))
        return torch.where(v == 0, torch.zeros_like(v), v)  # one zero, and it is +0

    # ----------------------------------------------------------------- rounding and codes
    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round ``x`` (in format units) to the nearest representable value, ties to even,
        saturating to the largest finite value. NaN stays NaN. Returns float32."""
        x = x.float()
        if self.kind == "int":
            return torch.clamp(torch.round(x), self.min_value, self.max_value)
        # Saturate first: every value <= max_value rounds to a value <= max_value (max_value is on
        # the grid), and inf becomes max_value.
        a = torch.clamp(x.abs(), max=self.max_value)
        # Normal range: round the float32 mantissa to mbits bits, ties to even, on the bit pattern
        # (add half an ulp-of-the-target minus one, plus the target lsb, then truncate). This is
        # integer elementwise work that vectorises; frexp/ldexp or a float8 cast is 5–20× slower
        # on CPU, and this runs on every activation of FP-quantized layers.
        shift = 23 - self.mbits
        bits = a.view(torch.int32)
        lsb = (bits >> shift) & 1
        normal = ((bits + ((1 << (shift - 1)) - 1) + lsb) & ~((1 << shift) - 1)).view(torch.float32)
        # Below the smallest normal 2^emin the grid is uniform with step 2^(emin - mbits); a/step
        # and q·step are exact (powers of two), and torch.round is ties-to-even.
        emin = 1 - self.bias
        step = 2.0 ** (emin - self.mbits)
        sub = torch.round(a * (1.0 / step)) * step
        q = torch.where(a < 2.0 ** emin, sub, normal)
        q = torch.where(torch.isnan(a), a, q)  # a NaN's payload can carry into the sign bit above
        return torch.copysign(q, x)

    def round_clamped(self, v: torch.Tensor) -> torch.Tensor:
        """:meth:`round` for float32 ``v`` already clamped to ``[min_value, max_value]`` (NaN
        stays NaN): the inference fast path, equal to :meth:`round` there (tested). Compiled
        code should call :func:`round_minifloat_clamped` with :meth:`fast_round_args`, which
        reads no format properties (those would break a ``torch.compile`` graph)."""
        args = self.fast_round_args()
        if args is None:
            return torch.round(v) if self.kind == "int" else self.round(v)
        return round_minifloat_clamped(v, *args)

    def fast_round_args(self) -> tuple[float, float, float, float] | None:
        """The constants of :func:`round_minifloat_clamped` for this format, or ``None`` where it
        does not apply: integers, formats without mantissa bits (a tie between 2^k and 2^(k+1) goes to
        the even *code*, which a rounding to one significant bit cannot see), subnormal steps
        outside float32's normal range, and formats so wide that ``v · 2^(23-mbits)`` overflows."""
        if self.kind != "fp" or self.mbits == 0 or self.mbits > 22:
            return None
        emin = 1 - self.bias  # exponent of the smallest normal; below it the step is fixed
        if 127 + emin - self.mbits < 1 or math.log2(self.max_value) + 24 - self.mbits >= 127:
            return None
        return (float(2 ** (23 - self.mbits) + 1), 2.0 ** emin, 2.0 ** (self.mbits - emin),
                2.0 ** (emin - self.mbits))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (uint8) of ``round(x)``. Signed ints are stored in two's complement in
        ``bits`` bits; minifloats as sign|exponent|mantissa. NaN maps to the format's NaN code."""
        q = self.round(x)
        if self.kind == "int":
            return (q.to(torch.int32) & (2**self.bits - 1)).to(torch.uint8)
        mags, mag_codes = _fp_magnitudes(self)
        nan = torch.isnan(q)
        a = torch.where(nan, torch.zeros_like(q), q.abs())
        idx = torch.searchsorted(mags, a.contiguous()).clamp(max=len(mags) - 1)
        codes = mag_codes[idx] | (torch.signbit(q).to(torch.int32) << (self.bits - 1))
        if nan.any():
            if self.special == "none":
                raise FormatError(f"{self.name} has no NaN encoding: the tensor holds NaN values; clean the input")
            codes = torch.where(nan, torch.full_like(codes, _nan_code(self)), codes)
        return codes.to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Float32 values of integer codes; the exact inverse of :meth:`encode` on grid values."""
        if codes.dtype != torch.uint8:
            raise FormatError(f"codes must be uint8, got {codes.dtype}")
        # the table lives on the instance (see __post_init__): decode runs inside compiled
        # models (emulated layers), where a call to the lru_cache'd decode_table breaks the graph
        return self._decode_table.to(codes.device)[codes.long()]


# --------------------------------------------------------------------------- tables (cached)
def _default_special(ebits: int, mbits: int) -> str:
    if (ebits, mbits) == (5, 2):
        return "ieee"
    if (ebits, mbits) == (4, 3):
        return "fn"
    return "none"


def _nan_code(fmt: QFormat) -> int:
    # Canonical positive NaN: all exponent and mantissa bits set.
    return 2 ** (fmt.bits - 1) - 1


def _fp_table(fmt: QFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(all codes' values, non-negative finite magnitudes) built bit by bit from the layout."""
    E, M, b = fmt.ebits, fmt.mbits, fmt.bias
    emax_field = 2**E - 1
    vals = []
    for code in range(2**fmt.bits):
        sign = -1.0 if code >> (E + M) else 1.0
        e = (code >> M) & emax_field
        m = code & (2**M - 1)
        if fmt.special == "ieee" and e == emax_field:
            v = math.inf if m == 0 else math.nan
        elif fmt.special == "fn" and e == emax_field and m == 2**M - 1:
            v = math.nan
        elif e == 0:
            v = math.ldexp(m / 2**M, 1 - b)
        else:
            v = math.ldexp(1 + m / 2**M, e - b)
        vals.append(sign * v)
    table = torch.tensor(vals, dtype=torch.float32)
    finite = table[torch.isfinite(table)]
    return table, finite[finite >= 0]


@lru_cache(maxsize=None)
def decode_table(fmt: QFormat) -> torch.Tensor:
    """Value of every code 0 .. 2^bits - 1 (float32; NaN/inf where the format has them)."""
    if fmt.kind == "int":
        codes = torch.arange(2**fmt.bits, dtype=torch.int32)
        if fmt.signed:  # sign-extend two's complement
            codes = codes - ((codes >> (fmt.bits - 1)) & 1) * 2**fmt.bits
        return codes.float()
    return _fp_table(fmt)[0]


@lru_cache(maxsize=None)
def _fp_magnitudes(fmt: QFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted non-negative finite magnitudes and the positive code of each."""
    table = _fp_table(fmt)[0][: 2 ** (fmt.bits - 1)]  # positive half
    ok = torch.isfinite(table)
    codes = torch.arange(len(table), dtype=torch.int32)[ok]
    mags = table[ok]
    order = torch.argsort(mags)
    return mags[order].contiguous(), codes[order]


def _finite(t: torch.Tensor) -> torch.Tensor:
    return t[torch.isfinite(t)]


# --------------------------------------------------------------------------- parsing
_ALIASES = {
    "fp8": "fp8_e4m3",
    "e4m3": "fp8_e4m3",
    "fp8_e4m3fn": "fp8_e4m3",
    "e5m2": "fp8_e5m2",
    "fp6": "fp6_e3m2",
    "fp4": "fp4_e2m1",
    "nvfp4": "fp4_e2m1",
    "mxfp4": "fp4_e2m1",
}
_INT_RE = re.compile(r"^(u?)int(\d+)$")
_FP_RE = re.compile(r"^fp(\d+)_e(\d+)m(\d+)(?:_(ieee|fn|none))?(?:_b(-?\d+))?$")


def parse(spec: "str | QFormat") -> QFormat:
    """Parse a format string: ``int2``…``int8``, ``uint2``…``uint8``, ``fp8_e4m3``, ``fp8_e5m2``,
    ``fp6_e3m2``, ``fp6_e2m3``, ``fp4_e2m1``, ``fp4_e3m0``, ``fp4_e1m2`` or any ``fpB_eEmM``,
    optionally followed by ``_ieee``/``_fn``/``_none`` (top-exponent convention) and ``_bN``
    (exponent bias). Aliases: ``fp8`` (E4M3), ``fp6`` (E3M2), ``fp4``/``nvfp4``/``mxfp4`` (E2M1)."""
    if isinstance(spec, QFormat):
        return spec
    if not isinstance(spec, str):
        raise FormatError(f"a format must be a string like 'int8' or 'fp8_e4m3', got {type(spec).__name__}")
    s = _ALIASES.get(spec.strip().lower(), spec.strip().lower())
    m = _INT_RE.match(s)
    if m:
        return QFormat.int(int(m.group(2)), signed=not m.group(1))
    m = _FP_RE.match(s)
    if m:
        bits, E, M = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if not MIN_BITS <= bits <= MAX_BITS:
            QFormat("int", bits)  # raises the bit-width error
        if 1 + E + M != bits:
            raise FormatError(
                f"{spec!r}: 1 sign + {E} exponent + {M} mantissa bits = {1 + E + M}, not {bits};"
                f" write fp{1 + E + M}_e{E}m{M} or change the E/M split"
            )
        bias = int(m.group(5)) if m.group(5) is not None else None
        return QFormat.fp(E, M, bias=bias, special=m.group(4))
    raise FormatError(
        f"unknown number format {spec!r}: use intB / uintB (B = 2..8) or fpB_eEmM such as fp8_e4m3,"
        " fp8_e5m2, fp6_e3m2, fp4_e2m1"
    )


def parse_optional(spec: "str | QFormat | None") -> QFormat | None:
    """Like :func:`parse`, but ``None`` and float names (``fp32``, ``bf16``, ``none``) mean
    "not quantized" and return ``None``."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in FLOAT_NAMES):
        return None
    return parse(spec)


KNOWN_FORMATS = (
    "int2", "int3", "int4", "int5", "int6", "int7", "int8",
    "uint2", "uint4", "uint8",
    "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "fp4_e3m0", "fp4_e1m2",
)


def round_minifloat_clamped(v: torch.Tensor, split: float, smallest_normal: float, sub_inv: float,
                            sub_step: float) -> torch.Tensor:
    """Round float32 ``v`` (inside the format's range) to a minifloat grid, ties to even; the
    constants come from :meth:`QFormat.fast_round_args` (for ``mbits`` mantissa bits and smallest
    normal exponent ``emin``: ``2^(23-mbits) + 1``, ``2^emin``, ``2^(mbits-emin)``, ``2^(emin-mbits)``).

    Normal range: Veltkamp's splitting (Dekker 1971, "A floating-point technique for extending
    the available precision"): with ``c = v · split``, ``c + (v - c)`` is ``v`` rounded to
    ``mbits + 1`` significant bits, three float32 operations in round-to-nearest-even
    arithmetic. Below ``2^emin`` the grid is uniform, ``round(v · sub_inv) · sub_step`` (exact
    powers of two; ``torch.round`` is ties-to-even). Both equal :meth:`QFormat.round` bit for bit
    (tested on every grid point, midpoint and their float32 neighbours; for E4M3 on every float32
    in range).

    Why this form: it is plain float arithmetic, which inductor vectorises inside the kernel
    that computes the activation (GroupNorm, SiLU). Reading the exponent off the bit pattern
    needs a float/int bitcast, which inductor's C++ emits as a scalar loop (3.9 vs 1.8 ms for
    2.4M elements); :meth:`QFormat.round`'s ``copysign``/``isnan`` and a float8 cast are scalar
    too. The constants are plain floats, not the integer exponents: a helper compiled with
    ``dynamic=True`` makes integer arguments symbolic and would evaluate ``2 ** k`` inside the
    loop (3× slower). It runs on every activation of FP-quantized layers."""
    # (exact only without FMA contraction or reassociation of these three operations: inductor
    # compiles with -ffp-contract=off and without unsafe-math, its defaults; the bf16 activation
    # tests check the compiled helper on every bf16 input)
    c = v * split
    hi = c + (v - c)
    sub = torch.round(v * sub_inv) * sub_step
    return torch.where(v.abs() < smallest_normal, sub, hi)

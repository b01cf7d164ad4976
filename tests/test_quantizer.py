"""Tests for lowbit.quantizer: accuracy (SQNR), stored == simulated, zero-points, STE gradients,
an independent numpy reference, and errors."""

from __future__ import annotations

import math
import os
import zlib

import numpy as np
import pytest
import torch

from lowbit.errors import CalibrationError, FormatError
from lowbit.formats import parse
from lowbit.quantizer import Granularity, Quantizer, scale_zero_from_range


def make_quantizer(fmt: str, granularity: str, x: torch.Tensor) -> Quantizer:
    """A quantizer calibrated with min-max ranges of ``x`` at its granularity."""
    q = Quantizer(parse(fmt), granularity, shape=tuple(x.shape))
    xg = x.detach().reshape(*q.scale_shape, -1)
    q.set_range(xg.amin(-1), xg.amax(-1))
    return q


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(20 * torch.log10(x.norm() / (x - y).norm()))


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return torch.randn(512, 512, generator=torch.Generator().manual_seed(0))


# =========================================================================== accuracy
# Measured on this weight (torch 2.13 CPU, seed 0), symmetric min-max scales (amax per channel):
#   int8: tensor 39.50, channel 42.53, group64 44.53 dB
#   int4: tensor 14.34, channel 17.37, group64 19.35 dB
#   fp8_e4m3: tensor 31.54, channel 31.60, group64 32.03 dB
# Theory for a uniform quantizer: SQNR ~ 6.02 b + 4.77 - 20 log10(peak / rms). Per channel the
# peak of 512 Gaussian samples is ~3.3 sigma (crest factor, as a ratio of mean powers over the
# channels: 10.34 dB), giving 42.6 dB for b = 8 and 18.5 dB for b = 4. A symmetric signed quantizer uses only 2^b - 1 levels, i.e. 2^b - 2 steps, over
# [-peak, peak] (step = peak/7 instead of 2 peak/16 for int4), which costs 20 log10(2^b / (2^b - 2)):
# 1.16 dB at 4 bits and 0.07 dB at 8 bits -> 17.35 dB and 42.52 dB predicted, 17.37 and 42.53
# measured. (A threshold of 19 dB for
# per-channel INT4 is therefore not reachable by a correct min-max INT4 quantizer on Gaussian
# data; it is reached with MSE-clipped scales, which the 4-bit recipes use — see below — or with
# group-64 scales.) FP8 E4M3 is scale-invariant to first order: with
# 3 mantissa bits the relative step is 2^-3 within each binade, and for values spread over a binade
# SQNR ~ 10 log10(12 * (7/3) * 2^(2*3)) = 32.5 dB; Gaussian data gives ~31.6 dB.
SQNR_MIN = {"int8": 40.5, "int4": 15.5, "fp8_e4m3": 30.0}


@pytest.mark.parametrize("fmt", sorted(SQNR_MIN))
def test_sqnr_per_channel(weight, fmt, record_property):
    q = make_quantizer(fmt, "channel", weight)
    with torch.no_grad():
        s = sqnr_db(weight, q(weight))
    record_property(f"sqnr_{fmt}_channel_db", round(s, 2))
    print(f"SQNR {fmt} per-channel: {s:.2f} dB")
    assert s >= SQNR_MIN[fmt], f"{fmt}: {s:.2f} dB"
    # and not suspiciously high either (a quantizer that does nothing would give inf)
    assert s <= SQNR_MIN[fmt] + 4


def test_sqnr_theory_int8_int4(weight):
    """The measured per-channel SQNR agrees with the uniform-noise model within 0.5 dB."""
    # Noise power adds up over channels, so the crest factor is a ratio of mean powers.
    peak2 = weight.abs().amax(1).double().pow(2).mean()
    rms2 = weight.double().pow(2).mean()
    crest_db = float(10 * torch.log10(peak2 / rms2))
    for fmt, b in (("int8", 8), ("int4", 4)):
        q = make_quantizer(fmt, "channel", weight)
        with torch.no_grad():
            s = sqnr_db(weight, q(weight))
        theory = 6.02 * b + 4.77 - crest_db - 20 * math.log10(2**b / (2**b - 2))
        assert abs(s - theory) < 0.3, (fmt, s, theory)


@pytest.mark.parametrize("fmt, minmax_min, mse_min", [("int4", 15.5, 19.0), ("fp4_e2m1", 18.5, 19.0)])
def test_sqnr_4bit_per_channel_with_mse_clipping(weight, fmt, minmax_min, mse_min):
    """The 4-bit recipes' MSE clipping search reaches >= 19 dB per channel (measured: INT4 19.40,
    FP4 E2M1 19.30 dB; theory for the optimally clipped 4-bit uniform quantizer of a Gaussian is
    ~20 dB). Under min-max scales FP4 beats INT4 (18.91 vs 17.37 dB): its non-uniform grid fits a
    bell-shaped distribution better, as Chen et al. 2024 report."""
    from lowbit.calibration import weight_range

    out = {}
    for obs in ("minmax", "mse"):
        q = Quantizer(parse(fmt), "channel", shape=tuple(weight.shape))
        q.set_range(*weight_range(weight, q, obs))
        with torch.no_grad():
            out[obs] = sqnr_db(weight, q(weight))
    assert out["minmax"] >= minmax_min and out["mse"] >= mse_min and out["mse"] > out["minmax"], out


def test_fp4_beats_int4_under_minmax(weight):
    with torch.no_grad():
        fp4 = sqnr_db(weight, make_quantizer("fp4_e2m1", "channel", weight)(weight))
        int4 = sqnr_db(weight, make_quantizer("int4", "channel", weight)(weight))
    assert fp4 > int4 + 1.0  # measured 18.91 vs 17.37 dB


def test_finer_granularity_is_more_accurate_int4(weight, record_property):
    with torch.no_grad():
        s = {g: sqnr_db(weight, make_quantizer("int4", g, weight)(weight)) for g in ("tensor", "channel", "group64")}
    for g, v in s.items():
        record_property(f"sqnr_int4_{g}_db", round(v, 2))
    print("SQNR int4:", {g: round(v, 2) for g, v in s.items()})
    assert s["tensor"] <= s["channel"] <= s["group64"]
    assert s["group64"] >= 18.5  # measured 19.35 dB
    assert s["channel"] - s["tensor"] > 1.0 and s["group64"] - s["channel"] > 1.0


# =========================================================================== stored == simulated
CASES = [
    ((32, 128), "tensor"), ((32, 128), "channel"), ((32, 128), "group64"), ((32, 128), "group16"),
    ((16, 8, 3, 3), "tensor"), ((16, 8, 3, 3), "channel"), ((16, 8, 3, 3), "group24"), ((16, 8, 3, 3), "group9"),
]
FORMATS = ["int4", "int8", "uint4", "uint8", "fp8_e4m3", "fp4_e2m1"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape, granularity", CASES)
def test_decode_encode_equals_forward(fmt, shape, granularity):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((fmt, shape, granularity)).encode()))
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape[0], *[1] * (len(shape) - 1), generator=gen))
    x.view(-1)[::7] = 0.0  # exact zeros
    q = make_quantizer(fmt, granularity, x)
    # Calibrate on a shrunk copy for half the channels so that clamping is exercised too.
    with torch.no_grad():
        q.scale.mul_(torch.where(torch.arange(q.scale_shape[0]) % 2 == 0, 0.5, 1.0).unsqueeze(1))
    with torch.no_grad():
        sim = q(x)
    codes = q.encode(x)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert int(codes.max()) < 2 ** parse(fmt).bits
    stored = q.decode(codes)
    assert stored.shape == x.shape
    assert torch.equal(stored, sim)
    assert torch.isfinite(sim).all()
    # Zeros stay exactly zero in every format (symmetric: zero-point 0; unsigned: integer zero-point).
    assert (sim.view(-1)[::7] == 0).all()


def test_forward_and_encode_with_bf16_and_scalar_granularity_on_any_shape():
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(3))
    q = Quantizer(parse("int8"))  # activation quantizer: per tensor, any input shape
    q.set_range(torch.tensor(-2.0), torch.tensor(2.0))
    assert torch.equal(q.decode(q.encode(x)), q(x))
    y = q(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


# =========================================================================== zero-points
@pytest.mark.parametrize("fmt", ["uint4", "uint8", "uint2"])
def test_asymmetric_represents_zero_exactly(fmt):
    gen = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(64, 96, generator=gen)) - 0.1  # SiLU/ReLU-like floor, then shifted
    x[x < 0] = torch.where(torch.rand(int((x < 0).sum()), generator=gen) < 0.5, 0.0, -0.1)
    assert (x == 0).sum() > 1000
    for g in ("tensor", "channel", "group32"):
        q = make_quantizer(fmt, g, x)
        # the zero-point is an integer in the code range
        assert torch.equal(q.zero, torch.round(q.zero)) and (q.zero >= 0).all()
        y = q(x)
        assert (y[x == 0] == 0).all()
        assert torch.equal(q.decode(q.encode(x))[x == 0], torch.zeros(int((x == 0).sum())))


def test_relu_output_zeros_quantize_to_zero():
    x = torch.relu(torch.randn(1000, generator=torch.Generator().manual_seed(2)))
    q = Quantizer(parse("uint8"))
    q.set_range(x.min(), x.max())
    assert float(q.zero) == 0.0
    with torch.no_grad():
        y = q(x)
    assert (y[x == 0] == 0).all()
    assert (y >= 0).all()
    assert (y - x).abs().max() <= float(q.scale.detach()) / 2 * (1 + 1e-6)


@pytest.mark.parametrize("lo, hi, wlo, whi", [(1.0, 3.0, 0.0, 3.0), (-3.0, -1.0, -3.0, 0.0), (0.5, 0.5, 0.0, 0.5)])
def test_ranges_are_widened_to_include_zero(lo, hi, wlo, whi):
    fmt = parse("uint4")
    scale, zero = scale_zero_from_range(fmt, torch.tensor(lo), torch.tensor(hi))
    assert float(scale) == pytest.approx((whi - wlo) / 15, rel=1e-6)
    assert float(zero) == round(-wlo / ((whi - wlo) / 15))
    q = Quantizer(fmt)
    q.set_range(torch.tensor(lo), torch.tensor(hi))
    x = torch.linspace(wlo, whi, 301)
    y = q(x)
    assert float(q(torch.tensor([0.0])).detach()) == 0.0
    # The whole widened range is covered: every value is within half a step (not clamped to lo/hi).
    assert (y - x).abs().max() <= float(scale) / 2 * (1 + 1e-5)


def test_symmetric_ranges_cover_the_larger_side():
    scale, zero = scale_zero_from_range(parse("int8"), torch.tensor([-2.0, -0.5]), torch.tensor([1.0, 4.0]))
    assert torch.equal(zero, torch.zeros(2))
    torch.testing.assert_close(scale, torch.tensor([2.0 / 127, 4.0 / 127]), rtol=0, atol=0)


def test_all_zero_channel_gets_a_finite_scale():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    x[2] = 0
    for fmt in ("int8", "uint8", "fp8_e4m3"):
        q = make_quantizer(fmt, "channel", x)
        assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
        y = q(x)
        assert torch.isfinite(y).all() and (y[2] == 0).all()


# =========================================================================== straight-through estimator
@pytest.mark.parametrize("fmt", ["int8", "int4", "uint8", "fp8_e4m3", "fp4_e2m1"])
def test_straight_through_gradient(fmt):
    f = parse(fmt)
    q = Quantizer(f)
    q.set_range(torch.tensor(-1.0), torch.tensor(1.5))
    s, z = float(q.scale.detach()), float(q.zero)
    # Independent description of the clamped range in real units: [(min - z) s, (max - z) s].
    lo, hi = (f.min_value - z) * s, (f.max_value - z) * s
    gen = torch.Generator().manual_seed(7)
    x = torch.empty(4000).uniform_(lo - 2, hi + 2, generator=gen)
    margin = 1e-3 * (hi - lo)
    x = x[((x - lo).abs() > margin) & ((x - hi).abs() > margin)].requires_grad_(True)
    inside = (x > lo) & (x < hi)
    assert inside.sum() > 100 and (~inside).sum() > 100
    g = torch.randn(x.shape, generator=gen)
    q(x).backward(g)
    # Inside: the upstream gradient (x / s then * s, so equal up to float32 rounding); outside: 0.
    torch.testing.assert_close(x.grad[inside], g[inside], rtol=1e-6, atol=0)
    assert (x.grad[~inside] == 0).all()
    assert q.scale.grad is not None and q.scale.grad.shape == q.scale.shape
    assert torch.isfinite(q.scale.grad).all() and (q.scale.grad != 0).all()


def test_straight_through_gradient_exact_with_power_of_two_scale():
    q = Quantizer(parse("int8"))
    q.set_range(torch.tensor(-127 / 128), torch.tensor(127 / 128))  # scale = 2^-7 exactly
    assert float(q.scale.detach()) == 2**-7
    x = torch.tensor([-3.0, -0.7, -0.01, 0.0, 0.3, 0.9921, 1.5, 10.0], requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    q(x).backward(g)
    # clamped range is [-128, 127] * 2^-7 = [-1, 0.9921875]
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0]
    # LSQ-style scale gradient: inside (q - x/s), outside the clamp value; check it by hand.
    xs = x.detach() / q.scale.detach()
    y = xs.clamp(-128, 127)
    expected = (g * (torch.round(y) - torch.where((xs > -128) & (xs < 127), xs, torch.zeros_like(xs)))).sum()
    torch.testing.assert_close(q.scale.grad.reshape(()), expected, rtol=1e-5, atol=1e-5)


def test_per_channel_scale_receives_gradient():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(8), requires_grad=True)
    q = make_quantizer("int4", "group16", w)
    q(w).pow(2).sum().backward()
    assert q.scale.grad.shape == (8, 2)
    assert torch.isfinite(q.scale.grad).all() and (q.scale.grad != 0).all()
    assert torch.isfinite(w.grad).all()


# =========================================================================== numpy reference
def numpy_int8_per_channel(w: np.ndarray) -> np.ndarray:
    """Symmetric per-channel INT8 written from scratch: scale = amax / 127, round half to even,
    clip to [-128, 127], multiply back (float32 throughout)."""
    w = w.astype(np.float32)
    amax = np.abs(w).max(axis=1, keepdims=True)
    scale = amax / np.float32(127)
    y = np.clip(np.round(w / scale), -128, 127)  # np.round rounds half to even
    return (y * scale).astype(np.float32)


def test_int8_per_channel_matches_numpy_reference():
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(64, 256, generator=gen) * torch.exp(torch.randn(64, 1, generator=gen))
    # A row with scale exactly 1 and exact ties: 2.5 -> 2, 3.5 -> 4, -2.5 -> -2, 0.5 -> 0, -126.5 -> -126.
    w[0] = 0.0
    w[0, :6] = torch.tensor([127.0, 2.5, 3.5, -2.5, 0.5, -126.5])
    q = make_quantizer("int8", "channel", w)
    with torch.no_grad():
        ours = q(w).numpy()
    ref = numpy_int8_per_channel(w.numpy())
    np.testing.assert_array_equal(ours, ref)
    assert ours[0, :6].tolist() == [127.0, 2.0, 4.0, -2.0, 0.0, -126.0]
    # The codes are the two's-complement bytes of the integers.
    codes = q.encode(w)[0, :6].tolist()
    assert codes == [127, 2, 4, 254, 0, 130]


def test_int8_per_tensor_matches_numpy_with_clipping():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(12)) * 3
    q = Quantizer(parse("int8"))
    q.set_range(torch.tensor(-2.0), torch.tensor(2.0))
    s = np.float32(2.0) / np.float32(127)
    ref = np.clip(np.round(x.numpy() / s), -128, 127) * s
    with torch.no_grad():
        np.testing.assert_array_equal(q(x).numpy(), ref.astype(np.float32))


# =========================================================================== errors
def test_group_size_must_divide_the_input_dimension():
    with pytest.raises(FormatError) as info:
        Quantizer(parse("int4"), "group48", shape=(16, 100))
    msg = str(info.value)
    assert "48" in msg and "100" in msg and "\n" not in msg
    with pytest.raises(FormatError, match=r"64.*72|72.*64"):
        Quantizer(parse("int4"), "group64", shape=(16, 8, 3, 3))  # 8*3*3 = 72


@pytest.mark.parametrize("spec", ["rows", "group", "group0", "", "channels2", "g-4"])
def test_unknown_granularity(spec):
    with pytest.raises(FormatError) as info:
        Granularity.parse(spec)
    assert repr(spec) in str(info.value)
    with pytest.raises(FormatError):
        Quantizer(parse("int8"), spec, shape=(4, 64))


@pytest.mark.parametrize("spec, expected", [
    ("tensor", Granularity("tensor")), ("per-channel", Granularity("channel")),
    ("group64", Granularity("group", 64)), ("g128", Granularity("group", 128)),
    ("group:32", Granularity("group", 32)), (" Group_16 ", Granularity("group", 16)),
])
def test_granularity_parse(spec, expected):
    assert Granularity.parse(spec) == expected
    assert Granularity.parse(expected.name) == expected


def test_channel_granularity_needs_a_shape():
    with pytest.raises(FormatError, match="shape"):
        Quantizer(parse("int8"), "channel")
    with pytest.raises(FormatError, match=">= 2 dims"):
        Quantizer(parse("int8"), "channel", shape=(10,))


def test_forward_before_calibration_raises():
    q = Quantizer(parse("int8"), "channel", shape=(4, 8))
    x = torch.randn(4, 8)
    with pytest.raises(CalibrationError, match="calibrate"):
        q(x)
    with pytest.raises(CalibrationError):
        q.encode(x)
    q.set_range(x.amin(1, keepdim=True), x.amax(1, keepdim=True))
    assert bool(q.calibrated)
    q(x)


def test_disabled_quantizer_is_identity():
    q = Quantizer(None)
    x = torch.randn(5)
    assert q(x) is x and not q.enabled


# =========================================================================== fast inference paths
@pytest.mark.parametrize("fmt", ["int8", "uint8", "int4", "uint4", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group16"])
def test_fast_inference_path_is_bit_identical_to_the_reference(fmt, granularity, monkeypatch, compiled="0"):
    """Under no_grad, ints use PyTorch's fused fake-quant kernels and minifloats the bit-built
    rounding (compiled into one loop for per-tensor scales unless LOWBIT_COMPILE_QUANT=0); all
    must equal the reference arithmetic (quant_dequant) bit for bit, ties included."""
    from lowbit.quantizer import grouped, quant_dequant

    monkeypatch.setenv("LOWBIT_COMPILE_QUANT", compiled)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(32, 64, generator=gen) * 2
    q = make_quantizer(fmt, granularity, x)
    s, z = q.scale.detach().unsqueeze(-1), q.zero.unsqueeze(-1)
    # exact ties for ints: values at half-steps of the grid
    ties = (torch.randint(-20, 20, (32, 64), generator=gen) + 0.5).reshape(*q.scale_shape, -1) * s
    for inp in (x, ties.reshape(32, 64)):
        ref = quant_dequant(grouped(inp, q.scale_shape), s, z, q.fmt).reshape(inp.shape)
        with torch.no_grad():
            fast = q(inp)
        assert torch.equal(fast, ref)
        assert torch.equal(q(inp.clone().requires_grad_(True)).detach(), ref)  # the STE path too


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp4_e2m1", "int8", "uint4"])
def test_compiled_fast_path_is_bit_identical_to_the_reference(fmt, monkeypatch):
    """The compiled helpers (per-tensor minifloat and INT activations) compute the same bits."""
    monkeypatch.setattr("lowbit._compiled.MIN_COMPILED_ELEMENTS", 0)  # the 32×64 inputs too
    test_fast_inference_path_is_bit_identical_to_the_reference(fmt, "tensor", monkeypatch, compiled="1")
    if os.environ["LOWBIT_COMPILE_QUANT"] == "0":  # the helper failed to build and fell back to eager
        pytest.skip("torch.compile cannot build here (no C++ compiler?); the eager path was tested")


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1"])
def test_minifloat_quantizer_inside_a_compiled_graph_equals_the_reference(fmt):
    """Compiled inference (attention operands of FP recipes) takes the exact fast rounding, traced
    inline so that inductor fuses and vectorises it; the values equal quant_dequant's bit for bit,
    on random inputs, on every scaled grid point and on every midpoint between two (the ties)."""
    from lowbit.quantizer import grouped, quant_dequant

    gen = torch.Generator().manual_seed(12)
    x = torch.randn(32, 64, generator=gen) * 2
    q = make_quantizer(fmt, "tensor", x)
    assert q._fp_fast is not None
    s, z = q.scale.detach().unsqueeze(-1), q.zero.unsqueeze(-1)
    grid = q.fmt.values().float().unique()
    mids = (grid[1:] + grid[:-1]) / 2
    inputs = (x, torch.cat([grid, mids]).reshape(1, -1) * s.reshape(()), x.bfloat16())
    torch._dynamo.reset()  # three inputs per format: stay under the recompile limit
    compiled = torch.compile(q, dynamic=False, fullgraph=True)
    for inp in inputs:
        ref = quant_dequant(grouped(inp.float(), q.scale_shape), s, z, q.fmt).reshape(inp.shape).to(inp.dtype)
        with torch.no_grad():
            got = compiled(inp)
        assert got.dtype == inp.dtype and torch.equal(got, ref)

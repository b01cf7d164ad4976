"""lowbit.kernels.onednn: oneDNN's int8 conv2d/linear compute the same integers as the simulated
layer. Every output is checked against an independent float64 reference built from the integer
codes (activations quantized with quant_dequant's arithmetic, weights as given)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import FormatError
from lowbit.formats import parse
from lowbit.kernels import onednn
from lowbit.quantizer import Quantizer

if not onednn.available():
    pytest.skip("this PyTorch build/CPU has no oneDNN int8 conv/linear operators", allow_module_level=True)

from lowbit.kernels.onednn import Int8Conv2dKernel, Int8LinearKernel, quantize_u8


@pytest.fixture(autouse=True)
def _eager_quant(monkeypatch):
    monkeypatch.setenv("LOWBIT_COMPILE_QUANT", "0")  # the compiled quantizer has its own test


def ref_codes(x: torch.Tensor, fmt, s: float, z: float) -> torch.Tensor:
    """round(clamp(x·(1/s), qmin − z, qmax − z)) + z in float32, as lowbit.quantizer.quant_dequant."""
    inv = 1.0 / torch.tensor(s, dtype=torch.float32)
    return torch.round(torch.clamp(x.float() * inv, fmt.min_value - z, fmt.max_value - z)) + z


def ref_output(acc: torch.Tensor, s_x: float, w_scale: torch.Tensor, bias, shape) -> torch.Tensor:
    y = acc * s_x * w_scale.double().reshape(shape)
    return y if bias is None else y + bias.double().reshape(shape)


def check_close(y: torch.Tensor, ref: torch.Tensor, acc: torch.Tensor, s_x: float, w_scale, bias, shape):
    """Within 1 LSB (s_x·s_w[c]) of the output scale, and in fact within float32 epilogue rounding."""
    assert y.dtype == torch.float32 and y.shape == ref.shape
    lsb = (s_x * w_scale.double()).reshape(shape)
    err = (y.double() - ref).abs()
    assert (err <= lsb).all(), f"max error {float((err / lsb).max()):.3f} LSB"
    # same integers: only the float32 epilogue (a few roundings of 2^-24) differs from float64
    mag = (acc.abs() * lsb) + (0 if bias is None else bias.double().abs().reshape(shape))
    assert (err <= 1e-6 * mag + 1e-30).all()


def _act(act: str):
    """(format, scale, zero-point) of an activation quantizer: uint8 with a non-zero zero-point,
    signed int8 (zero 0, shifted by 128 inside the kernel), uint4 with a zero-point."""
    return {"uint8": (parse("uint8"), 0.03, 37.0),
            "int8": (parse("int8"), 0.025, 0.0),
            "uint4": (parse("uint4"), 0.35, 6.0)}[act]


def _weights(shape, wfmt: str, g: torch.Generator) -> torch.Tensor:
    lo, hi = (-128, 128) if wfmt == "int8" else (-8, 8)
    return torch.randint(lo, hi, shape, generator=g).to(torch.int8)


# in, out, kernel, stride, padding, dilation, groups
CONVS = [
    (8, 16, 3, 1, 1, 1, 1),    # 3x3 same
    (16, 8, 1, 1, 0, 1, 1),    # 1x1
    (8, 8, 3, 2, 1, 1, 1),     # 3x3 stride 2 (downsampler)
    (8, 8, 3, 1, 1, 1, 8),     # depthwise
    (12, 6, 3, 2, 0, 1, 3),    # grouped, stride 2, no padding
    (8, 12, 3, 1, 2, 2, 2),    # dilated, grouped
    (4, 8, (3, 1), (2, 1), (1, 0), 1, 1),  # rectangular kernel, anisotropic stride
]


def _pair(v):
    return (v, v) if isinstance(v, int) else v


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act,wfmt", [("uint8", "int8"), ("int8", "int8"), ("uint4", "int4"), ("uint8", "int4")])
@pytest.mark.parametrize("cin,cout,k,stride,pad,dil,groups", CONVS)
def test_conv2d_matches_integer_reference(cin, cout, k, stride, pad, dil, groups, act, wfmt, bias):
    g = torch.Generator().manual_seed(cin * 100 + cout * 7 + groups)
    fmt, s_x, z_x = _act(act)
    x = torch.randn(2, cin, 9, 7, generator=g) * 3.0  # saturates both ends at every scale above
    w = _weights((cout, cin // groups, *_pair(k)), wfmt, g)
    w_scale = torch.rand(cout, generator=g) * 0.01 + 1e-3
    b = torch.randn(cout, generator=g) if bias else None
    kern = Int8Conv2dKernel(w, w_scale, b, fmt, s_x, z_x, _pair(stride), _pair(pad), _pair(dil), groups)
    y = kern(x)

    codes = ref_codes(x, fmt, s_x, z_x)
    assert codes.min() == fmt.min_value and codes.max() == fmt.max_value  # both ends clamp
    acc = F.conv2d((codes - z_x).double(), w.double(), None, _pair(stride), _pair(pad), _pair(dil), groups)
    ref = ref_output(acc, s_x, w_scale, b, (1, -1, 1, 1))
    check_close(y, ref, acc, s_x, w_scale, b, (1, -1, 1, 1))
    assert kern.fake(kern.act(x)).shape == y.shape  # torch.compile's shape function agrees


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act,wfmt", [("uint8", "int8"), ("int8", "int8"), ("uint4", "int4"), ("uint8", "int4")])
@pytest.mark.parametrize("lead", [(13,), (2, 5), (1,)])
def test_linear_matches_integer_reference(lead, act, wfmt, bias):
    k, n = 40, 24
    g = torch.Generator().manual_seed(len(lead) * 10 + lead[-1])
    fmt, s_x, z_x = _act(act)
    x = torch.randn(*lead, k, generator=g) * 2.0
    w = _weights((n, k), wfmt, g)
    w_scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    b = torch.randn(n, generator=g) if bias else None
    y = Int8LinearKernel(w, w_scale, b, fmt, s_x, z_x)(x)
    assert y.shape == (*lead, n)
    codes = ref_codes(x, fmt, s_x, z_x)
    acc = (codes - z_x).double() @ w.double().t()
    ref = ref_output(acc, s_x, w_scale, b, (-1,))
    check_close(y, ref, acc, s_x, w_scale, b, (-1,))


@pytest.mark.parametrize("act", ["uint8", "int8", "uint4"])
def test_reference_codes_are_lowbits_quantizer_codes(act):
    """The reference above is lowbit's arithmetic: its codes equal Quantizer.encode's values."""
    fmt, s_x, z_x = _act(act)
    q = Quantizer(fmt, "tensor")
    with torch.no_grad():
        q.scale.fill_(s_x)
        q.zero.fill_(z_x)
        q.calibrated.fill_(True)
    x = torch.randn(500, generator=torch.Generator().manual_seed(3)) * 3
    x[:6] = torch.tensor([0.5, 1.5, -2.5, 1e30, -1e30, 0.0]) * s_x
    assert torch.equal(ref_codes(x, fmt, s_x, z_x), fmt.decode(q.encode(x)))


def test_linear_worst_case_accumulators():
    """Activations at the top code and weights at ±127/−128 over a long reduction: the largest
    accumulators (|acc| close to 2^24), where int16 pair sums would saturate without VNNI."""
    k, n = 512, 8
    fmt = parse("uint8")
    x = torch.full((6, k), 1e6)
    x[1::2, ::2] = -1e6  # codes 0 and 255 mixed
    w = torch.full((n, k), 127, dtype=torch.int8)
    w[1::2] = -128
    w[2, ::2] = -128
    w_scale = torch.full((n,), 1e-4)
    y = Int8LinearKernel(w, w_scale, None, fmt, 0.01, 0.0)(x)
    codes = ref_codes(x, fmt, 0.01, 0.0)
    assert set(codes.unique().tolist()) == {0.0, 255.0}
    acc = codes.double() @ w.double().t()
    assert acc.abs().max() >= 255 * 128 * 500
    check_close(y, ref_output(acc, 0.01, w_scale, None, (-1,)), acc, 0.01, w_scale, None, (-1,))


def test_conv_worst_case_accumulators():
    cin, cout = 64, 4
    fmt = parse("int8")  # signed: codes −128 / 127, shifted to 0 / 255 inside
    x = torch.full((1, cin, 6, 6), 1e6)
    x[:, ::3] = -1e6
    w = torch.full((cout, cin, 3, 3), -128, dtype=torch.int8)
    w[::2, ::3] = 127
    w_scale = torch.full((cout,), 1e-4)
    kern = Int8Conv2dKernel(w, w_scale, None, fmt, 0.01, 0.0, (1, 1), (1, 1), (1, 1), 1)
    y = kern(x)
    codes = ref_codes(x, fmt, 0.01, 0.0)
    acc = F.conv2d(codes.double(), w.double(), None, 1, 1)
    assert acc.abs().max() >= 127 * 128 * cin * 9 * 0.5
    check_close(y, ref_output(acc, 0.01, w_scale, None, (1, -1, 1, 1)), acc, 0.01, w_scale, None, (1, -1, 1, 1))


@pytest.mark.parametrize("act", ["uint8", "int8", "uint4"])
def test_huge_inputs_clamp_instead_of_wrapping(act):
    fmt, s_x, z_x = _act(act)
    x = torch.tensor([1e30, -1e30, 3e38, -3e38, 1e10, -1e10, 0.0, s_x])
    kern = Int8LinearKernel(torch.eye(8, dtype=torch.int8), torch.ones(8), None, fmt, s_x, z_x)
    codes = kern.act(x)
    assert codes.dtype == torch.uint8
    offset = 128 if fmt.signed else 0
    top, bottom = fmt.max_value + offset, fmt.min_value + offset
    assert codes.tolist() == [top, bottom, top, bottom, top, bottom, z_x + offset, z_x + offset + 1]
    # and through the kernel: each output is (code − zero)·s_x
    y = kern(x[None])[0]
    expect = torch.tensor([fmt.max_value - z_x, fmt.min_value - z_x] * 3 + [0.0, 1.0]) * s_x
    assert torch.allclose(y, expect, rtol=1e-6, atol=0)


def test_quantize_u8_rounds_half_to_even_before_the_zero_point():
    # params = [1/s, lo, hi, zero]; ties at x/s = k + 0.5 round to even *before* adding z = 3
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 300.0, -300.0])
    p = torch.tensor([1.0, -3.0, 252.0, 3.0])
    assert quantize_u8(x, p, compiled=False).tolist() == [3, 5, 5, 3, 1, 1, 255, 0]


def test_quantize_u8_compiled_equals_eager(monkeypatch):
    monkeypatch.setenv("LOWBIT_COMPILE_QUANT", "1")  # the fallback flips it to 0; monkeypatch restores
    monkeypatch.setattr("lowbit._compiled.MIN_COMPILED_ELEMENTS", 0)  # these small inputs too
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 5, 4, generator=g) * 8
    flat = x.view(-1)
    flat[:10] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 1e30, -1e30, 3e38, -0.0, 126.5]) * 0.05
    # every tie k + 0.5 in range: x·(1/s) must land on exactly the same float in both kernels
    flat[10:60] = (torch.arange(50) - 25 + 0.5) * 0.05
    params = torch.tensor([float(1.0 / torch.tensor(0.05)), -37.0, 218.0, 37.0])
    compiled = quantize_u8(x, params, compiled=True)
    import os

    if os.environ.get("LOWBIT_COMPILE_QUANT") == "0":
        pytest.skip("torch.compile is not usable here (no C++ compiler): quantize_u8 fell back to eager")
    eager = quantize_u8(x, params, compiled=False)
    assert compiled.dtype == eager.dtype == torch.uint8
    assert torch.equal(compiled, eager)
    assert torch.equal(eager.float(), ref_codes(x, parse("uint8"), 0.05, 37.0))
    # non-contiguous input (a transposed view) through the same compiled kernel
    xt = x.transpose(1, 3)
    assert torch.equal(quantize_u8(xt, params, compiled=True), quantize_u8(xt, params, compiled=False))
    # a bf16 input gets the codes of its float32 value (as the simulated layer computes them)
    xb = x.to(torch.bfloat16)
    assert torch.equal(quantize_u8(xb, params, compiled=True), quantize_u8(xb.float(), params, compiled=False))


def test_eager_conv_with_compiled_helpers_equals_without(monkeypatch):
    """With the compiled helpers on, an eager convolution quantizes its input straight into
    channels-last codes and converts a large output back to NCHW in compiled copies: the same
    codes, the same output values, and the output still NCHW (as the eager model expects)."""
    g = torch.Generator().manual_seed(21)
    w = _weights((16, 16, 3, 3), "int8", g)
    kern = Int8Conv2dKernel(w, torch.rand(16, generator=g) * 1e-2, torch.randn(16, generator=g), parse("uint8"),
                            0.03, 37.0, (1, 1), (1, 1), (1, 1), 1, out_dtype=torch.bfloat16)
    # 4×16×64×64 = 2^18 output elements: the compiled copy's size threshold, reached exactly
    x = (torch.randn(4, 16, 64, 64, generator=g) * 2).to(torch.bfloat16)
    assert x.numel() >= onednn._COMPILED_COPY_MIN
    monkeypatch.setenv("LOWBIT_COMPILE_QUANT", "0")
    eager_codes, eager_y = kern.act.nhwc(x), kern(x)
    monkeypatch.setenv("LOWBIT_COMPILE_QUANT", "1")
    codes, y = kern.act.nhwc(x), kern(x)
    if onednn.use_compiled_helpers() is False:
        pytest.skip("torch.compile is not usable here (no C++ compiler): the helpers fell back to eager")
    assert codes.is_contiguous(memory_format=torch.channels_last) and not codes.is_contiguous()
    assert torch.equal(codes, eager_codes)
    assert y.is_contiguous() and torch.equal(y, eager_y)
    y_nhwc = y.contiguous(memory_format=torch.channels_last)
    assert torch.equal(onednn.to_nchw(y_nhwc), y) and onednn.to_nchw(y_nhwc).is_contiguous()


def _linear_kernel_for_half_inputs():
    g = torch.Generator().manual_seed(9)
    w = torch.randint(-128, 128, (8, 32), generator=g).to(torch.int8)
    kern = Int8LinearKernel(w, torch.full((8,), 1e-3), None, parse("uint8"), 0.021, 37.0)
    return kern, torch.randn(400, 32, generator=g) * 2


def test_low_precision_input_gives_output_in_its_dtype():
    kern, x = _linear_kernel_for_half_inputs()
    for dtype in (torch.bfloat16, torch.float16):
        y = kern(x.to(dtype))
        assert y.dtype == dtype and y.shape == (400, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_gets_the_float32_codes(dtype):
    """The simulated layer quantizes x.float(); the kernel must see the same codes for a bf16/fp16 x
    (x·(1/s) computed in bf16 would round early: 7% of these codes differed before the fix)."""
    kern, x = _linear_kernel_for_half_inputs()
    xh = x.to(dtype)
    assert torch.equal(kern.act(xh), kern.act(xh.float()))
    assert torch.equal(kern.act(xh).float(), ref_codes(xh.float(), parse("uint8"), 0.021, 37.0))
    ref = kern(xh.float())
    assert ((kern(xh).float() - ref).abs() <= 2**-8 * ref.abs() + 1e-6).all()  # one rounding to dtype


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_out_dtype(out_dtype):
    """out_dtype=bf16: oneDNN writes bf16 directly (one rounding of the float32 result)."""
    g = torch.Generator().manual_seed(12)
    fmt, s_x, z_x = _act("uint8")
    w = torch.randint(-128, 128, (8, 16, 3, 3), generator=g).to(torch.int8)
    w_scale = torch.rand(8, generator=g) * 0.01 + 1e-3
    b = torch.randn(8, generator=g)
    x = torch.randn(2, 16, 6, 6, generator=g).to(out_dtype)
    xl = torch.randn(10, 144, generator=g).to(out_dtype)
    args = ((1, 1), (1, 1), (1, 1), 1)
    conv = Int8Conv2dKernel(w, w_scale, b, fmt, s_x, z_x, *args, out_dtype=out_dtype)
    lin = Int8LinearKernel(w.reshape(8, -1), w_scale, b, fmt, s_x, z_x, out_dtype=out_dtype)
    for kern, ref_kern, xx in ((conv, Int8Conv2dKernel(w, w_scale, b, fmt, s_x, z_x, *args), x),
                               (lin, Int8LinearKernel(w.reshape(8, -1), w_scale, b, fmt, s_x, z_x), xl)):
        y = kern(xx)
        ref = ref_kern(xx.float())  # float32 output from the same codes
        assert y.dtype == out_dtype and kern.fake(kern.act(xx)).dtype == out_dtype
        assert ((y.float() - ref).abs() <= 2**-8 * ref.abs() + 1e-6).all()


def test_bad_formats_and_zero_points_are_refused():
    w = torch.zeros(4, 16, dtype=torch.int8)
    with pytest.raises(FormatError, match="INT activation format"):
        Int8LinearKernel(w, torch.ones(4), None, parse("fp8_e4m3"), 0.1, 0.0)
    with pytest.raises(FormatError, match="int8"):
        Int8LinearKernel(w.view(torch.uint8), torch.ones(4), None, parse("uint8"), 0.1, 0.0)
    with pytest.raises(FormatError, match="int8"):
        Int8Conv2dKernel(torch.zeros(4, 2, 3, 3, dtype=torch.int32), torch.ones(4), None, parse("uint8"), 0.1, 0.0,
                         (1, 1), (1, 1), (1, 1), 1)


def test_reference_is_not_trivially_satisfied():
    """The 1-LSB check rejects an off-by-one zero-point (a kernel bug the tests must catch)."""
    g = torch.Generator().manual_seed(11)
    fmt, s_x, z_x = _act("uint8")
    x = torch.randn(10, 40, generator=g)
    w = torch.randint(-128, 128, (16, 40), generator=g).to(torch.int8)
    w_scale = torch.rand(16, generator=g) * 0.01 + 1e-3
    wrong = Int8LinearKernel(w, w_scale, None, fmt, s_x, z_x + 1)(x)
    acc = (ref_codes(x, fmt, s_x, z_x) - z_x).double() @ w.double().t()
    with pytest.raises(AssertionError):
        check_close(wrong, ref_output(acc, s_x, w_scale, None, (-1,)), acc, s_x, w_scale, None, (-1,))
    assert math.isfinite(float(wrong.abs().max()))


def test_repacking_for_new_shapes_keeps_the_weights_exact():
    """The kernels re-lay their packed weight for each new input shape (oneDNN's blocking depends
    on the whole problem); the int8 values survive any number of repacks, and a kernel that has
    been repacked computes exactly what a kernel freshly built for that shape does."""
    g = torch.Generator().manual_seed(7)
    fmt, s_x, z_x = _act("uint8")
    w = _weights((64, 32, 3, 3), "int8", g)
    ws = torch.rand(64, generator=g) * 0.01 + 1e-3
    conv = Int8Conv2dKernel(w, ws, None, fmt, s_x, z_x, (1, 1), (1, 1), (1, 1), 1)
    wl = _weights((48, 32), "int8", g)
    lin = Int8LinearKernel(wl, ws[:48], None, fmt, s_x, z_x)
    for n, h in ((2, 8), (4, 16), (1, 5), (2, 8)):
        x = torch.randn(n, 32, h, h, generator=g)
        y = conv(x)
        assert conv.packed_for == (n, 32, h, h)
        assert torch.equal(y, Int8Conv2dKernel(w, ws, None, fmt, s_x, z_x, (1, 1), (1, 1), (1, 1), 1)(x))
        xl = torch.randn(n * h, 32, generator=g)
        assert torch.equal(lin(xl), Int8LinearKernel(wl, ws[:48], None, fmt, s_x, z_x)(xl))
        assert lin.packed_for == (n * h, 32)
    assert torch.equal(conv.weight_int8(), w)
    assert torch.equal(lin.weight_int8(), wl)


def test_kernel_owns_its_weights_before_the_first_call():
    """Packing waits for the first call's shape, so until then a kernel holds plain int8 values:
    they must be its own copy, not a view of the caller's codes (which a model may release or
    overwrite), or the first call would pack whatever the buffer holds by then."""
    g = torch.Generator().manual_seed(8)
    fmt, s_x, z_x = _act("uint8")
    w = _weights((16, 8, 3, 3), "int8", g)
    wl = _weights((12, 8), "int8", g)
    ws = torch.rand(16, generator=g) * 0.01 + 1e-3
    x, xl = torch.randn(2, 8, 6, 6, generator=g), torch.randn(5, 8, generator=g)
    want = (Int8Conv2dKernel(w, ws, None, fmt, s_x, z_x, (1, 1), (1, 1), (1, 1), 1)(x),
            Int8LinearKernel(wl, ws[:12], None, fmt, s_x, z_x)(xl))
    conv = Int8Conv2dKernel(w, ws, None, fmt, s_x, z_x, (1, 1), (1, 1), (1, 1), 1)
    lin = Int8LinearKernel(wl, ws[:12], None, fmt, s_x, z_x)
    assert conv.packed_for is None and lin.packed_for is None
    w.zero_(), wl.zero_()
    assert torch.equal(conv(x), want[0]) and torch.equal(lin(xl), want[1])

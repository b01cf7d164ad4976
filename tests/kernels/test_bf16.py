"""lowbit.kernels.bf16: activations as exact unscaled format values, weights as bf16(w_q·s_w·s_x),
one bf16 GEMM/convolution with a bf16 bias. Beyond the simulated layer that rounds each scaled
weight, the bias and the output to bf16 (8 significant bits: relative error <= 2^-8 each) and,
for weight-only layers, the input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats import KNOWN_FORMATS, parse
from lowbit.kernels.bf16 import Bf16Kernel, cpu_bf16_available, exact_in_bf16
from lowbit.nn import QuantConv2d, QuantLinear
from lowbit.plan import LayerSpec


@pytest.fixture(autouse=True)
def _eager_quant(monkeypatch):
    monkeypatch.setenv("LOWBIT_COMPILE_QUANT", "0")  # eager activation helpers: no compile per format


def _really_exact(fmt) -> bool:
    v = fmt.values()
    return bool(torch.equal(v.to(torch.bfloat16).float(), v))


@pytest.mark.parametrize("name", [*KNOWN_FORMATS, "fp8_e3m4", "fp8_e2m5", "fp8_e1m6", "fp8_e6m1", "fp8_e7m0",
                                  "fp8_e4m3_b3", "fp8_e5m2_b30", "fp6_e3m2_b-20"])
def test_exact_in_bf16_is_the_truth(name):
    fmt = parse(name)
    assert exact_in_bf16(fmt) == _really_exact(fmt)


@pytest.mark.parametrize("name", ["int8", "uint8", "int4", "uint4", "int2", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1",
                                  "fp6_e2m3"])
def test_exact_in_bf16_truth_table(name):
    # every lowbit format has <= 8 bits: integers up to 255 and <= 6 mantissa bits fit bf16's 8
    assert exact_in_bf16(parse(name)) is True


def test_exact_in_bf16_rejects_values_below_bf16_range():
    fmt = parse("fp4_e2m1_b140")
    assert not _really_exact(fmt)  # the ground truth: these values vanish in bf16
    assert exact_in_bf16(fmt) is False


def _calibrated_layer(kind: str, wfmt: str, afmt, seed: int, conv=None):
    """A frozen QuantLinear/QuantConv2d with the given formats and a calibrated input range."""
    torch.manual_seed(seed)
    spec = LayerSpec(wfmt, afmt)
    if kind == "linear":
        layer = QuantLinear.from_float(nn.Linear(48, 20), spec)
        x = torch.randn(3, 7, 48) * 1.5 + 0.3
    else:
        stride, pad, dil, groups = conv
        layer = QuantConv2d.from_float(nn.Conv2d(8, 12, 3, stride, pad, dil, groups), spec)
        x = torch.randn(2, 8, 9, 8) * 1.5 + 0.3
    with torch.no_grad():
        layer.bias.normal_()  # biases as large as the outputs: the bound must not lean on them
        if layer.input_quant.enabled:
            layer.input_quant.set_range(x.min() * 0.8, x.max() * 0.8)  # clip both tails
    layer.freeze()
    return layer, x


def _kernel_from(layer):
    """A Bf16Kernel built from the layer's stored codes, independently of lowbit.kernels.select."""
    wq, aq = layer.weight_quant, layer.input_quant
    vals = wq.fmt.decode(layer.weight_codes).reshape(wq.scale_shape[0], -1) - wq.zero.reshape(-1, 1)
    w_scale = wq.scale.detach().reshape(-1).expand(layer.weight_shape[0])
    act = (aq.fmt, float(aq.scale.detach().reshape(())), float(aq.zero.reshape(()))) if aq.enabled else None
    conv = None
    if isinstance(layer, QuantConv2d):
        conv = (layer.stride, layer.padding, layer.dilation, layer.groups)
    vals = vals.reshape(layer.weight_shape)
    return Bf16Kernel(vals, w_scale, layer.bias, act, conv), vals


@torch.no_grad()
def _ref64(layer, x, w_vals):
    """float64 output from the unscaled operand values, |acc·scale| and the sum of |terms|·scale
    (for error bounds). Activation values use quant_dequant's arithmetic, written out here."""
    wq, aq = layer.weight_quant, layer.input_quant
    if aq.enabled:
        fmt, s, z = aq.fmt, aq.scale.detach().reshape(()), aq.zero.reshape(())
        if fmt.kind == "int":
            v = torch.round(torch.clamp(x * (1.0 / s), fmt.min_value - z, fmt.max_value - z))
        else:
            v = fmt.round(torch.clamp(x / s, fmt.min_value, fmt.max_value))
        assert torch.equal(v * s, aq(x))  # the same values the emulated layer computes with
        s_x = float(s)
    else:
        v, s_x = x, 1.0
    w = w_vals.double()
    if isinstance(layer, QuantConv2d):
        args = (layer.stride, layer.padding, layer.dilation, layer.groups)
        acc = F.conv2d(v.double(), w, None, *args)
        mag = F.conv2d(v.double().abs(), w.abs(), None, *args)
        shape = (1, -1, 1, 1)
    else:
        acc, mag = v.double() @ w.t(), v.double().abs() @ w.abs().t()
        shape = (-1,)
    scale = s_x * wq.scale.detach().reshape(-1).double().reshape(shape)
    return acc * scale + layer.bias.detach().double().reshape(shape), (acc * scale).abs(), mag * scale


FORMATS = [("fp8_e4m3", "fp8_e4m3"), ("fp4_e2m1", "fp8_e4m3"), ("fp8_e5m2", "fp8_e5m2"), ("fp6_e3m2", "fp6_e2m3"),
           ("int8", "uint8"), ("int4", "uint4")]
CONVS = [(1, 1, 1, 1), (2, 1, 1, 1), (1, 0, 1, 4), (1, 2, 2, 2)]


@pytest.mark.parametrize("wfmt,afmt", FORMATS)
@pytest.mark.parametrize("kind,conv", [("linear", None)] + [("conv", c) for c in CONVS])
def test_quantized_activations_match_the_emulated_layer(kind, conv, wfmt, afmt):
    layer, x = _calibrated_layer(kind, wfmt, afmt, seed=len(wfmt) + (conv or (0,))[0], conv=conv)
    kern, w_vals = _kernel_from(layer)
    with torch.no_grad():
        emulated = layer(x)
        y = kern(x)
    ref, _, terms = _ref64(layer, x, w_vals)
    assert y.dtype == torch.float32 and y.shape == emulated.shape == ref.shape
    # the emulated layer is the float64 reference up to float32 accumulation
    assert ((emulated.double() - ref).abs() <= 1e-5 * terms + 1e-6 * ref.abs() + 1e-12).all()
    # bf16 roundings of the scaled weights (<= 2^-8 of each |term|), of the bias and of the output
    # (measured: at most 0.61 of this bound)
    err = (y.double() - ref).abs()
    assert (err <= 2**-8 * (ref.abs() + terms + _bias(layer, ref))).all()
    # whole tensor: within bf16 precision of the largest output (measured 0.0043, i.e. 1.1 * 2^-8)
    assert (y - emulated).abs().max() <= 2**-7 * emulated.abs().max()


def _bias(layer, ref) -> torch.Tensor:
    shape = (1, -1, 1, 1) if ref.dim() == 4 else (-1,)
    return layer.bias.detach().double().abs().reshape(shape)


@pytest.mark.parametrize("kind,conv", [("linear", None), ("conv", (1, 1, 1, 1)), ("conv", (2, 1, 1, 2))])
@pytest.mark.parametrize("wfmt", ["int4", "fp4_e2m1", "int8"])
def test_weight_only_layers_run_on_bf16_inputs(kind, conv, wfmt):
    layer, x = _calibrated_layer(kind, wfmt, None, seed=7, conv=conv)
    kern, w_vals = _kernel_from(layer)
    assert kern.act is None
    with torch.no_grad():
        emulated = layer(x)
        y = kern(x)
    ref, _, terms = _ref64(layer, x, w_vals)
    assert y.dtype == torch.float32 and y.shape == emulated.shape
    # bf16 input and bf16 scaled weights (2^-8 of each |term| each), bias and output (measured:
    # at most 0.49 of 2^-8·(|ref| + terms + |bias|))
    err = (y.double() - ref).abs()
    assert (err <= 2**-8 * (ref.abs() + 2 * terms + _bias(layer, ref))).all()
    assert (y - emulated).abs().max() <= 2**-7 * emulated.abs().max()  # measured 0.0046


def test_output_follows_the_input_dtype():
    layer, x = _calibrated_layer("linear", "fp8_e4m3", "fp8_e4m3", seed=3)
    kern, _ = _kernel_from(layer)
    y = kern(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        assert (y.float() - layer(x.to(torch.bfloat16).float())).abs().max() <= 2**-7 * layer(x).abs().max()


def test_bound_detects_a_wrong_scale():
    """The error bound is tight enough to catch a kernel with a weight scale 2^-5 off."""
    layer, x = _calibrated_layer("linear", "fp8_e4m3", "fp8_e4m3", seed=4)
    wq, aq = layer.weight_quant, layer.input_quant
    vals = wq.fmt.decode(layer.weight_codes)
    wrong = Bf16Kernel(vals, wq.scale.detach().reshape(-1) * (1 + 2**-5), layer.bias,
                       (aq.fmt, float(aq.scale.detach().reshape(())), 0.0))
    ref, _, terms = _ref64(layer, x, vals)
    with torch.no_grad():
        err = (wrong(x).double() - ref).abs()
    assert not (err <= 2**-8 * (ref.abs() + terms + _bias(layer, ref))).all()


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp4_e2m1", "fp4_e3m0"])
@pytest.mark.parametrize("compiled", ["0", "1"])
def test_bf16_activation_values_of_every_bf16_number(name, compiled, monkeypatch):
    """Minifloat activations of bf16 inputs (Veltkamp rounding, compiled helper or eager) give
    what the float32 reference (``QFormat.round``) gives for every one of the 65,536 bf16
    numbers (NaN, ±inf, signed zeros and subnormals included), the channels-last variant the same
    values in NHWC, and so does the arithmetic fused into a compiled graph. (Eager, the values
    are computed chunk by chunk: the same arithmetic, with chunk-sized temporaries.)"""
    from lowbit.kernels.bf16 import _ActValues, _values_eager

    monkeypatch.setenv("LOWBIT_COMPILE_QUANT", compiled)
    fmt = parse(name)
    act = _ActValues(fmt, 0.037, 0.0)
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    # twice over, in two orders: two chunks of lowbit._chunked.map_chunked (eager runs in chunks)
    x = torch.cat([every, every.flip(0)]).reshape(8, 16, 32, 32)
    ref = _values_eager(x.float(), act.params, fmt, None)  # float32 input, fmt.round
    got = act(x)
    assert torch.equal(got.float().nan_to_num(7.0), ref.float().nan_to_num(7.0))
    assert got.is_contiguous() and torch.isnan(got).sum() == torch.isnan(x).sum() > 0
    nhwc = act(x, nhwc=True)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and torch.equal(nhwc.float().nan_to_num(7.0),
                                                                                 got.float().nan_to_num(7.0))
    for layout in (False, True):
        inside = torch.compile(lambda t, layout=layout: act(t * 1.0, nhwc=layout), dynamic=False)(x)
        assert inside.is_contiguous(memory_format=torch.channels_last if layout else torch.contiguous_format)
        assert torch.equal(inside.float().nan_to_num(7.0), got.float().nan_to_num(7.0))


def test_without_cpu_bf16_the_convolution_is_plain_pytorch(monkeypatch):
    """Where oneDNN has no bf16 kernels (AVX2-only CPUs) its weight reorder refuses: a directly
    built conv kernel then runs PyTorch's own bf16 convolution, with the same result."""
    monkeypatch.setattr("lowbit.kernels.bf16.cpu_bf16_available", lambda: False)
    g = torch.Generator().manual_seed(4)
    vals = torch.randint(-8, 8, (8, 4, 3, 3), generator=g).float()
    kern = Bf16Kernel(vals, torch.full((8,), 0.01), None, None, ((1, 1), (1, 1), (1, 1), 1))
    assert kern.kid is None
    x = torch.randn(2, 4, 6, 6, generator=g).bfloat16()
    ref = F.conv2d(x.float(), kern.w.float(), None, 1, 1)
    assert torch.allclose(kern(x).float(), ref, rtol=2 ** -7, atol=float(ref.abs().max()) * 2 ** -8)


def test_activation_parameters_live_on_the_weights_device():
    """The activation scale tensor goes where the layer is (a CPU tensor cannot be combined with
    a CUDA activation); checked with the meta device, which every machine has."""
    w = torch.zeros(8, 16, device="meta")
    k = Bf16Kernel(w, torch.ones(8, device="meta"), None, (parse("fp8_e4m3"), 0.1, 0.0))
    assert k.w.device.type == "meta" and k.act.params.device.type == "meta"
    cpu = Bf16Kernel(torch.zeros(8, 16), torch.ones(8), None, (parse("fp8_e4m3"), 0.1, 0.0))
    assert cpu.act.params.device.type == "cpu"


@pytest.mark.skipif(not cpu_bf16_available(), reason="this CPU's oneDNN has no bf16 kernels (AVX2 only)")
def test_packed_conv_weight_equals_the_plain_bf16_convolution():
    """On CPU the convolution runs oneDNN's bf16 primitive on a weight packed for each new input
    shape; it computes the plain bf16 ``conv2d`` of the same operands (within bf16 output
    rounding), through any number of repacks, and its weight keeps its exact values."""
    g = torch.Generator().manual_seed(3)
    vals = torch.randint(-8, 8, (32, 16, 3, 3), generator=g).float()
    ws = torch.rand(32, generator=g) * 0.01 + 1e-3
    bias = torch.randn(32, generator=g)
    kern = Bf16Kernel(vals, ws, bias, None, ((1, 1), (1, 1), (1, 1), 1))
    assert kern.kid is not None, "the CPU kernel should use the packed oneDNN convolution"
    w_bf16 = kern.w.to_dense().clone()
    for n, h in ((2, 8), (3, 13), (2, 8)):
        x = torch.randn(n, 16, h, h, generator=g).bfloat16()
        y = kern(x)
        assert kern.packed_for == (n, 16, h, h) and y.is_contiguous()
        ref = F.conv2d(x.float(), w_bf16.float(), bias.bfloat16().float(), 1, 1)
        assert torch.allclose(y.float(), ref, rtol=2 ** -7, atol=1e-2 * float(ref.abs().max()) * 2 ** -7)
    assert torch.equal(kern.w.to_dense(), w_bf16)


@pytest.mark.parametrize("shape", [(300, 64, 3, 3), (70, 1000), (5, 1 << 17), (0, 4)])
def test_scales_folded_in_channel_blocks_equal_the_whole_weight_product(shape):
    """The folded bf16 weight is computed a few output channels at a time (bounded float64
    temporaries while loading); it must equal the one-shot float64 product cast to bf16."""
    from lowbit.kernels.bf16 import _fold_scales

    g = torch.Generator().manual_seed(1)
    values = torch.randint(-448, 449, shape, generator=g).float()
    scale = torch.rand(shape[0], generator=g, dtype=torch.float64) * 1e-3 + 1e-5
    ref = (values.double() * scale.reshape((-1,) + (1,) * (len(shape) - 1))).to(torch.bfloat16)
    got = _fold_scales(values, scale)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)

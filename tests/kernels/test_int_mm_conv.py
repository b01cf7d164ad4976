"""lowbit.kernels.int_mm_conv: the im2col ``_int_mm`` convolution (the CUDA path's int8 conv, run
here on the CPU) computes exactly the integer convolution, against an independent float64
``F.conv2d`` of the codes, in the CPU layout and in the padded layout CUDA needs."""

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.errors import FormatError
from lowbit.kernels.int_mm import quantize_activation
from lowbit.kernels.int_mm_conv import IntMMConv2dKernel
from lowbit.nn import sqnr_db

# in, out, kernel, stride, padding, dilation, input H×W
CONVS = [
    (8, 16, (3, 3), (1, 1), (1, 1), (1, 1), (9, 7)),     # 3x3 same
    (16, 8, (1, 1), (1, 1), (0, 0), (1, 1), (6, 5)),     # 1x1: the GEMM directly
    (8, 8, (3, 3), (2, 2), (1, 1), (1, 1), (9, 8)),      # 3x3 stride 2 (downsampler)
    (5, 12, (3, 3), (1, 1), (2, 2), (2, 2), (7, 7)),     # dilated, K = 45 (padded to 48 on CUDA)
    (4, 8, (3, 1), (2, 1), (1, 0), (1, 1), (8, 5)),      # rectangular kernel, anisotropic stride
    (6, 9, (3, 3), (1, 1), (0, 0), (1, 1), (3, 3)),      # M = 2 output pixels × batch: padded rows
]


def _case(cin, cout, kernel, hw, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, *hw, generator=g) * 3.0
    x[0, 0, 0, 0], x[1, -1, -1, -1] = 100.0, -100.0  # both ends saturate at every zero-point
    w = torch.randint(-128, 128, (cout, cin, *kernel), generator=g).to(torch.int8)
    w_scale = torch.rand(cout, generator=g) * 0.01 + 1e-3
    bias = torch.randn(cout, generator=g)
    return x, w, w_scale, bias


@pytest.mark.parametrize("pad_layout", [False, True])
@pytest.mark.parametrize("zero", [0, 128, 37])
@pytest.mark.parametrize("cin,cout,kernel,stride,padding,dilation,hw", CONVS)
def test_accumulator_is_the_exact_integer_convolution(cin, cout, kernel, stride, padding, dilation, hw, zero,
                                                      pad_layout):
    x, w, w_scale, bias = _case(cin, cout, kernel, hw, seed=cin * 31 + cout + zero)
    s_x = 0.03
    k = IntMMConv2dKernel(w, w_scale, bias, s_x, zero, stride, padding, dilation, pad=pad_layout)
    q = quantize_activation(x, s_x, zero)
    assert q.min() == 0 and q.max() == 255  # both ends clamp
    # float64 is exact here: every partial sum is an integer far below 2**53
    ref_acc = F.conv2d(q.double() - zero, w.double(), None, stride, padding, dilation)
    acc = k.acc(x)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.permute(0, 3, 1, 2).double(), ref_acc)
    y = k(x)
    ref = ref_acc * (s_x * w_scale.double()).view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)
    assert y.shape == ref.shape and y.dtype == torch.float32 and y.is_contiguous()
    lsb = (s_x * w_scale.double()).view(1, -1, 1, 1)
    assert ((y.double() - ref).abs() <= lsb).all()  # within 1 LSB of the output scale


def test_bf16_input_gives_bf16_output_from_the_float32_codes():
    x, w, w_scale, bias = _case(8, 16, (3, 3), (6, 6), seed=3)
    k = IntMMConv2dKernel(w, w_scale, None, 0.03, 128, padding=(1, 1))
    xb = x.bfloat16()
    y = k(xb)
    assert y.dtype == torch.bfloat16
    assert torch.equal(k.acc(xb), k.acc(xb.float()))  # codes from the bf16 values, exactly


def test_matches_the_emulated_layer_of_a_quantized_model():
    """The kernel built from a W8A8-quantized conv gives what the emulated layer computes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(16, 8, 3, stride=2, padding=1))
    calib = [torch.randn(2, 8, 10, 10) for _ in range(2)]
    lowbit.quantize(model, lowbit.recipe("w8a8", exclude_defaults=False), calib, progress=False)
    layer = model[2]
    from lowbit.kernels.select import _weight_values

    aq, wq = layer.input_quant, layer.weight_quant
    k = IntMMConv2dKernel(_weight_values(layer).to(torch.int8), wq.scale.detach().reshape(-1), layer.bias,
                          float(aq.scale.detach().reshape(-1)[0]), int(aq.zero.reshape(-1)[0]), layer.stride, layer.padding,
                          layer.dilation, pad=True)
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        emulated = layer(x)
        fast = k(x)
    assert sqnr_db(emulated, fast) > 100  # the same integers; float rounding only


def test_wrong_inputs_are_refused():
    x, w, w_scale, bias = _case(8, 16, (3, 3), (6, 6), seed=1)
    k = IntMMConv2dKernel(w, w_scale, bias, 0.03, 128)
    with pytest.raises(FormatError, match="expects 8"):
        k(torch.randn(1, 4, 6, 6))
    with pytest.raises(FormatError, match="int8"):
        IntMMConv2dKernel(w.to(torch.int16), w_scale, bias, 0.03, 128)
    with pytest.raises(FormatError, match="zero-point"):
        IntMMConv2dKernel(w, w_scale, bias, 0.03, 300)


def test_traces_as_one_graph():
    """The GPU benchmark compiles models that run this kernel: it must trace without breaks."""
    x, w, w_scale, bias = _case(8, 16, (3, 3), (6, 6), seed=2)
    k = IntMMConv2dKernel(w, w_scale, bias, 0.03, 37, padding=(1, 1), pad=True)
    traced = torch.compile(lambda t: k(t), backend="eager", fullgraph=True)
    assert torch.equal(traced(x), k(x))

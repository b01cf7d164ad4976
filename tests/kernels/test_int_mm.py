"""lowbit.kernels.int_mm: the int8 fast path equals the exact reference, and the reference
equals lowbit's emulated (fake-quant + float linear) math."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import FormatError
from lowbit.formats import parse
from lowbit.kernels import (
    linear_w8a8,
    linear_w8a8_acc,
    linear_w8a8_reference,
    linear_w8a8_reference_acc,
    prepare_linear_weight,
    quantize_activation,
)
from lowbit.quantizer import Quantizer


def _case(lead, k, n, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g) * spread
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int32).to(torch.int8)
    w_scale = torch.rand(n, generator=g) * 0.05 + 1e-3
    bias = torch.randn(n, generator=g)
    return x, w, w_scale, bias


SHAPES = [((1,), 8, 8), ((5,), 13, 7), ((16,), 64, 24), ((17,), 33, 9), ((2, 3, 7), 40, 16), ((70,), 256, 96)]


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("zero", [0, 128, 200])
@pytest.mark.parametrize("lead,k,n", SHAPES)
def test_fast_path_matches_reference(lead, k, n, zero, pad):
    x, w, w_scale, bias = _case(lead, k, n, seed=k * 31 + n + zero)
    x_scale = 0.02  # saturates the tails of randn at every zero-point
    prep = prepare_linear_weight(w, pad=pad)
    acc = linear_w8a8_acc(x, x_scale, zero, prep)
    ref_acc = linear_w8a8_reference_acc(x, x_scale, zero, w)
    assert acc.dtype == torch.int32 and acc.shape == (*lead, n)
    assert torch.equal(acc.long(), ref_acc)
    out = linear_w8a8(x, x_scale, zero, prep, w_scale, bias)
    ref = linear_w8a8_reference(x, x_scale, zero, w, w_scale, bias)
    assert out.shape == ref.shape == (*lead, n) and out.dtype == torch.float32
    # same integers; only the float32 epilogue (three roundings) differs from float64
    lsb = x_scale * w_scale
    err = (out.double() - ref.double()).abs()
    assert (err <= 1e-6 * ((ref_acc * lsb.double()).abs() + bias.double().abs())).all()
    assert (err <= lsb).all()  # the brief's bound: within 1 LSB of the output scale
    # the raw int8 weight (prepared on the fly) gives the same result
    assert torch.equal(linear_w8a8(x, x_scale, zero, w, w_scale, bias), out)


def test_saturating_inputs():
    """Every activation clamps to 0 or 255 and weights sit at ±127/−128: the worst accumulator."""
    k, n = 96, 16
    x = torch.where(torch.arange(k) % 2 == 0, 1e6, -1e6).expand(20, k).clone()
    x[::3] = 1e6
    w = torch.full((n, k), -128, dtype=torch.int8)
    w[::2] = 127
    for zero in (0, 128, 200, 255):
        q = quantize_activation(x, 0.01, zero)
        assert set(q.unique().tolist()) <= {0, 255}
        acc = linear_w8a8_acc(x, 0.01, zero, w)
        assert torch.equal(acc.long(), linear_w8a8_reference_acc(x, 0.01, zero, w))
        expected = (q.long() - zero) @ w.long().t()
        assert torch.equal(acc.long(), expected)


def test_round_half_to_even_before_zero_point():
    # x/s lands exactly on .5: round(x/s) is half-to-even, then z is added (not round(x/s + z))
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 300.0, -300.0]])
    q = quantize_activation(x, 1.0, 3)
    assert q.tolist() == [[3, 5, 5, 3, 1, 1, 255, 0]]
    w = torch.eye(8, dtype=torch.int8)
    assert linear_w8a8_acc(x, 1.0, 3, w).tolist() == [[0, 2, 2, 0, -2, -2, 252, -3]]


def test_empty_batch_and_no_bias():
    x, w, w_scale, _ = _case((0,), 16, 8, seed=1)
    for pad in (False, True):
        out = linear_w8a8(x, 0.05, 128, prepare_linear_weight(w, pad=pad), w_scale)
        assert out.shape == (0, 8)


def test_tensor_scale_and_zero_arguments():
    x, w, w_scale, bias = _case((20,), 24, 8, seed=2)
    a = linear_w8a8(x, torch.tensor([0.03]), torch.tensor(100.0), w, w_scale, bias)
    b = linear_w8a8(x, 0.03, 100, w, w_scale, bias)
    assert torch.equal(a, b)


def test_bad_arguments():
    x, w, w_scale, _ = _case((4,), 16, 8, seed=3)
    with pytest.raises(FormatError, match="view"):
        linear_w8a8(x, 0.1, 0, w.view(torch.uint8), w_scale)
    with pytest.raises(FormatError, match="zero-point"):
        linear_w8a8(x, 0.1, 256, w, w_scale)
    with pytest.raises(FormatError, match="features"):
        linear_w8a8(x[:, :8], 0.1, 0, w, w_scale)
    with pytest.raises(FormatError, match="features"):
        linear_w8a8_reference(x[:, :8], 0.1, 0, w, w_scale)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_matches_lowbit_emulation(seed):
    """F.linear(fakequant(x), dequant(w), b) with lowbit's Quantizer == the integer reference."""
    g = torch.Generator().manual_seed(seed)
    n, k = 24, 40
    x = torch.randn(3, 11, k, generator=g) * 2 + 0.7  # asymmetric range: non-trivial zero-point
    weight = torch.randn(n, k, generator=g) * 0.1
    bias = torch.randn(n, generator=g)

    qx = Quantizer(parse("uint8"), "tensor")
    qx.set_range(x.min(), x.max() * 0.8)  # clip the top: saturation included
    qw = Quantizer(parse("int8"), "channel", shape=tuple(weight.shape))
    amax = weight.abs().amax(dim=1, keepdim=True)
    qw.set_range(-amax, amax)
    with torch.no_grad():
        emulated = F.linear(qx(x), qw(weight), bias)
        codes = qw.encode(weight).view(torch.int8)
        s_x, z_x = qx.scale.detach().reshape(()), qx.zero.reshape(())
        assert 0 < float(z_x) < 255
        # the kernels' activation codes are the Quantizer's, bit for bit
        assert torch.equal(quantize_activation(x, s_x, z_x), qx.encode(x))
        w_scale = qw.scale.detach().reshape(-1)
        ref = linear_w8a8_reference(x, s_x, z_x, codes, w_scale, bias)
        fast = linear_w8a8(x, s_x, z_x, prepare_linear_weight(codes), w_scale, bias)
    tol = 1e-5 * emulated.abs().max()
    assert (ref - emulated).abs().max() <= tol
    assert (fast - emulated).abs().max() <= tol

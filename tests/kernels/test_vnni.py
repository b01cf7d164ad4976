"""lowbit.kernels.vnni: the probe of oneDNN's int8 exactness, and the split weights that keep
8-bit-weight kernels exact on CPUs without VNNI. The split is forced here (``pair_limit``
patched to int16's bound) so that it is tested on every CPU, against a float64 reference from
the integer codes; on a VNNI CPU it must compute what the unsplit kernel does."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.formats import parse
from lowbit.kernels import onednn, vnni

if not onednn.available():
    pytest.skip("this PyTorch build/CPU has no oneDNN int8 conv/linear operators", allow_module_level=True)

from lowbit.kernels.onednn import Int8Conv2dKernel, Int8LinearKernel

UINT8 = parse("uint8")


@pytest.fixture
def forced_split(monkeypatch):
    monkeypatch.setattr(vnni, "pair_limit", lambda: 32767)


def _worst(shape, g) -> torch.Tensor:
    # weights at the ends of int8, where a pair of 255-code products overflows int16
    return (torch.randint(0, 2, shape, generator=g) * 255 - 128).clamp(-128, 127).to(torch.int8)


def test_pair_limit_is_one_of_the_documented_cases():
    assert vnni.pair_limit() in (None, 32767)  # (0 would have made onednn.available() False)


def test_split_halves_add_up_and_fit_the_bound():
    w = torch.arange(-128, 128, dtype=torch.int8).reshape(16, 16)
    s = vnni.split_weight(w)
    assert s.shape == (16, 32) and s.dtype == torch.int8
    assert int(s.abs().max()) <= 64 and 2 * 255 * 64 <= 32767
    assert torch.equal(vnni.unsplit_weight(s), w)


def test_needs_split_rule(forced_split):
    assert vnni.needs_split(torch.tensor([127, -3], dtype=torch.int8), 255)
    assert not vnni.needs_split(torch.tensor([7, -8], dtype=torch.int8), 255)  # 4-bit weights never overflow
    assert not vnni.needs_split(torch.tensor([127, -128], dtype=torch.int8), 15)  # nor do 4-bit codes
    assert not vnni.needs_split(torch.tensor([64, -64], dtype=torch.int8), 255)  # 2·255·64 = 32640


def test_no_split_where_the_cpu_is_exact(monkeypatch):
    monkeypatch.setattr(vnni, "pair_limit", lambda: None)
    assert not vnni.needs_split(torch.tensor([127, -128], dtype=torch.int8), 255)


@pytest.mark.parametrize("groups", [1, 2])
def test_split_convolution_is_exact(forced_split, groups):
    g = torch.Generator().manual_seed(0)
    w = _worst((16, 16 // groups, 3, 3), g)
    ws = torch.rand(16, generator=g) * 0.01 + 1e-3
    s_x = 0.02
    k = Int8Conv2dKernel(w, ws, None, UINT8, s_x, 0.0, (1, 1), (1, 1), (1, 1), groups)
    assert k.split
    for n, h in ((2, 8), (1, 5)):  # a new shape repacks the split weight
        x = torch.full((n, 16, h, h), 255 * s_x)  # every code 255
        acc = F.conv2d(torch.full((n, 16, h, h), 255.0, dtype=torch.float64), w.double(), None, 1, 1, 1, groups)
        ref = acc * s_x * ws.double().reshape(1, -1, 1, 1)
        lsb = (s_x * ws.double()).reshape(1, -1, 1, 1)
        assert ((k(x).double() - ref).abs() <= lsb).all()
    assert torch.equal(k.weight_int8(), w)


def test_split_linear_and_its_fusion_are_exact(forced_split):
    g = torch.Generator().manual_seed(1)
    ws = [torch.rand(8, generator=g) * 0.01 + 1e-3 for _ in range(2)]
    w = [_worst((8, 32), g) for _ in range(2)]
    s_x = 0.02
    kernels = [Int8LinearKernel(wi, si, None, UINT8, s_x, 0.0) for wi, si in zip(w, ws)]
    assert all(k.split for k in kernels)
    x = torch.full((5, 32), 255 * s_x)
    for k, wi, si in zip(kernels, w, ws):
        ref = torch.full((5, 32), 255.0, dtype=torch.float64) @ wi.double().t() * s_x * si.double()
        assert ((k(x).double() - ref).abs() <= s_x * si.double()).all()
        assert torch.equal(k.weight_int8(), wi)  # read back out of the packed split weight
    fused = Int8LinearKernel.concat(kernels)
    assert fused.split and torch.equal(fused(x), torch.cat([k(x) for k in kernels], 1))


def test_split_equals_unsplit_on_a_cpu_that_needs_neither(monkeypatch):
    if vnni.pair_limit() is not None:
        pytest.skip("this CPU has no VNNI: its unsplit kernel is the inexact one")
    g = torch.Generator().manual_seed(2)
    w = _worst((8, 8, 3, 3), g)
    ws = torch.rand(8, generator=g) * 0.01 + 1e-3
    x = torch.rand(2, 8, 6, 6, generator=g)
    plain = Int8Conv2dKernel(w, ws, None, UINT8, 0.01, 0.0, (1, 1), (1, 1), (1, 1), 1)
    monkeypatch.setattr(vnni, "pair_limit", lambda: 32767)
    split = Int8Conv2dKernel(w, ws, None, UINT8, 0.01, 0.0, (1, 1), (1, 1), (1, 1), 1)
    assert split.split and not plain.split
    assert torch.equal(plain(x), split(x))

"""kernels.groupnorm: the NHWC-friendly GroupNorm equals F.group_norm (float64 reference) in
every layout and dtype, stays exact where E[x²]−E[x]² would cancel, is used only when compiled,
and set_compute installs it exactly on models with CPU kernels."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels.groupnorm import NHWCGroupNorm, group_norm_nhwc, use_nhwc_group_norm


def _ref(x, g, w, b, eps):
    return F.group_norm(x.double(), g, None if w is None else w.double(), None if b is None else b.double(), eps)


@pytest.mark.parametrize("shape,groups", [((2, 24, 7, 9), 8), ((3, 32, 4, 4), 32), ((1, 12, 5, 5), 1),
                                          ((2, 64, 6, 3), 16)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_group_norm_in_float64(shape, groups, layout, affine):
    g = torch.Generator().manual_seed(shape[1] + groups)
    x = (torch.randn(shape, generator=g) * 3 + torch.randn(shape[1], generator=g).view(1, -1, 1, 1))
    x = x.contiguous(memory_format=layout)
    w = torch.randn(shape[1], generator=g) if affine else None
    b = torch.randn(shape[1], generator=g) if affine else None
    y = group_norm_nhwc(x, groups, w, b, 1e-5)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert (y.double() - _ref(x, groups, w, b, 1e-5)).abs().max() < 1e-5


def test_large_offsets_do_not_cancel():
    """Channels with mean 10⁴ × their spread: a sum-of-squares formula would lose the variance
    in float32; the per-channel Welford + parallel combination keeps it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 16, 16, generator=g) * 0.1 + 1000.0
    y = group_norm_nhwc(x, 4, None, None, 1e-5)
    ref = _ref(x, 4, None, None, 1e-5)
    assert (y.double() - ref).abs().max() < 2e-3  # float32 has 2⁻²⁴·1000 ≈ 6e-5 of absolute resolution here


def test_bf16_input_gives_bf16_output_within_bf16_rounding():
    x = torch.randn(2, 16, 8, 8).bfloat16().contiguous(memory_format=torch.channels_last)
    y = group_norm_nhwc(x, 4, torch.ones(16, dtype=torch.bfloat16), torch.zeros(16, dtype=torch.bfloat16), 1e-5)
    assert y.dtype == torch.bfloat16
    ref = _ref(x.float(), 4, None, None, 1e-5)
    assert (y.double() - ref).abs().max() < 2 ** -7 * ref.abs().max()


def test_module_is_plain_group_norm_in_eager_and_the_nhwc_form_compiled():
    torch.manual_seed(0)
    m = nn.GroupNorm(4, 16)
    nn.init.normal_(m.weight)
    nn.init.normal_(m.bias)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    ref = m(x)
    assert use_nhwc_group_norm(m) == 1 and type(m) is NHWCGroupNorm
    assert torch.equal(m(x), ref)  # eager: exactly F.group_norm
    compiled = torch.compile(m, dynamic=False)(x)
    assert (compiled - ref).abs().max() < 1e-5
    assert use_nhwc_group_norm(m, enable=False) == 1 and type(m) is nn.GroupNorm


def test_set_compute_installs_it_only_with_cpu_kernels():
    import lowbit
    from lowbit.kernels import onednn, set_compute
    from conftest import make_unet, unet_inputs

    if not onednn.available():
        pytest.skip("no oneDNN int8 on this CPU")
    model = lowbit.quantize(make_unet(), "w8a8", unet_inputs(2, seed=1), progress=False)
    n_gn = sum(type(m) is nn.GroupNorm for m in model.modules())
    assert n_gn > 0
    set_compute(model, "auto")
    assert sum(type(m) is NHWCGroupNorm for m in model.modules()) == n_gn
    set_compute(model, "emulated")
    assert sum(type(m) is nn.GroupNorm for m in model.modules()) == n_gn

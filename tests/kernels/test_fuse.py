"""lowbit.kernels.fuse: one Q/K/V int8 GEMM per self-attention block computes exactly what the
three projections compute on their own, and is installed only where that holds."""

import pytest
import torch
from conftest import make_unet, unet_inputs

import lowbit
from lowbit import load, save
from lowbit.formats import parse
from lowbit.kernels import onednn, set_compute
from lowbit.kernels import select as select_mod
from lowbit.kernels.fuse import SliceKernel, fuse_attention_projections
from lowbit.nn import QuantAttnProcessor

if not onednn.available():
    pytest.skip("this PyTorch build/CPU has no oneDNN int8 conv/linear operators", allow_module_level=True)

from lowbit.kernels.onednn import Int8LinearKernel


@pytest.fixture(autouse=True)
def _eager_quant(monkeypatch):
    monkeypatch.setenv("LOWBIT_COMPILE_QUANT", "0")


def _linear(n: int, k: int, g: torch.Generator, bias: bool, zero: float = 3.0) -> Int8LinearKernel:
    w = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
    b = torch.randn(n, generator=g) if bias else None
    return Int8LinearKernel(w, torch.rand(n, generator=g) * 0.01 + 1e-3, b, parse("uint8"), 0.05, zero)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_concat_computes_what_the_separate_kernels_compute(out_dtype):
    g = torch.Generator().manual_seed(0)
    ks = [_linear(24, 32, g, bias=True), _linear(16, 32, g, bias=False), _linear(8, 32, g, bias=True)]
    for k in ks:
        k.out_dtype = out_dtype
    x = torch.randn(2, 5, 32, generator=g) * 3
    want = torch.cat([k(x) for k in ks], dim=-1)
    fused = Int8LinearKernel.concat(ks)
    assert fused.out_features == 48
    _assert_same_integers(fused(x), want)
    _assert_same_integers(fused(x[0]), want[0])  # a second shape: repacked, still exact


def _assert_same_integers(y: torch.Tensor, want: torch.Tensor) -> None:
    # the same int32 accumulators and per-column scales; only oneDNN's float epilogue
    # (acc·s_x·s_w + bias) may round differently: bit-identical on the Zen 4 CPU, within one
    # float32 ulp on an AMX Xeon, where oneDNN picks another kernel for the wider matrix. A
    # wrong column, scale or bias would be off by whole output steps.
    assert y.dtype == want.dtype and y.shape == want.shape
    eps = torch.finfo(y.dtype).eps
    torch.testing.assert_close(y, want, rtol=2 * eps, atol=2 * eps * float(want.abs().max()))


def test_concat_refuses_different_quantizers():
    g = torch.Generator().manual_seed(1)
    a, b = _linear(8, 16, g, True), _linear(8, 16, g, True, zero=4.0)
    assert not Int8LinearKernel.can_concat([a, b])
    with pytest.raises(lowbit.errors.FormatError, match="same input quantizer"):
        Int8LinearKernel.concat([a, b])


@torch.no_grad()
def test_loaded_model_fuses_qkv_and_gives_the_same_output(tmp_path, monkeypatch):
    model = lowbit.quantize(make_unet(), "w8a8", unet_inputs(2, seed=1), progress=False)
    path = save(model, tmp_path / "w8a8.safetensors")
    x, t = unet_inputs(1, seed=2)[0]
    fused = load(path, make_unet(device="meta"))
    procs = [m for m in fused.modules() if isinstance(m, QuantAttnProcessor)]
    assert procs and all(p.fused_qkv is not None for p in procs)
    monkeypatch.setattr(select_mod, "fuse_attention_projections", lambda model: 0)
    plain = load(path, make_unet(device="meta"))
    assert all(p.fused_qkv is None for p in plain.modules() if isinstance(p, QuantAttnProcessor))
    assert torch.equal(fused(x, t).sample, plain(x, t).sample)
    # a projection called on its own still computes its own output, from the fused weights
    attn_f = next(m for m in fused.modules() if isinstance(getattr(m, "processor", None), QuantAttnProcessor))
    attn_p = next(m for m in plain.modules() if isinstance(getattr(m, "processor", None), QuantAttnProcessor))
    h = torch.randn(4, 16, attn_f.to_q.in_features)
    for name in ("to_q", "to_k", "to_v"):
        assert isinstance(getattr(attn_f, name).kernel, SliceKernel)
        assert torch.equal(getattr(attn_f, name)(h), getattr(attn_p, name)(h))


@torch.no_grad()
def test_emulated_compute_drops_the_fused_kernel():
    model = lowbit.quantize(make_unet(), "w8a8", unet_inputs(2, seed=1), progress=False)
    set_compute(model, "auto")
    assert any(m.fused_qkv is not None for m in model.modules() if isinstance(m, QuantAttnProcessor))
    set_compute(model, "emulated")
    assert all(m.fused_qkv is None for m in model.modules() if isinstance(m, QuantAttnProcessor))
    assert fuse_attention_projections(model) == 0  # nothing native to fuse

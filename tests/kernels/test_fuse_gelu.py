"""lowbit.kernels.fuse_gelu: a GELU feed-forward block as two oneDNN int8 GEMMs, GELU and the
second layer's input quantization in the first's epilogue. Its codes are the layer-by-layer codes
to within one code; it is installed only where that holds, keeps parameter names, and comes off
again when the compute path changes."""

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.formats import parse
from lowbit.kernels import onednn, set_compute

diffusers = pytest.importorskip("diffusers")
if not onednn.available():
    pytest.skip("this PyTorch build/CPU has no oneDNN int8 conv/linear operators", allow_module_level=True)

from lowbit.kernels.fuse_gelu import (GegluFeedForward, GeluCodesKernel, GeluFeedForward, GeluOutKernel,  # noqa: E402
                                      HalvesKernel, fuse_gelu_feed_forwards, unfuse_gelu_feed_forwards)
from lowbit.kernels.onednn import Int8LinearKernel  # noqa: E402


@pytest.fixture(autouse=True)
def _eager_quant(monkeypatch):
    monkeypatch.setenv("LOWBIT_COMPILE_QUANT", "0")


def _linear(n: int, k: int, g: torch.Generator, act: str, scale: float, zero: float) -> Int8LinearKernel:
    w = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
    return Int8LinearKernel(w, torch.rand(n, generator=g) * 0.01 + 1e-3, torch.randn(n, generator=g), parse(act),
                            scale, zero)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("next_act", [("uint8", 12.0), ("int8", -3.0)])
def test_gelu_codes_are_the_layer_by_layer_codes_within_one(approximate, next_act):
    g = torch.Generator().manual_seed(0)
    fc1 = _linear(96, 64, g, "uint8", 0.05, 128.0)
    fc2 = _linear(32, 96, g, next_act[0], 0.01, next_act[1])
    x = torch.randn(300, 64, generator=g) * 3
    codes = fc1.act(x)
    fused = GeluCodesKernel(fc1, fc2.act, approximate).run(codes)
    # the independent reference: the exact integer GEMM, float epilogue, GELU, then the quantizer
    acc = (codes.double() - fc1.act.zero) @ fc1.weight_int8().double().t()
    y = (acc * fc1.act.scale * fc1.w_scale.double() + fc1.bias.double()).float()
    want = fc2.act(F.gelu(y, approximate=approximate))
    assert fused.dtype == torch.uint8 and fused.shape == want.shape
    diff = (fused.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99
    assert want.unique().numel() > 50  # the codes really span the range


def _dit() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                                           sample_size=8, patch_size=2, norm_num_groups=4).eval()


def _inputs(seed: int, batch: int = 2) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randint(0, 1000, (batch,), generator=g))


def _sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (x - ref).pow(2).mean()))


def test_dit_feed_forwards_fuse_keep_their_names_and_unfuse():
    q = lowbit.quantize(_dit(), "w8a8", [_inputs(s) for s in range(3)], progress=False)
    names = [n for n, _ in q.named_parameters()] + [n for n, _ in q.named_buffers()]
    x = _inputs(99)
    with torch.no_grad():
        emulated = q(*x).sample
        set_compute(q, "int8")
        ffs = [m for m in q.modules() if isinstance(m, GeluFeedForward)]
        assert len(ffs) == 2  # one per block
        assert [n for n, _ in q.named_parameters()] + [n for n, _ in q.named_buffers()] == names
        assert {r.path for r in lowbit.report(q) if ".ff." in r.name} == {"native int8 (oneDNN)"}
        fused = q(*x).sample
        unfuse_gelu_feed_forwards(q)  # the layers one by one, each on its own kernel
        layer_by_layer = q(*x).sample
        assert fuse_gelu_feed_forwards(q) == 2
        for b in q.transformer_blocks:  # dropout mode runs the layers one by one too
            b.ff.train()
        assert torch.equal(q(*x).sample, layer_by_layer)
        for b in q.transformer_blocks:
            b.ff.eval()
        assert _sqnr(layer_by_layer, fused) > 40  # at most one code apart, at rounding boundaries
        assert _sqnr(emulated, fused) > 30
        set_compute(q, "emulated")
        assert not any(isinstance(m, GeluFeedForward) for m in q.modules())
        assert type(q.transformer_blocks[0].ff).__name__ == "FeedForward"
        assert torch.equal(q(*x).sample, emulated)


def test_not_fused_where_the_epilogue_cannot_quantize_like_the_next_layer():
    """A second layer whose input codes do not span 0..255 (4-bit activations) would be clamped
    differently by oneDNN's uint8 saturation: that block stays layer by layer."""
    plan = lowbit.recipe("w8a8")
    plan.rules.insert(0, lowbit.Rule(r".*\.ff\.net\.2", lowbit.LayerSpec(weight="int8", act="uint4")))
    q = lowbit.quantize(_dit(), plan, [_inputs(s) for s in range(3)], progress=False)
    set_compute(q, "int8")
    assert fuse_gelu_feed_forwards(q) == 0
    assert not any(isinstance(m, GeluFeedForward) for m in q.modules())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_geglu_halves_compute_the_whole_layer_and_the_gate_gets_gelu(out_dtype):
    g = torch.Generator().manual_seed(1)
    proj = _linear(2 * 48, 64, g, "uint8", 0.05, 128.0)
    proj.out_dtype = out_dtype
    halves = HalvesKernel(proj.rows(0, 48), proj.rows(48, 96))
    x = (torch.randn(300, 64, generator=g) * 3).to(out_dtype)
    whole = proj(x)
    got = halves(x)
    assert got.dtype == out_dtype and got.shape == whole.shape
    # the same integers, scales and bias per column: equal up to the epilogue's rounding
    assert (got.float() - whole.float()).abs().max() <= 1e-6 * whole.float().abs().max()
    # the independent reference: exact integer GEMM, float epilogue, erf-GELU
    codes = proj.act(x)
    acc = (codes.double() - proj.act.zero) @ proj.weight_int8().double().t()
    y = (acc * proj.act.scale * proj.w_scale.double() + proj.bias.double()).float()
    gated = GeluOutKernel(halves.gate).run(codes)
    want = F.gelu(y[:, 48:])
    assert gated.dtype == out_dtype
    assert (gated.float() - want).abs().max() <= 1e-5 + (8e-3 if out_dtype == torch.bfloat16 else 1e-5) * want.abs().max()


def test_text_unet_geglu_feed_forwards_fuse_keep_their_names_and_unfuse():
    from conftest import make_text_unet, text_unet_inputs

    q = lowbit.quantize(make_text_unet(), "w8a8", text_unet_inputs(2, 1), progress=False)
    names = [n for n, _ in q.named_parameters()] + [n for n, _ in q.named_buffers()]
    x = text_unet_inputs(1, 2)[0]
    with torch.no_grad():
        emulated = q(*x).sample
        set_compute(q, "int8")
        ffs = [m for m in q.modules() if isinstance(m, GegluFeedForward)]
        assert len(ffs) == 4  # one per transformer block: down, mid, two up
        assert [n for n, _ in q.named_parameters()] + [n for n, _ in q.named_buffers()] == names
        assert {r.path for r in lowbit.report(q) if ".ff." in r.name} == {"native int8 (oneDNN)"}
        fused = q(*x).sample
        unfuse_gelu_feed_forwards(q)  # layer by layer; GEGLU's first Linear on its two halves
        assert isinstance(ffs[0].net[0].proj.kernel, HalvesKernel)
        layer_by_layer = q(*x).sample
        assert fuse_gelu_feed_forwards(q) == 4  # the halves are reused, not split again
        assert _sqnr(layer_by_layer, fused) > 30  # GELU of the float32 epilogue vs of the layer's output
        assert _sqnr(emulated, fused) > 25
        set_compute(q, "emulated")
        assert not any(isinstance(m, GegluFeedForward) for m in q.modules())
        assert torch.equal(q(*x).sample, emulated)

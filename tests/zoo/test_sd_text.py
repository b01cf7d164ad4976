"""lowbit.zoo.sd_text: the text-conditioned benchmark UNet builds on the meta device with SD 1.x's
structure, feeds its fixed prompt table to every sample, and a tiny model of the same kind goes
through quantize → save → load onto native kernels with the emulated model's outputs."""

import pytest
import torch
from conftest import make_text_unet as tiny_model
from conftest import text_unet_inputs as inputs
from diffusers import UNet2DConditionModel
from diffusers.models.activations import GEGLU

import lowbit
from lowbit.bench.run import MODELS
from lowbit.kernels import onednn
from lowbit.kernels.fuse_gelu import GegluFeedForward
from lowbit.nn import sqnr_db
from lowbit.zoo.sd_text import SD_TEXT_CONFIG, TEXT_TOKENS, TEXT_WIDTH, TextConditioned, build_sd_text

def test_text_conditioned_gives_every_sample_the_fixed_context():
    model = tiny_model()
    x, t = inputs(1, 0)[0]
    with torch.no_grad():
        got = model(x, t).sample
        want = model.unet(x, t, encoder_hidden_states=model.context.expand(3, 5, 24)).sample
        other = model.unet(x, t, encoder_hidden_states=torch.zeros(3, 5, 24)).sample
    assert torch.equal(got, want) and not torch.allclose(got, other)
    assert "context" in model.state_dict()  # saved with the model: a checkpoint carries its prompt


def test_sd_text_builds_on_meta_with_sd1_structure_and_is_a_benchmark_model():
    with torch.device("meta"):
        m = build_sd_text()
    unet = m.unet
    assert unet.config.block_out_channels == SD_TEXT_CONFIG["block_out_channels"]
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - 142.2) < 0.1  # what the bench title says
    assert m.context.shape == (TEXT_TOKENS, TEXT_WIDTH) == (77, 768)
    # 16 transformer blocks (6 down, 1 mid, 9 up), each with self- and cross-attention and GEGLU
    cross = [a for n, a in m.named_modules() if n.endswith("attn2")]
    assert len(cross) == 16 and all(a.is_cross_attention for a in cross)
    assert sum(isinstance(mod, GEGLU) for mod in m.modules()) == 16
    assert {a.heads * 64 for a in cross} == {128, 256, 512}  # 64-wide heads at every level
    spec = MODELS["sdtext"]
    assert spec.shape == (4, 32, 32) and spec.batch == 4


def test_random_prompt_table_is_seeded():
    a, b = build_sd_text(0).context, build_sd_text(0).context
    assert torch.equal(a, b) and abs(a.std().item() - 1) < 0.05


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8"])
def test_tiny_text_unet_loads_onto_native_kernels(tmp_path, recipe):
    """Cross-attention K/V projections (which read the prompt table, not the image tokens) and the
    GEGLU Linears run native, and every native layer and fused GEGLU block computes what its
    emulated twin computes from the same input. (End to end the two models drift apart: one activation code in 1,536
    flipped by a float32 ulp at a rounding boundary moves this 16-channel model's output to
    ~38 dB, so the end-to-end check is only that the output is finite and close.)"""
    q = lowbit.quantize(tiny_model(), recipe, inputs(2, 1), progress=False)
    path = lowbit.save(q, tmp_path / f"{recipe}.safetensors")
    emulated = lowbit.load(path, tiny_model(device="meta"), compute="emulated")
    native = lowbit.load(path, tiny_model(device="meta"))
    assert torch.equal(native.context, tiny_model().context)
    layers = {n: m for n, m in lowbit.nn.quant_layers(native)  # the weight layers (not attention cores)
              if getattr(m, "kernel", None) is not None and hasattr(m, "weight_shape")}
    geglu = {n: m for n, m in native.named_modules() if isinstance(m, GegluFeedForward)}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, (a[0], o)))
             for n, m in {**layers, **geglu}.items()]
    x, t = inputs(1, 2)[0]
    with torch.no_grad():
        ref, out = emulated(x, t).sample, native(x, t).sample
        for h in hooks:
            h.remove()
        assert torch.isfinite(out).all() and sqnr_db(ref, out) > 25
        if not onednn.available():
            return
        for name in ("attn2.to_k", "attn2.to_v", "ff.net.0.proj", "ff.net.2"):
            hits = [m.compute_path for n, m in layers.items() if n.endswith(name)]
            assert hits and set(hits) == {"native int8 (oneDNN)"}, (name, hits)
        # GEGLU feed-forwards run fused (kernels/fuse_gelu), self-attention's Q/K/V as one GEMM
        # (kernels/fuse): those modules are not called; their blocks are compared whole
        assert len(geglu) == 4
        assert {n for n in layers if n.endswith(("attn2.to_k", "attn2.to_v"))} | geglu.keys() <= seen.keys()
        for name, (inp, got) in seen.items():
            want = emulated.get_submodule(name)(inp)
            floor = 40 if name in geglu else 100  # GEGLU: a code at a rounding boundary may move by one
            assert sqnr_db(want, got) > floor, name  # the same integers: float epilogue rounding only


def test_a_bare_text_unet_calibrates_from_three_part_inputs(tmp_path):
    """Without the wrapper: calibration tuples (x_t, t, encoder_hidden_states) are the UNet's own
    positional inputs; the checkpoint reloads onto a meta-built model with the prompt's
    cross-attention K/V projections calibrated (and native where oneDNN is)."""
    unet = tiny_model().unet
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 300]), torch.randn(2, 5, 24, generator=g))
             for _ in range(2)]
    q = lowbit.quantize(unet, "w8a8", calib, progress=False)
    k_quant = q.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k").input_quant
    assert k_quant.calibrated
    path = lowbit.save(q, tmp_path / "bare.safetensors")
    with torch.device("meta"):
        fresh = UNet2DConditionModel.from_config(unet.config)
    native = lowbit.load(path, fresh)
    x, t, c = calib[0]
    with torch.no_grad():
        out = native(x, t, c).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert sqnr_db(q(x, t, c).sample, out) > 25

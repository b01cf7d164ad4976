"""Quantized layers against independent references: the float layer run on the dequantized
weight and the fake-quantized input (isolates kernel error from quantization error)."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor
from torch import nn

from lowbit import LayerSpec, QuantConv2d, QuantLinear, calibrate
from lowbit.nn import QuantAttnProcessor, apply_specs, sqnr_db
from lowbit.quantizer import Quantizer


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _calibrated(layer, x):
    calibrate(nn.Sequential(layer), [x], progress=False)
    return layer


@pytest.mark.parametrize("spec", [LayerSpec("int8", "uint8"), LayerSpec("int4", "uint8", weight_observer="mse"),
                                  LayerSpec("fp4_e2m1", "fp8_e4m3", weight_granularity="group16"),
                                  LayerSpec("int4", None, weight_granularity="tensor")])
def test_linear_equals_float_on_dequantized(spec):
    torch.manual_seed(0)
    fl = nn.Linear(64, 32)
    x = torch.randn(5, 7, 64)
    q = QuantLinear.from_float(fl, spec)
    _calibrated(q, x)
    w = q.weight_quant.decode(q.weight_quant.encode(q.weight))  # stored-form weight
    xq = q.input_quant(x)
    ref = F.linear(xq, w, fl.bias)
    assert _rel(q(x), ref) <= 1e-6
    if spec.act is not None:
        assert not torch.equal(xq, x)  # the input really is quantized
    assert sqnr_db(F.linear(x, fl.weight, fl.bias), q(x)) > 10


@pytest.mark.parametrize("kw", [dict(stride=1, padding=1), dict(stride=2, padding=0), dict(stride=1, padding=2, dilation=2),
                                dict(stride=1, padding=1, groups=4), dict(stride=1, padding=1, padding_mode="reflect"),
                                dict(stride=(2, 1), padding="valid")])
def test_conv2d_equals_float_on_dequantized(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, **kw)
    x = torch.randn(2, 8, 12, 12)
    fp = conv(x)
    q = _calibrated(QuantConv2d.from_float(conv, LayerSpec("int4", "uint8")), x)
    w = q.weight_quant.decode(q.weight_quant.encode(q.weight))
    ref = nn.Conv2d(8, 16, 3, bias=True, **kw)
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(conv.bias)
    out = q(x)
    assert out.shape == fp.shape
    assert _rel(out, ref(q.input_quant(x))) <= 1e-6


def test_freeze_is_bit_identical_and_drops_float_weight():
    torch.manual_seed(0)
    q = QuantConv2d.from_float(nn.Conv2d(4, 8, 3, padding=1), LayerSpec("int3", "uint8", weight_granularity="group12"))
    x = torch.randn(2, 4, 6, 6)
    _calibrated(q, x)
    before = q(x)
    q.freeze()
    assert q.stored and "weight" not in dict(q.named_parameters())
    assert q.weight_codes.dtype == torch.uint8
    assert torch.equal(q(x), before)


def test_gradients_reach_weight_scale_and_input():
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(16, 8), LayerSpec("int4", "uint8"))
    x = torch.randn(4, 16)
    _calibrated(q, x)
    x.requires_grad_(True)
    q(x).pow(2).sum().backward()
    for t in (q.weight.grad, q.weight_quant.scale.grad, q.input_quant.scale.grad, x.grad):
        assert t is not None and torch.isfinite(t).all() and t.abs().sum() > 0


def _attn():
    torch.manual_seed(0)
    return Attention(query_dim=32, heads=4, dim_head=8, norm_num_groups=8, residual_connection=True,
                     bias=True, upcast_softmax=True, _from_deprecated_attn_block=True).eval()


def test_attention_processor_math_matches_diffusers_when_quantizers_off():
    attn = _attn()
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        ref = attn(x)  # diffusers' own processor
        attn.set_processor(AttnProcessor())
        ref_classic = attn(x)
        proc = QuantAttnProcessor(LayerSpec(None, "uint8"))
        for _, q in proc.activation_quantizers():
            q.fmt = None  # quantization off: must reproduce the float math
        attn.set_processor(proc)
        out = attn(x)
    assert _rel(out, ref_classic) <= 1e-6 and _rel(out, ref) <= 1e-5


def test_attention_matmul_operands_are_quantized():
    attn = _attn()
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        fp = attn(x)
    apply_specs(nn.ModuleDict({"a": attn}), {"a": LayerSpec(None, "uint8")})
    proc = attn.processor
    assert isinstance(proc, QuantAttnProcessor)
    calibrate(attn, [x], progress=False)
    seen = {}
    for n, q in proc.activation_quantizers():
        q.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
    with torch.no_grad():
        out = attn(x)
    assert set(seen) == {"q_quant", "k_quant", "p_quant", "v_quant"}
    for n, (i, o) in seen.items():
        levels = torch.unique(o).numel()
        assert levels <= 256, n  # at most 2^8 distinct values after uint8 fake-quant
        assert not torch.equal(i, o), n
    probs_in = seen["p_quant"][0]
    assert torch.allclose(probs_in.sum(-1), torch.ones(1), atol=1e-5)  # softmax probabilities
    assert 25 < sqnr_db(fp, out) < 200  # close to float, but not identical


def test_uncalibrated_activation_raises_clear_error():
    from lowbit.errors import CalibrationError

    q = QuantLinear.from_float(nn.Linear(4, 4), LayerSpec("int8", "uint8"))
    with pytest.raises(CalibrationError, match="calibrate"):
        q(torch.randn(2, 4))


def test_quantizer_with_no_format_is_identity():
    x = torch.randn(3, 3)
    assert Quantizer(None)(x) is x


class _Tables(nn.Module):
    """Two lookup tables as a diffusion model holds them: a DiT-style class table and a UNet
    class_embedding (which the default exclusions keep in float), plus a Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.class_embedder = nn.Embedding(11, 16)
        self.class_embedding = nn.Embedding(11, 16)
        self.fc = nn.Linear(16, 16)

    def forward(self, idx):
        return self.fc(self.class_embedder(idx) + self.class_embedding(idx))


def test_quant_embedding_decodes_only_the_rows_it_reads_bit_identically(tmp_path):
    from lowbit import freeze, load, quantize, save
    from lowbit.nn import QuantEmbedding

    m = quantize(_Tables(), "w4a8", [torch.arange(11)], progress=False)
    emb = m.class_embedder
    assert isinstance(emb, QuantEmbedding) and emb.spec.weight == "int8" and emb.spec.act is None
    assert type(m.class_embedding) is nn.Embedding  # default exclusion
    idx = torch.tensor([[3, 0], [10, 3]])
    want = F.embedding(idx, emb.weight_quant(emb.weight))  # the simulated table, looked up
    assert torch.equal(emb(idx), want)
    freeze(m)
    assert emb.stored and torch.equal(emb(idx), want)  # the gathered rows = the whole table decoded
    q = load(save(m, tmp_path / "t.safetensors"), _Tables())
    assert torch.equal(q.class_embedder(idx), want) and q.class_embedder.compute_path == "emulated"
    bf = load(tmp_path / "t.safetensors", _Tables(), dtype=torch.bfloat16)
    assert bf.class_embedder(idx).dtype == torch.bfloat16  # its rows join the model's float dtype
    assert sqnr_db(emb.weight_quant.decode(emb.weight_codes), _Tables().class_embedder.weight) > 35


def test_embeddings_uniform_plans_leave_and_max_norm_are_handled():
    from lowbit import Plan, quantize
    from lowbit.errors import PlanError

    m = quantize(_Tables(), Plan.uniform(LayerSpec("int4", "uint8")), [torch.arange(11)], progress=False)
    assert type(m.class_embedder) is nn.Embedding  # uniform plans cover Linear/Conv2d/attention
    fp = quantize(_Tables(), "w4a8-fp", [torch.arange(11)], progress=False)
    assert fp.class_embedder.spec.weight == "fp8_e4m3"  # minifloat recipes: the tables in FP8
    bad = _Tables()
    bad.class_embedder.max_norm = 1.0
    with pytest.raises(PlanError, match="max_norm"):
        quantize(bad, "w8a8", [torch.arange(11)], progress=False)

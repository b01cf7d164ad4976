"""Int8 attention matmuls (lowbit.kernels.int8_attention) against an independent float64 reference
built from the quantizers' own codes, and how set_compute installs them."""

import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention

from lowbit import calibrate, quantize
from lowbit.kernels.int8_attention import MIN_TOKENS, Int8AttentionKernel, _codes, _Codes, int_mm_exact
from lowbit.kernels.select import install_attention_kernels, set_compute
from lowbit.nn import QuantAttnProcessor, quant_layers, sqnr_db
from lowbit.plan import LayerSpec
from lowbit.report import format_report, report

sys.path.insert(0, str(Path(__file__).parent.parent))
from conftest import make_text_unet, text_unet_inputs  # noqa: E402

pytestmark = pytest.mark.skipif(not int_mm_exact(), reason="torch._int_mm is not exact on this CPU")

RANGES = {"q": (-2.5, 3.1), "k": (-2.9, 2.2), "p": (0.0, 0.6), "v": (-1.7, 2.4)}


def _processor(fmt: str = "uint8", p_range=(0.0, 0.6)) -> QuantAttnProcessor:
    proc = QuantAttnProcessor(LayerSpec(None, fmt))
    for name, (lo, hi) in {**RANGES, "p": p_range}.items():
        getattr(proc, f"{name}_quant").set_range(torch.tensor(lo), torch.tensor(hi))
    return proc


def _operands(n, rows, keys, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [1.2 * torch.randn(n, s, d, generator=g) for s in (rows, keys, keys)]


def _reference(proc, attn, q, k, v, mask):
    """float64 from the quantizers' decoded codes: exact scores, float64 softmax, P's codes."""
    dq = [getattr(proc, f"{n}_quant").decode(getattr(proc, f"{n}_quant").encode(x)).double()
          for n, x in (("q", q), ("k", k), ("v", v))]
    s = attn.scale * dq[0] @ dq[1].transpose(1, 2)
    if mask is not None:
        s = s + mask.double()
    pq = proc.p_quant
    p = torch.softmax(s, -1)
    z, fmt = pq.zero.double(), pq.fmt
    codes = torch.clamp(torch.round(p / pq.scale.double()), fmt.min_value - z, fmt.max_value - z) + z
    return (codes - z) * pq.scale.double() @ dq[2], codes


@pytest.mark.parametrize("fmt", ["uint8", "int8", "uint4"])
@pytest.mark.parametrize("masked", [False, True])
def test_int8_core_matches_the_float64_reference(fmt, masked):
    n, rows, keys, d = 4, 72, 88, 16
    attn = Attention(32, heads=2, dim_head=d)
    proc = _processor(fmt)
    q, k, v = _operands(n, rows, keys, d)
    mask = None
    if masked:  # diffusers' prepared additive mask, one row per (batch·head)
        mask = torch.zeros(n, 1, keys)
        mask[:, :, -20:] = -10000.0
    kernel = Int8AttentionKernel(proc, forced=True)
    got = kernel(attn, q, k, v, mask, budget=float("inf")).double()
    ref, codes = _reference(proc, attn, q, k, v, mask)
    # P is the only operand quantized after float arithmetic (the scores' scaling and the softmax
    # in float32): where that lands on a rounding boundary a code may be its neighbour. Each
    # neighbour moves an output by one P step times |v|; everything else is exact.
    step = float(proc.p_quant.scale) * float(v.abs().max())
    assert (got - ref).abs().max() <= 2 * step
    assert sqnr_db(ref, got) > 50


def test_integer_scores_are_exact():
    # the codes and rank-1 corrections give (Q − z_q)(K − z_k)ᵀ exactly, the asymmetric case
    proc = _processor("uint8")
    q, k, _ = _operands(2, 40, 48, 24)
    kern = Int8AttentionKernel(proc, forced=True)
    qs, ks = _codes(q, kern.q.params), _codes(k, kern.k.params)
    uq, uk = proc.q_quant.encode(q).long() - int(proc.q_quant.zero), proc.k_quant.encode(k).long() - int(proc.k_quant.zero)
    for i in range(2):
        s = torch._int_mm(qs[i], ks[i].t()).long()
        s += kern.k.offset * qs[i].long().sum(-1, keepdim=True) + kern.q.offset * ks[i].long().sum(-1)
        s += kern.q.offset * kern.k.offset * 24
        assert torch.equal(s, uq[i] @ uk[i].t())


@pytest.mark.parametrize("budget", [64 * 88, 100.0, 3 * 72 * 88])
def test_query_row_blocks_equal_one_block_bit_for_bit(budget):
    # integer scores are exact in any block, and every later step is per row
    n, rows, keys, d = 3, 200, 88, 16
    attn = Attention(32, heads=2, dim_head=d)
    kernel = Int8AttentionKernel(_processor(), forced=True)
    q, k, v = _operands(n, rows, keys, d, seed=3)
    assert torch.equal(kernel(attn, q, k, v, None, budget), kernel(attn, q, k, v, None, float("inf")))


def test_compiled_helpers_compute_the_same_values(monkeypatch):
    n, rows, keys, d = 2, 130, 96, 16
    attn = Attention(32, heads=2, dim_head=d)
    kernel = Int8AttentionKernel(_processor(), forced=True)
    q, k, v = _operands(n, rows, keys, d, seed=4)
    monkeypatch.setenv("LOWBIT_COMPILE_QUANT", "0")
    eager = kernel(attn, q, k, v, None, float("inf"))
    monkeypatch.setenv("LOWBIT_COMPILE_QUANT", "1")
    helped = kernel(attn, q, k, v, None, float("inf"))
    ref, _ = _reference(_processor(), attn, q, k, v, None)
    assert sqnr_db(ref, helped) > 50 and (helped - eager).abs().max() <= 2 * float(kernel.p.scale) * v.abs().max()


def test_auto_leaves_compiled_models_on_the_emulated_core(monkeypatch):
    kernel, forced = Int8AttentionKernel(_processor()), Int8AttentionKernel(_processor(), forced=True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not kernel.applies(4096, 4096, 64) and forced.applies(4096, 4096, 64)


def test_forced_int8_compiles_as_one_operator():
    n, rows, keys, d = 2, 72, 88, 16
    attn = Attention(32, heads=2, dim_head=d)
    kernel = Int8AttentionKernel(_processor(), forced=True)
    q, k, v = _operands(n, rows, keys, d, seed=6)
    compiled = torch.compile(lambda q, k, v: kernel(attn, q, k, v, None, float("inf")), fullgraph=True)
    assert torch.equal(compiled(q, k, v), kernel(attn, q, k, v, None, float("inf")))


def test_auto_runs_int8_only_from_min_tokens():
    kernel = Int8AttentionKernel(_processor())
    assert kernel.applies(MIN_TOKENS, MIN_TOKENS, 64) and kernel.applies(4096, 4096, 40)
    assert not kernel.applies(256, 256, 64)
    assert not kernel.applies(1024, 77, 64) and not kernel.applies(64, 64, 64)
    forced = Int8AttentionKernel(_processor(), forced=True)
    assert forced.applies(16, 16, 8) and not forced.applies(40_000, 40_000, 64)  # int32 headroom
    assert f"from {MIN_TOKENS} tokens" in kernel.path and forced.path == "native int8 (_int_mm)"


def test_set_compute_installs_and_reports_attention_kernels():
    m = quantize(make_text_unet(), "w8a8", text_unet_inputs(2, seed=1), progress=False)
    procs = [p for _, p in quant_layers(m) if isinstance(p, QuantAttnProcessor)]
    assert procs and all(p.compute_path == "emulated" for p in procs)
    set_compute(m, "auto")
    assert all(p.compute_path.startswith("native int8 (_int_mm)") for p in procs)
    assert "native int8 (_int_mm)" in format_report(report(m))
    x = text_unet_inputs(1, seed=5)[0]
    with torch.no_grad():
        set_compute(m, "int8")  # forced: the tiny model's 64 tokens run the int8 core
        forced = m(*x).sample
        set_compute(m, "emulated")
        assert all(p.kernel is None for p in procs)
        emulated = m(*x).sample
    assert sqnr_db(emulated, forced) > 35
    set_compute(m, "int8")
    calibrate(m, text_unet_inputs(1, seed=2))  # new scales: the snapshots are dropped
    assert all(p.kernel is None for p in procs)


def test_formats_the_kernel_cannot_run_stay_emulated():
    fp8 = QuantAttnProcessor(LayerSpec(None, "fp8_e4m3"))
    uncal = QuantAttnProcessor(LayerSpec(None, "uint8"))
    model = torch.nn.ModuleDict({"a": fp8, "b": uncal, "c": _processor()})
    assert install_attention_kernels(model, "auto") == 1 and model["c"].kernel is not None
    assert fp8.kernel is None and uncal.kernel is None
    assert install_attention_kernels(model, "bf16") == 0 and model["c"].kernel is None


def test_codes_shift_the_quantizers_uint8_codes_by_128():
    proc = _processor("uint8")
    x = torch.linspace(-4, 4, 1001)
    c = _Codes(proc.q_quant)
    assert torch.equal(_codes(x, c.params).long() + 128, proc.q_quant.encode(x).long())
    assert c.offset == 128 - int(proc.q_quant.zero)


def test_load_installs_the_requested_attention_path(tmp_path):
    import lowbit

    q = quantize(make_text_unet(), "w8a8", text_unet_inputs(2, seed=1), progress=False)
    path = lowbit.save(q, tmp_path / "w8a8.safetensors")
    for compute, want in (("int8", "native int8 (_int_mm)"), ("emulated", "emulated")):
        m = lowbit.load(path, make_text_unet(device="meta"), compute=compute)
        paths = {p.compute_path for _, p in quant_layers(m) if isinstance(p, QuantAttnProcessor)}
        assert paths == {want}, compute

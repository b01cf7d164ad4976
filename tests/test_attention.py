"""The blocked attention core (lowbit._attention): same values as the one-block computation,
bounded temporaries, and the whole tensor for observers while calibrating."""

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowbit import calibrate
from lowbit._attention import _blocks, attention_core
from lowbit.formats import parse_optional
from lowbit.nn import QuantAttnProcessor, apply_specs
from lowbit.plan import LayerSpec
from lowbit.quantizer import Quantizer


def _p_quant() -> Quantizer:
    q = Quantizer(parse_optional("uint8"))
    q.set_range(torch.tensor(0.0), torch.tensor(0.3))
    return q


def _operands(n, rows, keys, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, s, d, generator=g).to(dtype) for s in (rows, keys, keys)]


@pytest.mark.parametrize("n,rows,keys,budget", [(16, 64, 64, 1 << 14), (5, 30, 77, 3 * 30 * 77), (7, 49, 49, 5000),
                                                (2, 300, 200, 64 * 200), (3, 130, 50, 1)])
def test_blocks_cover_every_score_once(n, rows, keys, budget):
    hit = torch.zeros(n, rows, dtype=torch.int32)
    for heads, qrows in _blocks(n, rows, keys, budget):
        hit[heads, qrows] += 1
        h, r = heads.stop - heads.start, qrows.stop - qrows.start
        # a block fits the budget, except that query-row blocks keep at least 64 rows
        assert h * r * keys <= budget or (h == 1 and r <= 64)
    assert torch.equal(hit, torch.ones_like(hit))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_shape", [None, "row", "full", "broadcast"])
def test_whole_head_blocks_equal_one_block_bit_for_bit(dtype, mask_shape):
    n, rows, keys, d = 12, 40, 56, 16
    attn = Attention(32, heads=2, dim_head=d, upcast_softmax=True)
    q, k, v = _operands(n, rows, keys, d, dtype)
    shapes = {"row": (n, 1, keys), "full": (n, rows, keys), "broadcast": (1, 1, keys)}
    mask = None if mask_shape is None else torch.randn(shapes[mask_shape]).to(dtype)
    p = _p_quant()
    ref = attention_core(attn, q, k, v, mask, p, budget=math.inf)
    for budget in (rows * keys, 5 * rows * keys, 11 * rows * keys):  # 12, 3 and 2 blocks
        assert len(_blocks(n, rows, keys, budget)) > 1
        assert torch.equal(attention_core(attn, q, k, v, mask, p, budget=budget), ref)


def test_query_row_blocks_agree_within_float_rounding():
    n, rows, keys, d = 2, 300, 120, 32
    attn = Attention(64, heads=2, dim_head=d)
    q, k, v = _operands(n, rows, keys, d, torch.float32)
    mask = torch.randn(n, rows, keys)
    budget = 64 * keys  # 5 row blocks per head
    assert len(_blocks(n, rows, keys, budget)) == 10
    ident = attention_core(attn, q, k, v, mask, lambda t: t, budget=math.inf)
    assert torch.allclose(attention_core(attn, q, k, v, mask, lambda t: t, budget=budget), ident, rtol=1e-5, atol=1e-6)
    p = _p_quant()
    ref = attention_core(attn, q, k, v, mask, p, budget=math.inf)
    got = attention_core(attn, q, k, v, mask, p, budget=budget)
    # a probability exactly at a rounding boundary may take the neighbouring code
    assert (got - ref).abs().gt(1e-5).float().mean() < 0.01


def test_float_budgets_work_and_bad_ones_are_refused():
    attn = Attention(16, heads=2, dim_head=8)
    q, k, v = _operands(6, 20, 20, 8, torch.float32)
    ref = attention_core(attn, q, k, v, None, _p_quant(), budget=math.inf)
    assert torch.equal(attention_core(attn, q, k, v, None, _p_quant(), budget=800.0), ref)
    for bad in (0, -5, float("nan")):
        with pytest.raises(ValueError, match="at least 1"):
            attention_core(attn, q, k, v, None, _p_quant(), budget=bad)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_temporary_exceeds_one_block():
    n, rows, keys, d = 16, 256, 256, 8
    attn = Attention(16, heads=2, dim_head=d, upcast_softmax=True)
    q, k, v = _operands(n, rows, keys, d, torch.bfloat16)
    budget = 2 * rows * keys
    for b, bound in ((math.inf, n * rows * keys), (budget, budget)):
        with _LargestTensor() as probe:
            attention_core(attn, q, k, v, None, _p_quant(), budget=b)
        assert probe.largest == bound


def _attn_model():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8, norm_num_groups=8, residual_connection=True,
                     upcast_softmax=True, _from_deprecated_attn_block=True).eval()
    return nn.ModuleDict({"a": attn})


def _calibrated(block_elements, observer="minmax", x=None):
    model = _attn_model()
    apply_specs(model, {"a": LayerSpec(None, "uint8", act_observer=observer)})
    proc = model["a"].processor
    assert isinstance(proc, QuantAttnProcessor)
    proc.block_elements = block_elements
    seen = []
    proc.p_quant.register_forward_pre_hook(lambda m, i: seen.append(i[0].shape))
    calibrate(model["a"], [x], progress=False)
    return model, proc, seen


def test_minmax_calibration_in_blocks_finds_the_whole_tensor_range():
    x = torch.randn(3, 32, 8, 8)
    _, whole, seen = _calibrated(math.inf, x=x)
    assert seen == [torch.Size([12, 64, 64])]
    model, blocked, seen = _calibrated(100, x=x)  # far below one head's 64×64 scores: row blocks
    assert len(seen) == 12 and all(s == torch.Size([1, 64, 64]) for s in seen)
    for (n, a), (_, b) in zip(whole.activation_quantizers(), blocked.activation_quantizers()):
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero), n
    seen.clear()
    with torch.no_grad():
        out = model["a"](x)
        assert len(seen) == 12
        blocked.block_elements = math.inf
        assert torch.allclose(out, model["a"](x), atol=1e-4)


def test_sampling_observer_sees_the_whole_tensor():
    _, _, seen = _calibrated(100, observer="mse", x=torch.randn(3, 32, 8, 8))
    assert seen == [torch.Size([12, 64, 64])]

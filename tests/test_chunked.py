"""lowbit._chunked against the plain full-tensor arithmetic it replaces (bit for bit)."""

import pytest
import torch

from lowbit._chunked import CHUNK, quantize_chunked
from lowbit.formats import parse
from lowbit.quantizer import Quantizer, grouped, quant_dequant


def _ref(x, inv, lo, hi, add=None, mul=None, out_dtype=None):
    v = torch.clamp(x.float() * inv, lo, hi).round()
    if add is not None:
        v = v + add
    if mul is not None:
        v = v * mul
    return v.to(out_dtype or x.dtype)


def _input(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 6
    flat = x.view(-1)
    k = min(40, flat.numel())
    flat[:k] = ((torch.arange(40) - 20 + 0.5) * 0.1)[:k]  # at or next to the ties k + 1/2 of x·10
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 1000, CHUNK, 3 * CHUNK + 17])
def test_codes_and_qdq_equal_the_full_tensor_arithmetic(dtype, n):
    x = _input((n,), dtype)
    inv = torch.tensor(1.0) / torch.tensor(0.1)
    codes = quantize_chunked(x, inv, -30.0, 225.0, add=30.0, out_dtype=torch.uint8)
    assert codes.dtype == torch.uint8
    assert torch.equal(codes, _ref(x, inv, -30.0, 225.0, add=30.0, out_dtype=torch.uint8))
    qdq = quantize_chunked(x, inv, -128.0, 127.0, mul=0.1)
    assert qdq.dtype == dtype
    assert torch.equal(qdq, _ref(x, inv, -128.0, 127.0, mul=0.1))


def test_layouts_channels_last_kept_views_made_contiguous():
    x = _input((2, 24, 40, 40))  # 76,800 elements: two chunks
    cl = x.contiguous(memory_format=torch.channels_last)
    out = quantize_chunked(cl, 10.0, -8.0, 7.0, mul=0.1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, _ref(x, 10.0, -8.0, 7.0, mul=0.1))
    view = x.transpose(1, 3)[:, ::2]  # neither contiguous nor channels-last
    out = quantize_chunked(view, 10.0, -8.0, 7.0, mul=0.1)
    assert out.is_contiguous() and torch.equal(out, _ref(view, 10.0, -8.0, 7.0, mul=0.1))
    assert quantize_chunked(torch.empty(0, 3), 1.0, 0.0, 1.0).shape == (0, 3)


@pytest.mark.parametrize("fmt", ["int8", "uint8", "int4"])
def test_per_tensor_quantizer_on_a_multi_chunk_bf16_activation(fmt):
    """The quantizer's eager inference path for per-tensor ints runs through the chunks; it must
    still equal quant_dequant followed by the cast to the activation's dtype."""
    x = _input((4, 256, 16, 16), torch.bfloat16, seed=3)  # 262,144 elements: four chunks
    q = Quantizer(parse(fmt))
    q.set_range(torch.tensor(-3.0), torch.tensor(2.5))  # an asymmetric range: a zero-point for uint8
    with torch.no_grad():
        got = q(x)
    s, z = q.scale.detach().unsqueeze(-1), q.zero.unsqueeze(-1)
    ref = quant_dequant(grouped(x.float(), q.scale_shape), s, z, q.fmt).reshape(x.shape).to(x.dtype)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)


def _count_full_size(fn, x):
    """How many buffers of x's size the ops inside ``fn(x)`` allocate (views are not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    storages = set()

    class Probe(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() == x.numel():
                storages.add(out.untyped_storage().data_ptr())
            return out

    with Probe():
        fn(x)
    storages.discard(x.untyped_storage().data_ptr())
    return len(storages)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp6_e3m2", "fp4_e2m1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_map_chunked_minifloat_qdq_equals_full_tensor(fmt, dtype, monkeypatch):
    """The quantizer's eager minifloat path without the compiled helpers runs in chunks: same
    values bit for bit, and no full-size temporaries besides the result."""
    monkeypatch.setenv("LOWBIT_COMPILE_QUANT", "0")
    x = _input((2, 24, 40, 40), dtype, seed=5).contiguous(memory_format=torch.channels_last)  # 2 chunks
    q = Quantizer(parse(fmt))
    q.set_range(torch.tensor(-3.0), torch.tensor(2.5))
    s = q.scale.detach().unsqueeze(-1)
    ref = quant_dequant(grouped(x.float(), q.scale_shape), s, q.zero.unsqueeze(-1), q.fmt).reshape(x.shape).to(dtype)
    with torch.no_grad():
        got = q(x)
        assert _count_full_size(q, x) == 1  # the output
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, ref)


def test_map_chunked_keeps_small_inputs_whole_and_takes_fn_dtype():
    from lowbit._chunked import map_chunked

    x = _input((3 * CHUNK + 17,), seed=6)
    calls = []

    def fn(v, k):
        calls.append(v.numel())
        return (v * k).to(torch.bfloat16)

    out = map_chunked(fn, x, 3.0)
    assert calls == [CHUNK] * 3 + [17] and out.dtype == torch.bfloat16
    assert torch.equal(out, (x * 3.0).to(torch.bfloat16))
    calls.clear()
    view = x[: 2 * CHUNK].view(2, CHUNK).t()  # a transposed view: made contiguous
    out = map_chunked(fn, view, 1.0)
    assert out.is_contiguous() and torch.equal(out, view.to(torch.bfloat16))
    calls.clear()
    map_chunked(fn, x[:100], 1.0)
    assert calls == [100]

"""lowbit.evaluate.runner: the samplers' view of a model run in bf16 and/or under torch.compile."""

import warnings

import pytest
import torch

from conftest import make_unet
from lowbit.errors import EvaluationError
from lowbit.evaluate.runner import sampling_model


def _inputs():
    g = torch.Generator().manual_seed(0)
    # t as the sampler passes it: a view into a timestep table, at a non-zero storage offset
    return torch.randn(2, 1, 8, 8, generator=g), torch.tensor([999, 500])[1:].expand(2)


def test_float32_eager_is_the_model_itself():
    m = make_unet()
    assert sampling_model(m) is m and sampling_model(m, "float32", compile=False) is m


@pytest.mark.parametrize("dtype, msg", [("float16", "unknown activation dtype 'float16'"),
                                        (torch.float16, "unsupported activation dtype torch.float16")])
def test_rejects_other_dtypes(dtype, msg):
    with pytest.raises(EvaluationError, match=msg):
        sampling_model(make_unet(), dtype)


@torch.no_grad()
def test_bf16_feeds_bf16_and_returns_float32():
    m = make_unet().to(torch.bfloat16).eval()
    x, t = _inputs()
    y = sampling_model(m, "bfloat16")(x, t)
    assert y.dtype == torch.float32
    assert torch.equal(y, m(x.to(torch.bfloat16), t).sample.float())


@torch.no_grad()
def test_compiled_matches_eager():
    m = make_unet().eval()
    x, t = _inputs()
    fast = sampling_model(m, compile=True)
    y = fast(x, t)
    ref = m(x, t).sample
    assert fast.compiled  # it did compile (a C++ compiler is part of the test environment)
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-5), (y - ref).abs().max()
    # the second step of the same kind skips the guards (lowbit._guards) and computes the same
    assert torch.equal(fast(x, t), y) and fast._fn.skipped == (1 if fast._fn.enabled else 0)


@torch.no_grad()
def test_a_smaller_last_batch_is_padded_not_recompiled():
    m = make_unet().eval()
    x, t = _inputs()  # batch 2: the shapes test_compiled_matches_eager compiles (inductor's cache)
    fast = sampling_model(m, compile=True)
    fast(x, t)
    x1, t1 = x[1:] * 0.5, t[1:]
    y = fast(x1, t1)  # batch 1 after batch 2: run as batch 2, the padding row dropped
    assert y.shape == (1, 1, 8, 8)
    assert torch.allclose(y, m(x1, t1).sample, rtol=1e-4, atol=1e-5), (y - m(x1, t1).sample).abs().max()
    assert len(fast._fn.seen) == (1 if fast._fn.enabled else 0)  # one kind of call: no second compilation
    assert torch.allclose(fast(x, t), m(x, t).sample, rtol=1e-4, atol=1e-5)  # the padding left no trace


@torch.no_grad()
def test_a_compile_failure_warns_and_samples_eagerly(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: broken)
    m = make_unet().eval()
    x, t = _inputs()
    fast = sampling_model(m, compile=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y = fast(x, t)
    assert any("torch.compile failed (RuntimeError: no C++ compiler found); sampling eagerly" in str(e.message)
               for e in w)
    assert not fast.compiled and torch.equal(y, m(x, t).sample)


def test_conditioning_arguments_pass_through_and_are_padded_per_sample():
    class Cond(torch.nn.Module):  # a class-conditional "model": output depends on the labels
        def forward(self, x, t, labels, scale):
            return x * scale + labels.view(-1, 1, 1, 1).to(x.dtype) + t.view(-1, 1, 1, 1).to(x.dtype)

    sm = sampling_model(Cond(), "float32", compile=True)
    x, t, y = torch.randn(4, 1, 2, 2), torch.arange(4.0), torch.arange(4) * 10
    full = sm(x, t, y, 2.0)
    assert torch.equal(full, Cond()(x, t, y, 2.0))  # exact in float32, compiled or not
    padded = sm._pad(x[:2], t[:2], y[:2], 2.0)  # after a batch of 4: rows 3-4 copy row 2
    assert [a.shape[0] for a in padded[:3]] == [4, 4, 4] and padded[3] == 2.0 and padded[4] == 2
    assert torch.equal(padded[2], torch.tensor([0, 10, 10, 10]))
    assert torch.equal(sm(x[:2], t[:2], y[:2], 2.0), full[:2])

"""lowbit._compiled: the compiled helpers run only where they pay, and compute what eager does."""

import functools

import torch

from lowbit import _compiled


def _scaled(x: torch.Tensor, k: torch.Tensor, tag: str) -> torch.Tensor:
    return (x.float() * k).round()


def test_small_inputs_run_eagerly_and_large_ones_compiled(monkeypatch):
    monkeypatch.setenv("LOWBIT_COMPILE_QUANT", "1")
    fn = functools.partial(_scaled, tag="threshold-test")  # a cache key no other test uses
    k = torch.tensor(3.7)
    n = _compiled.MIN_COMPILED_ELEMENTS
    before = _compiled._compiled.cache_info().currsize
    small = torch.randn(n - 1)
    assert torch.equal(_compiled.run_compiled(fn, small, k), fn(small, k))
    assert _compiled._compiled.cache_info().currsize == before  # nothing was compiled for it
    large = torch.randn(n)
    assert torch.equal(_compiled.run_compiled(fn, large, k), fn(large, k))
    if _compiled.use_compiled_helpers():  # else torch.compile cannot build here and eager ran
        assert _compiled._compiled.cache_info().currsize == before + 1

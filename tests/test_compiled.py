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


def test_the_vector_width_is_pinned_to_what_inductor_picks():
    from torch._inductor import config as inductor_config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    width = _compiled.pin_vector_width()
    assert width == inductor_config.cpp.simdlen
    if width is not None:
        assert width == pick_vec_isa().bit_width()  # the code generated is the default one


# One process quantizes with lowbit's compiled helper, then a second under ATEN_CPU_CAPABILITY=avx2
# with the same inductor cache directory. Without the pinned width the second reused the first's
# 16-lane AVX-512 graph with 8-lane AVX2 vectors (measured on a Zen 4 CPU: wrong values in every
# shape, NaN images on the bundled model).
_CACHE_SCRIPT = """
import torch
from lowbit._compiled import run_compiled
from lowbit.quantizer import _int_qdq
torch.manual_seed(0)
params = torch.tensor([255.0, -3.0, 252.0, 1 / 255.0])
ok = True
for shape in [(24, 49, 49), (4096,), (1000,)]:
    x = torch.rand(*shape)
    ok &= torch.equal(run_compiled(_int_qdq, x, params, elementwise=True), _int_qdq(x, params))
print("EQUAL" if ok else "DIFFERENT", torch.backends.cpu.get_cpu_capability())
"""


def test_a_cache_shared_across_vector_widths_still_computes_the_same(tmp_path):
    import os
    import subprocess
    import sys

    import pytest
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    if pick_vec_isa().bit_width() != 512:
        pytest.skip("needs an AVX-512 CPU, where ATEN_CPU_CAPABILITY=avx2 picks another vector width")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "LOWBIT_COMPILE_QUANT": "1"}
    env.pop("ATEN_CPU_CAPABILITY", None)
    outs = []
    for extra in ({}, {"ATEN_CPU_CAPABILITY": "avx2"}):
        r = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT], env={**env, **extra}, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(r.stdout.split()[-2:])
    assert outs == [["EQUAL", "AVX512"], ["EQUAL", "AVX2"]]

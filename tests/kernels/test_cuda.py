"""CUDA paths (``torch._int_mm`` W8A8 Linear chosen by ``set_compute``): run only where a CUDA
GPU exists; on CPU-only machines every test here is skipped with the reason shown by ``-ra``."""

import pytest
import torch

from lowbit.kernels import choose_path, linear_w8a8_reference, set_compute
from lowbit.kernels.int_mm import IntMMLinearKernel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine (CPU-only run)")


def test_int_mm_kernel_matches_the_integer_reference_on_cuda():
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (96, 200), generator=g, dtype=torch.int8)
    w_scale = torch.rand(96, generator=g) * 0.01 + 1e-3
    bias = torch.randn(96, generator=g)
    x = torch.randn(37, 200, generator=g)
    ref = linear_w8a8_reference(x, 0.02, 131, w, w_scale, bias)
    k = IntMMLinearKernel(w.cuda(), w_scale.cuda(), bias.cuda(), 0.02, 131)
    out = k(x.cuda()).cpu()
    lsb = 0.02 * w_scale.max().item()
    assert (out - ref).abs().max().item() <= lsb


def test_set_compute_picks_int_mm_for_cuda_linear():
    import lowbit

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 32)).cuda()
    calib = [torch.randn(16, 64, device="cuda") for _ in range(2)]
    lowbit.quantize(model, "w8a8", calib, progress=False)
    x = torch.randn(16, 64, device="cuda")
    with torch.no_grad():
        emulated = model(x)
        chosen = set_compute(model, "auto")
        native = model(x)
    assert set(chosen.values()) == {"native int8 (_int_mm)"}
    assert choose_path(model[0], "auto") == "int8"
    assert lowbit.nn.sqnr_db(emulated, native) > 60


def test_set_compute_picks_scaled_mm_for_fp8_linears_on_fp8_gpus():
    import lowbit
    from lowbit.kernels.scaled_mm import fp8_available

    if not fp8_available(torch.device("cuda")):
        pytest.skip("this GPU has no FP8 tensor cores (compute capability < 8.9)")
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 32)).cuda()
    calib = [torch.randn(16, 64, device="cuda") for _ in range(2)]
    lowbit.quantize(model, "fp8", calib, progress=False)
    x = torch.randn(16, 64, device="cuda")
    with torch.no_grad():
        emulated = model(x)
        chosen = set_compute(model, "auto")
        native = model(x)
    assert set(chosen.values()) == {"native fp8 (_scaled_mm)"}
    assert lowbit.nn.sqnr_db(emulated, native) > 35

"""CUDA paths (``torch._int_mm`` W8A8 and ``torch._scaled_mm`` FP8 Linear chosen by
``set_compute``): run only where a CUDA GPU exists; on CPU-only machines every test here is skipped with the reason shown by ``-ra``."""

import pytest
import torch

from lowbit.kernels import linear_w8a8_reference, set_compute
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


@pytest.mark.parametrize("recipe, path, floor", [("w8a8", "native int8 (_int_mm)", 60),
                                                  ("fp8", "native fp8 (_scaled_mm)", 35)])
def test_set_compute_picks_the_native_linear_on_cuda(recipe, path, floor):
    import lowbit
    from lowbit.kernels.scaled_mm import fp8_available

    if recipe == "fp8" and not fp8_available(torch.device("cuda")):
        pytest.skip("this GPU has no FP8 tensor cores (compute capability < 8.9)")
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 32)).cuda()
    calib = [torch.randn(16, 64, device="cuda") for _ in range(2)]
    lowbit.quantize(model, recipe, calib, progress=False)
    x = torch.randn(16, 64, device="cuda")
    with torch.no_grad():
        emulated = model(x)
        chosen = set_compute(model, "auto")
        native = model(x)
    assert set(chosen.values()) == {path}
    assert lowbit.nn.sqnr_db(emulated, native) > floor


@pytest.mark.parametrize("recipe", ["w8a8", "fp8"])
def test_load_onto_cuda_installs_the_gpu_kernels(tmp_path, recipe):
    """``load(..., device="cuda")`` unpacks on the host, moves the model and builds CUDA kernels;
    its outputs match the emulated model on the CPU."""
    import lowbit
    from conftest import make_unet, unet_inputs

    model = lowbit.quantize(make_unet(), recipe, unet_inputs(2, seed=1), progress=False)
    path = lowbit.save(model, tmp_path / "q.safetensors")
    x, t = unet_inputs(1, seed=2)[0]
    with torch.no_grad():
        ref = lowbit.load(path, make_unet(device="meta"), compute="emulated")(x, t).sample
        gpu = lowbit.load(path, make_unet(device="meta"), device="cuda")
        out = gpu(x.cuda(), t.cuda()).sample.cpu()
    paths = {m.compute_path for m in gpu.modules() if hasattr(m, "compute_path")}
    assert any(p.startswith("native") or p == "bf16" for p in paths), paths
    assert lowbit.nn.sqnr_db(ref, out) > 30


def test_w8a8_convolutions_run_int8_on_cuda():
    """``auto`` on CUDA runs a W8A8 conv as the im2col ``_int_mm`` GEMM (no longer bf16), with
    the same integers as the emulated layer."""
    import lowbit
    from lowbit.kernels.int_mm_conv import IntMMConv2dKernel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(16, 24, 3, stride=2, padding=1)).cuda()
    calib = [torch.randn(2, 8, 12, 12, device="cuda") for _ in range(2)]
    lowbit.quantize(model, lowbit.recipe("w8a8", exclude_defaults=False), calib, progress=False)
    x = torch.randn(2, 8, 12, 12, device="cuda")
    with torch.no_grad():
        emulated = model(x)
        chosen = set_compute(model, "auto")
        native = model(x)
    assert set(chosen.values()) == {"native int8 (_int_mm)"}
    assert all(isinstance(m.kernel, IntMMConv2dKernel) for m in (model[0], model[2]))
    assert lowbit.nn.sqnr_db(emulated, native) > 60

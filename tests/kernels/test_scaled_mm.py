"""lowbit.kernels.scaled_mm: the FP8 E4M3 Linear on torch._scaled_mm computes lowbit's FP8 layer
(checked on CPU, where the operator runs too), is forced by set_compute(model, "fp8"), and is
never picked by "auto" without an FP8 GPU."""

import pytest
import torch
from conftest import needs_cpu_bf16
from torch import nn

import lowbit
from lowbit.errors import FormatError
from lowbit.formats import parse
from lowbit.kernels import choose_path, set_compute
from lowbit.kernels.scaled_mm import Fp8LinearKernel, fp8_available, is_e4m3fn
from lowbit.nn import QuantLinear, sqnr_db

FP8 = "native fp8 (_scaled_mm)"


def test_e4m3fn_is_recognised_by_its_values():
    assert is_e4m3fn(parse("fp8_e4m3"))
    for name in ("fp8_e5m2", "fp8_e4m3_b8", "fp4_e2m1", "int8"):
        assert not is_e4m3fn(parse(name)), name
    assert not fp8_available(torch.device("cpu"))


def _reference(x, s_x, v_w, s_w, bias):
    """float64 ``s_x · s_w[n] · Σ_k round_e4m3(x/s_x) · v_w + bias`` with the quantizer's rounding."""
    fmt = parse("fp8_e4m3")
    v_x = fmt.round(torch.clamp(x.float() / s_x, fmt.min_value, fmt.max_value)).double()
    return (v_x @ v_w.double().t()) * (s_x * s_w.double()) + bias.double()


@pytest.mark.parametrize("rowwise", [True, False])
@pytest.mark.parametrize("pad", [False, True])
def test_kernel_matches_the_float64_reference_within_bf16_rounding(pad, rowwise, monkeypatch):
    """Both forms: per-row/column scales inside _scaled_mm, and the unit-scale fp32 form that
    builds with per-tensor-only scales get (the CPU operator of torch < 2.13)."""
    import lowbit.kernels.scaled_mm as sm

    if rowwise and not sm.rowwise_scales_supported(torch.device("cpu")):
        pytest.skip("this torch's CPU _scaled_mm takes per-tensor scales only")
    monkeypatch.setattr(sm, "rowwise_scales_supported", lambda device: rowwise)  # read at construction
    g = torch.Generator().manual_seed(0)
    n, k = 40, 72  # neither a multiple of 16: pad=True exercises the CUDA layout
    fmt = parse("fp8_e4m3")
    v_w = fmt.round(torch.randn(n, k, generator=g) * 40)
    s_w = torch.rand(n, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g)
    x = torch.randn(3, 11, k, generator=g) * 2
    s_x = 0.01
    kern = Fp8LinearKernel(v_w, s_w, bias, (fmt, s_x, 0.0), pad=pad)
    assert (kern.kp, kern.np) == ((80, 48) if pad else (72, 40))
    out = kern(x)
    ref = _reference(x.reshape(-1, k), s_x, v_w, s_w, bias).reshape(3, 11, n)
    assert out.shape == (3, 11, n) and out.dtype == torch.float32
    # the bias is bf16 (as _scaled_mm takes it) and the output is rounded to bf16 once:
    # |err| <= 2^-8 (|y| + |bias|) (measured 0.0037 of that sum at most; 0.0039 of |y| unbiased)
    assert ((out.double() - ref).abs() <= (ref.abs() + bias.abs().double()) * 2.0 ** -8 + 1e-6).all()


def test_wrong_formats_are_refused():
    v = parse("fp8_e4m3").round(torch.randn(16, 16))
    with pytest.raises(FormatError, match="E4M3FN activations"):
        Fp8LinearKernel(v, torch.ones(16), None, (parse("fp8_e5m2"), 0.1, 0.0))
    with pytest.raises(FormatError, match="not E4M3FN numbers"):
        Fp8LinearKernel(v + 0.01, torch.ones(16), None, (parse("fp8_e4m3"), 0.1, 0.0))


class FP8Net(nn.Module):
    """Two Linears (fp8-capable) and a Conv2d (no fp8 convolution exists)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.conv = nn.Linear(32, 64), nn.Linear(64, 48), nn.Conv2d(3, 8, 3)

    def forward(self, x):
        h = torch.nn.functional.silu(self.fc2(torch.nn.functional.silu(self.fc1(x))))
        return h, self.conv(h[:, :27].reshape(-1, 3, 3, 3))


def _fp8_mlp() -> FP8Net:
    torch.manual_seed(0)
    net = FP8Net().eval()
    lowbit.quantize(net, "fp8", [torch.randn(16, 32) for _ in range(2)], progress=False)
    return net


def _layer_io(net, x):
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, (args[0], out)))
             for n, m in net.named_modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        out = net(x)
    for h in hooks:
        h.remove()
    return out, seen


@needs_cpu_bf16
def test_forced_fp8_runs_linears_on_scaled_mm_and_matches_the_emulated_layers():
    net = _fp8_mlp()
    x = torch.randn(16, 32)
    emulated, seen = _layer_io(net, x)
    assert all(choose_path(m, "auto") != "fp8" for m in net.modules() if isinstance(m, QuantLinear))
    chosen = set_compute(net, "fp8")
    assert chosen == {"fc1": FP8, "fc2": FP8, "conv": "emulated"}  # no fp8 convolution
    with torch.no_grad():
        for name, (inp, out) in seen.items():
            # same input: only the bf16 rounding of bias and output differ (the bf16 path's floor
            # is 46 dB, tests/kernels/test_select.py); measured 55.0 / 55.2 dB
            assert sqnr_db(out, net.get_submodule(name)(inp)) > 46, name
        native = net(x)
    # end to end fc1's bf16 output moves some of fc2's FP8 activation codes (as on the bf16
    # path): no further from the emulated model than the bf16 path is (measured 38.2 vs 38.3 dB
    # and 40.9 vs 39.3 dB)
    set_compute(net, "bf16")
    with torch.no_grad():
        bf16 = net(x)
    for e, n, b in zip(emulated, native, bf16):
        assert sqnr_db(e, n) > sqnr_db(e, b) - 3
    set_compute(net, "fp8")
    assert "native fp8 (_scaled_mm)" in lowbit.format_report(lowbit.report(net))
    set_compute(net, "emulated")
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(net(x), emulated))


def test_load_accepts_the_fp8_path(tmp_path):
    net = _fp8_mlp()
    x = torch.randn(16, 32)
    path = lowbit.save(net, tmp_path / "fp8.safetensors")
    set_compute(net, "fp8")
    with torch.device("meta"):
        fresh = FP8Net()
    loaded = lowbit.load(path, fresh, compute="fp8")
    assert {m.compute_path for m in loaded.modules() if isinstance(m, QuantLinear)} == {FP8}
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(x), net(x)))  # the same kernels


def test_compiled_kernel_traces_as_one_graph():
    """The GPU benchmark compiles FP8 models: the kernel's call (both forms) has no graph break."""
    import lowbit.kernels.scaled_mm as sm

    fmt = parse("fp8_e4m3")
    g = torch.Generator().manual_seed(1)
    v_w = fmt.round(torch.randn(32, 48, generator=g) * 40)
    x = torch.randn(20, 48, generator=g)
    kern = Fp8LinearKernel(v_w, torch.rand(32, generator=g) * 0.01 + 1e-3, torch.randn(32, generator=g),
                           (fmt, 0.01, 0.0))
    traced = torch.compile(lambda t: kern(t), backend="eager", fullgraph=True)
    assert torch.equal(traced(x), kern(x))
    assert kern.rowwise == sm.rowwise_scales_supported(torch.device("cpu"))

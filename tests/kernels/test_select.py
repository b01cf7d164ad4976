"""lowbit.kernels.select: set_compute picks each layer's path from its formats and shape,
the native model computes what the emulated one does, and every way back to emulated works."""

import copy
import functools

import pytest
import torch
from conftest import bf16_params, make_unet, needs_cpu_bf16, unet_inputs
from torch import nn

import lowbit
from lowbit import LayerSpec, Plan, Rule
from lowbit.errors import CalibrationError, PlanError
from lowbit.kernels import PATHS, choose_path, onednn, set_compute
from lowbit.nn import QuantWeightLayer, sqnr_db
from lowbit.report import format_report, report

INT8 = "native int8 (oneDNN)"
INT_RECIPES = ("w8a8", "w4a8", "w4a4")

# End-to-end SQNR(native vs emulated) of the tiny UNet on unet_inputs(1, seed=2), measured on an
# AMX/AVX-512 Xeon: w8a8 132.3, w4a8 131.6, w4a4 132.3, w4a16 42.0, fp8 21.7, w4a8-fp 22.5 dB.
# Under "auto" the one layer below the minimum reduction (the 8-channel 1x1 conv_shortcut,
# reduction 8) stays emulated, so an int model runs int8 and emulated layers only: only float32
# epilogue rounding separates it from the emulated model (the same as compute="int8"). fp and
# weight-only models run bf16 layers, whose rounding flips downstream activation codes and each
# flip spreads through the rest of the network. Thresholds sit a few dB below; the native model
# must also be as close to the float model as the emulated one (test_auto_paths_and_accuracy), and
# test_each_native_layer_matches checks per-layer accuracy tightly.
E2E_SQNR_DB = {"w8a8": 128.0, "w4a8": 127.0, "w4a4": 128.0, "w4a16": 38.0, "fp8": 18.0, "w4a8-fp": 19.0}
# Without oneDNN the int recipes run bf16 instead (measured with onednn.available patched to
# False: w8a8 32.5, w4a8 32.3, w4a4 10.3 dB; uint4 codes are coarse, so w4a4 suffers most).
E2E_SQNR_DB_NO_ONEDNN = {"w8a8": 29.0, "w4a8": 29.0, "w4a4": 7.0}


def e2e_floor(recipe) -> float:
    if recipe in INT_RECIPES and not onednn.available():
        return E2E_SQNR_DB_NO_ONEDNN[recipe]
    return E2E_SQNR_DB[recipe]


def expected_auto_path(recipe, layer) -> str:
    """What "auto" must pick on CPU: tiny layers stay emulated (every format), int recipes run
    oneDNN int8 where available, everything else (fp, weight-only) bf16."""
    if reduction(layer) < 16:
        return "emulated"
    if recipe in INT_RECIPES and onednn.available():
        return INT8
    return "bf16"


# Per layer, same input (measured minimum over layers and recipes): int8 131.4 dB (float32
# epilogue only), bf16 with quantized activations 49.7 dB, bf16 weight-only 48.9 dB.
LAYER_SQNR_DB = {"int8": 120.0, "bf16": 46.0, "bf16 weight-only": 45.0}


@pytest.fixture(autouse=True)
def _eager_quant(monkeypatch):
    monkeypatch.setenv("LOWBIT_COMPILE_QUANT", "0")


@functools.cache
def _frozen(recipe) -> nn.Module:
    return lowbit.freeze(lowbit.quantize(make_unet(), recipe, unet_inputs(2, seed=1), progress=False))


def quantized(recipe) -> nn.Module:
    """A fresh copy of the frozen tiny UNet quantized with ``recipe`` (quantized once per module)."""
    return copy.deepcopy(_frozen(recipe))


X = unet_inputs(1, seed=2)[0]


@torch.no_grad()
def run(model) -> torch.Tensor:
    return model(*X).sample


def weight_layers(model) -> dict[str, QuantWeightLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantWeightLayer)}


def reduction(layer) -> int:
    return int(torch.Size(layer.weight_shape[1:]).numel())


def record_layers(model, forward) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (input, emulated output)} of every quantized weight layer during ``forward()``."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, (args[0], out)))
             for n, m in weight_layers(model).items()]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in hooks:
            h.remove()
    return seen


def check_each_layer(model, seen, chosen) -> None:
    """Same input, one layer at a time: int8 differs from the emulated layer only by float32
    rounding, bf16 by one bf16 rounding of the output (and of the input when weight-only)."""
    layers = weight_layers(model)
    assert set(seen) == set(layers)
    with torch.no_grad():
        for name, (x, emulated) in seen.items():
            native = layers[name](x)
            path = chosen[name]
            if path == INT8:
                floor = LAYER_SQNR_DB["int8"]
            elif layers[name].input_quant.enabled:
                floor = LAYER_SQNR_DB["bf16"]
            else:
                floor = LAYER_SQNR_DB["bf16 weight-only"]
            assert native.shape == emulated.shape
            if path == "emulated":
                assert torch.equal(native, emulated), name
            else:
                assert sqnr_db(emulated, native) > floor, (name, path)


@functools.cache
def _float_output() -> torch.Tensor:
    return run(make_unet())


@pytest.mark.parametrize("recipe", bf16_params(lowbit.RECIPES))
def test_auto_paths_and_accuracy(recipe):
    model = quantized(recipe)
    emulated = run(model)
    chosen = set_compute(model, "auto")
    layers = weight_layers(model)
    assert set(chosen) == set(layers) and len(chosen) > 30
    assert chosen == {n: m.compute_path for n, m in layers.items()}
    for name, layer in layers.items():
        assert chosen[name] == expected_auto_path(recipe, layer), name
    tiny = [n for n, m in layers.items() if reduction(m) < 16]
    assert tiny and all(chosen[n] == "emulated" for n in tiny)  # the small-layer rule is exercised
    assert all(layers[n].kernel is None for n in tiny)
    assert "emulated" not in {chosen[n] for n in layers if n not in tiny}
    native = run(model)
    assert native.shape == emulated.shape and torch.isfinite(native).all()
    assert not torch.equal(native, emulated)  # the kernels really ran
    assert sqnr_db(emulated, native) > e2e_floor(recipe)
    # native noise differs from emulated noise, but is no larger (measured: int recipes identical
    # to 0.01 dB, bf16 ones within 0.8 dB)
    assert sqnr_db(_float_output(), native) > sqnr_db(_float_output(), emulated) - 3.0

    back = set_compute(model, "emulated")
    assert set(back.values()) == {"emulated"}
    assert all(m.kernel is None for m in layers.values())
    assert torch.equal(run(model), emulated)


@pytest.mark.parametrize("recipe", list(lowbit.RECIPES))
def test_each_native_layer_matches_the_emulated_layer(recipe):
    model = quantized(recipe)
    seen = record_layers(model, lambda: run(model))
    check_each_layer(model, seen, set_compute(model, "auto"))


@pytest.mark.parametrize("recipe", INT_RECIPES)
def test_int8_path_forced_keeps_small_layers_emulated(recipe):
    model = quantized(recipe)
    emulated = run(model)
    chosen = set_compute(model, "int8")
    layers = weight_layers(model)
    for name, layer in layers.items():
        expect = INT8 if reduction(layer) >= 16 and onednn.available() else "emulated"
        assert chosen[name] == expect, name
    # no bf16 layer: only float32 epilogue rounding separates native from emulated (measured
    # w8a8 132.3, w4a8 131.6, w4a4 132.3 dB: with oneDNN, "auto" picks exactly these paths)
    assert sqnr_db(emulated, run(model)) > E2E_SQNR_DB[recipe]


@needs_cpu_bf16
def test_bf16_forced_on_int_and_int8_forced_on_fp():
    model = quantized("w8a8")
    emulated = run(model)
    # int8 x uint8 values are exact in bf16; a forced path also covers the tiny conv_shortcut
    # that "auto" leaves emulated
    assert set(set_compute(model, "bf16").values()) == {"bf16"}
    assert any(reduction(m) < 16 for m in weight_layers(model).values())
    assert sqnr_db(emulated, run(model)) > 29.0  # measured 32.7 dB: bf16 rounding flips activation codes
    fp = quantized("fp8")
    before = run(fp)
    assert set(set_compute(fp, "int8").values()) == {"emulated"}
    assert torch.equal(run(fp), before)


def test_simulated_model_gets_the_same_kernels_as_the_frozen_one():
    sim = lowbit.quantize(make_unet(), "w4a8", unet_inputs(2, seed=1), progress=False)
    frozen = quantized("w4a8")
    assert torch.equal(run(sim), run(frozen))
    a, b = set_compute(sim, "auto"), set_compute(frozen, "auto")
    assert a == b
    assert torch.equal(run(sim), run(frozen))
    assert all(not m.stored for m in weight_layers(sim).values())  # codes were computed, not stored


def test_unknown_path_names_the_valid_ones():
    model = quantized("w8a8")
    layer = next(iter(weight_layers(model).values()))
    for call in (lambda: set_compute(model, "fast"), lambda: choose_path(layer, "fast")):
        with pytest.raises(PlanError) as e:
            call()
        assert "'fast'" in str(e.value)
        for p in PATHS:
            assert p in str(e.value)
    assert all(m.kernel is None for m in weight_layers(model).values())  # nothing half-installed


@pytest.mark.parametrize("weight,act", [("int4", "uint8"), ("int8", "uint8"), ("fp8_e4m3", "fp8_e4m3")])
def test_group_scales_stay_emulated(weight, act):
    plan = Plan.uniform(LayerSpec(weight, act, weight_granularity="group8"))
    model = lowbit.freeze(lowbit.quantize(make_unet(), plan, unet_inputs(2, seed=1), progress=False))
    assert all(m.weight_quant.granularity.kind == "group" for m in weight_layers(model).values())
    before = run(model)
    chosen = set_compute(model, "auto")
    assert chosen and set(chosen.values()) == {"emulated"}
    assert torch.equal(run(model), before)


def test_tensor_scales_and_signed_activations_run_int8():
    """Per-tensor weight scales (expanded to every channel) and int8 activations (shifted by 128)."""
    for spec in (LayerSpec("int8", "uint8", weight_granularity="tensor"), LayerSpec("int8", "int8")):
        model = lowbit.freeze(lowbit.quantize(make_unet(), Plan.uniform(spec), unet_inputs(2, seed=1),
                                              progress=False))
        emulated = run(model)
        seen = record_layers(model, lambda: run(model))
        chosen = set_compute(model, "int8")
        assert INT8 in chosen.values() or not onednn.available()
        check_each_layer(model, seen, chosen)  # the kernel itself: float32 epilogue rounding only
        # End to end, one activation that float32 rounding puts on the other side of a rounding
        # boundary flips one code, and the flip spreads downstream. Measured 132.5 (tensor) and
        # 132.4 (int8 act) dB on an AMX Xeon, where nothing flipped; 47.0 dB (tensor) on a Zen 4
        # EPYC, where one code of up_blocks.1.resnets.0.conv1's input flipped. Quantization
        # error itself is ~30 dB, so 40 dB still catches any systematic mismatch.
        assert sqnr_db(emulated, run(model)) > 40, spec


def _conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"), nn.SiLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=4, padding_mode="replicate"), nn.SiLU(),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2, padding_mode="circular"), nn.SiLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.SiLU(),  # depthwise, zero padding
        nn.Flatten(), nn.Linear(16 * 5 * 5, 24),
    ).eval()


_CONV_X = torch.randn(2, 8, 10, 10, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("recipe", bf16_params(["w8a8", "w4a4", "fp8", "w4a16"]))
def test_padding_modes_strides_and_groups(recipe):
    """reflect/replicate/circular padding (padded before the kernel), stride 2, groups, depthwise."""
    model = lowbit.quantize(_conv_net(), recipe, [_CONV_X], progress=False)
    with torch.no_grad():
        emulated = model(_CONV_X)
    seen = record_layers(model, lambda: model(_CONV_X))
    chosen = set_compute(model, "auto")
    layers = weight_layers(model)
    for name, layer in layers.items():
        assert chosen[name] == expected_auto_path(recipe, layer), name
    assert [reduction(m) < 16 for m in layers.values()] == [False, False, False, True, False]  # depthwise: 9
    check_each_layer(model, seen, chosen)
    with torch.no_grad():
        native = model(_CONV_X)
    # measured: w8a8 137.7, w4a4 139.0 (int8 + the emulated depthwise conv: float32 rounding only),
    # fp8 38.9, w4a16 51.8 dB (bf16, see E2E_SQNR_DB); without oneDNN w8a8 46.3, w4a4 30.3 dB
    if recipe in INT_RECIPES and not onednn.available():
        floor = {"w8a8": 42, "w4a4": 27}[recipe]
    else:
        # int floors: float32 rounding only, which differs between CPUs' kernels (w4a4 134.5 dB
        # on a Zen 4 EPYC)
        floor = {"w8a8": 128, "w4a4": 128, "fp8": 35, "w4a16": 48}[recipe]
    assert sqnr_db(emulated, native) > floor


@pytest.mark.parametrize("recipe", bf16_params(["w8a8", "fp8", "w4a16"]))
def test_string_padding_same_and_valid_run_natively(recipe):
    """padding="same" with an odd kernel pads symmetrically and padding="valid" not at all: both
    run natively and compute what the emulated layers do."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding="same"), nn.SiLU(), nn.Conv2d(16, 8, 3, padding="valid"))
    x = torch.randn(2, 8, 10, 10)
    lowbit.quantize(model, recipe, [x], progress=False)
    with torch.no_grad():
        emulated = model(x)
    seen = record_layers(model, lambda: model(x))
    chosen = set_compute(model, "auto")
    layers = weight_layers(model)
    assert [layers[n].padding for n in layers] == ["same", "valid"]
    for name, layer in layers.items():
        assert reduction(layer) >= 16
        assert chosen[name] == expected_auto_path(recipe, layer) != "emulated", name
        assert layer.kernel is not None, name
    check_each_layer(model, seen, chosen)
    with torch.no_grad():
        native = model(x)
    assert native.shape == emulated.shape == (2, 8, 8, 8)
    assert not torch.equal(native, emulated)  # the kernels really ran
    # measured: w8a8 133.8 (int8; 43.3 as bf16 without oneDNN), fp8 38.5, w4a16 47.5 dB
    if recipe in INT_RECIPES and not onednn.available():
        floor = 39
    else:
        floor = {"w8a8": 129, "fp8": 34, "w4a16": 43}[recipe]
    assert sqnr_db(emulated, native) > floor


@pytest.mark.parametrize("recipe", bf16_params(["w8a8", "fp8"]))
def test_asymmetric_same_padding_stays_emulated(recipe):
    """padding="same" with an even effective kernel pads one more row/column at the end than at
    the start, which the kernels' symmetric padding cannot express: such a conv stays emulated on
    every path, while an odd "same" conv beside it (dilated: 2·(3−1) = 4) runs natively."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 2, padding="same"), nn.SiLU(),
                          nn.Conv2d(16, 8, (3, 2), padding="same"), nn.SiLU(),
                          nn.Conv2d(8, 8, 3, padding="same", dilation=2))
    x = torch.randn(2, 8, 10, 10)
    lowbit.quantize(model, recipe, [x], progress=False)
    with torch.no_grad():
        emulated = model(x)
    seen = record_layers(model, lambda: model(x))
    layers = weight_layers(model)
    even, odd = ["0", "2"], "4"
    assert all(reduction(m) >= 16 for m in layers.values())  # not the small-layer rule
    for path in ("int8", "bf16", "auto"):
        chosen = set_compute(model, path)
        for name in even:
            assert chosen[name] == "emulated" and layers[name].kernel is None, (path, name)
    assert chosen[odd] == expected_auto_path(recipe, layers[odd]) != "emulated"
    check_each_layer(model, seen, chosen)  # the even convs bit for bit, the odd one within its floor
    with torch.no_grad():
        native = model(x)
    assert native.shape == emulated.shape == x.shape
    assert not torch.equal(native, emulated)
    set_compute(model, "emulated")
    with torch.no_grad():
        assert torch.equal(model(x), emulated)


def test_report_rows_show_the_compute_path():
    model = quantized("w8a8")
    rows = {r.name: r for r in report(model)}
    layers = weight_layers(model)
    assert all(rows[n].path == "emulated" for n in layers)
    chosen = set_compute(model, "auto")
    rows = {r.name: r for r in report(model)}
    for name in layers:
        assert rows[name].path == chosen[name]
    assert {rows[n].path for n in layers} == set(chosen.values()) and INT8 in chosen.values()
    assert INT8 in format_report(list(rows.values()))


def test_calibrate_drops_kernels_and_observes_again():
    model = quantized("w8a8")
    emulated = run(model)
    set_compute(model, "auto")
    layers = weight_layers(model)
    old = {n: m.input_quant.scale.item() for n, m in layers.items()}
    # other data: every layer's observer must see it (a kernel would bypass the input quantizer)
    lowbit.calibrate(model, unet_inputs(2, seed=7), progress=False)
    assert all(m.kernel is None and m.compute_path == "emulated" for m in layers.values())
    changed = [n for n, m in layers.items() if m.input_quant.scale.item() != old[n]]
    assert len(changed) >= 0.9 * len(layers)
    # the original calibration data gives the original model back, bit for bit
    lowbit.calibrate(model, unet_inputs(2, seed=1), progress=False)
    assert torch.equal(run(model), emulated)


def test_release_codes_only_on_native_layers_and_calibrate_refuses():
    plan = Plan([Rule(r"down_blocks\.0\..*", LayerSpec("int8", "uint8", weight_granularity="group8"),
                      ("Linear", "Conv2d")),
                 Rule(lowbit.DEFAULT_EXCLUDE, None), Rule(".*", LayerSpec("int8", "uint8"), ("Linear", "Conv2d"))])
    model = lowbit.freeze(lowbit.quantize(make_unet(), plan, unet_inputs(2, seed=1), progress=False))
    layers = weight_layers(model)
    with pytest.raises(PlanError, match="set_compute"):
        next(iter(layers.values())).release_codes()  # no kernel yet
    chosen = set_compute(model, "auto")
    before = run(model)
    set_compute(model, "auto", release_codes=True)
    assert torch.equal(run(model), before)  # the kernels hold their own copy of the weights
    for name, layer in layers.items():
        native = chosen[name] != "emulated"
        assert layer.codes_released == native, name
        assert ("weight_codes" in layer._buffers) == (not native), name
    assert "emulated" in chosen.values() and INT8 in chosen.values()
    with pytest.raises(CalibrationError, match="released"):
        lowbit.calibrate(model, unet_inputs(1, seed=1), progress=False)
    assert torch.equal(run(model), before)  # the refused calibration left the kernels in place
    with pytest.raises(PlanError, match="released its codes"):
        set_compute(model, "auto")  # kernels cannot be rebuilt without codes
    assert torch.equal(run(model), before)  # refused before touching any layer


def test_emulated_on_released_codes_refuses_or_keeps_the_model_running():
    model = quantized("w8a8")
    set_compute(model, "auto", release_codes=True)
    before = run(model)
    with pytest.raises(PlanError, match="released its codes"):
        set_compute(model, "emulated")
    assert torch.equal(run(model), before)  # refused before touching any layer


# measured SQNR(bf16 model vs float32 emulated): w8a8 31.3, fp8 21.4, w4a16 39.0 dB (the bf16
# rounding of the activations between the layers dominates, even for the int8 model)
@pytest.mark.parametrize("recipe,floor", bf16_params([("w8a8", 27.0), ("fp8", 18.0), ("w4a16", 35.0)]))
def test_bf16_model_dtype(recipe, floor):
    """dtype=torch.bfloat16: kernels write bf16 and the float layers between them run in bf16."""
    model = quantized(recipe)
    emulated = run(model)
    chosen = set_compute(model, "auto", dtype=torch.bfloat16)
    layers = weight_layers(model)
    assert chosen == {n: expected_auto_path(recipe, m) for n, m in layers.items()}
    # the tiny conv_shortcut and the 8-input time_embedding.linear_1 (every recipe quantizes it)
    assert list(chosen.values()).count("emulated") == 2
    for n, m in weight_layers(model).items():
        assert m.weight_quant.scale.dtype == torch.float32 and m.input_quant.scale.dtype == torch.float32, n
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters()
               if "weight_quant" not in n and "input_quant" not in n and "processor" not in n)
    with torch.no_grad():
        y = model(X[0].to(torch.bfloat16), X[1]).sample
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert sqnr_db(emulated, y.float()) > floor


def test_bad_compute_dtype_is_refused():
    with pytest.raises(PlanError, match="dtype"):
        set_compute(quantized("w8a8"), "auto", dtype=torch.float16)


def test_without_cpu_bf16_fp_layers_stay_emulated(monkeypatch):
    """On a CPU whose oneDNN has no bf16 kernels (AVX2 only) PyTorch's bf16 convolution is 60×
    slower than fp32: fp layers stay emulated under "auto" and a forced "bf16" alike."""
    monkeypatch.setattr("lowbit.kernels.select.cpu_bf16_available", lambda: False)
    fp = quantized("fp8")
    before = run(fp)
    assert set(set_compute(fp, "auto").values()) == {"emulated"}
    assert set(set_compute(fp, "bf16").values()) == {"emulated"}
    assert torch.equal(run(fp), before)


def test_bf16_activations_warn_on_a_cpu_without_bf16_kernels(monkeypatch):
    monkeypatch.setattr("lowbit.kernels.select.cpu_bf16_available", lambda: False)
    with pytest.warns(UserWarning, match="no bf16 kernels.*dtype=torch.float32"):
        set_compute(quantized("w8a8"), "auto", dtype=torch.bfloat16)

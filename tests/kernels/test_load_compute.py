"""lowbit.load(..., compute=...): a checkpoint loads straight onto native kernels, keeps only the
kernels' copy of the weights, and refuses to be saved again."""

import functools

import pytest
import torch
from conftest import bf16_params, make_unet, needs_cpu_bf16, unet_inputs

import lowbit
from lowbit import load, save
from lowbit.errors import CheckpointError
from lowbit.kernels import onednn, set_compute
from lowbit.nn import QuantWeightLayer, sqnr_db
from lowbit.report import report

INT8 = "native int8 (oneDNN)"
# SQNR(load with compute="auto" vs compute="emulated") on unet_inputs(1, seed=2), measured on an
# AMX/AVX-512 Xeon: w8a8 132.3, w4a8 131.6 dB (int8 layers and the tiny conv_shortcut emulated:
# float32 epilogue rounding only), fp8 21.7 dB (chaotic: bf16 rounding flips downstream activation
# codes, see test_select.py); thresholds a few dB below. Without oneDNN the int recipes run bf16
# (32.5, 32.3 dB). Forced paths on the w8a8 checkpoint: compute="bf16" 32.7 dB, compute="int8" 132.3 dB.
LOAD_SQNR_DB = {"w8a8": 128.0, "w4a8": 127.0, "fp8": 18.0}
LOAD_SQNR_DB_NO_ONEDNN = {"w8a8": 29.0, "w4a8": 29.0}
FORCED_BF16_SQNR_DB = 29.0
FORCED_INT8_SQNR_DB = 128.0


@pytest.fixture(autouse=True)
def _eager_quant(monkeypatch):
    monkeypatch.setenv("LOWBIT_COMPILE_QUANT", "0")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """recipe -> path of a saved tiny-UNet checkpoint (saved once per module)."""
    root = tmp_path_factory.mktemp("ckpt")

    @functools.cache
    def get(recipe):
        model = lowbit.quantize(make_unet(), recipe, unet_inputs(2, seed=1), progress=False)
        return save(model, root / f"{recipe}.safetensors")

    return get


X = unet_inputs(1, seed=2)[0]


@torch.no_grad()
def run(model) -> torch.Tensor:
    return model(*X).sample


def weight_layers(model) -> dict[str, QuantWeightLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantWeightLayer)}


@pytest.mark.parametrize("recipe", bf16_params(["w8a8", "w4a8", "fp8"]))
def test_default_load_runs_native_kernels_without_codes(checkpoints, recipe):
    path = checkpoints(recipe)
    emulated = load(path, make_unet(device="meta"), compute="emulated")
    native = load(path, make_unet(device="meta"))  # compute="auto" by default
    assert not native.training
    ref = run(emulated)
    out = run(native)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # kernels ran
    floor = LOAD_SQNR_DB[recipe] if recipe == "fp8" or onednn.available() else LOAD_SQNR_DB_NO_ONEDNN[recipe]
    assert sqnr_db(ref, out) > floor

    # exactly the kernels set_compute builds from the emulated load's codes
    chosen = set_compute(emulated, "auto")
    assert torch.equal(run(emulated), out)

    layers = weight_layers(native)
    assert {n: m.compute_path for n, m in layers.items()} == chosen
    native_path = INT8 if recipe != "fp8" and onednn.available() else "bf16"
    tiny = {n for n, m in layers.items() if torch.Size(m.weight_shape[1:]).numel() < 16}
    # the 8-channel 1x1 conv_shortcut, and the 8-input time_embedding.linear_1 (every recipe
    # quantizes the time embedding)
    assert tiny == {"down_blocks.1.resnets.0.conv_shortcut", "time_embedding.linear_1"}
    assert chosen == {n: "emulated" if n in tiny else native_path for n in layers}
    for name, layer in layers.items():
        if name in tiny:  # stays emulated and keeps its codes
            assert layer.kernel is None and not layer.codes_released and layer.stored, name
            assert "weight_codes" in layer._buffers, name
        else:
            assert layer.kernel is not None, name
            assert layer.codes_released, name
            assert "weight_codes" not in layer._buffers and not hasattr(layer, "weight"), name
    for t in list(native.parameters()) + list(native.buffers()):
        assert t.device.type == "cpu"  # nothing left on meta
    rows = {r.name: r.path for r in report(native)}
    assert all(rows[n] == layers[n].compute_path for n in layers)


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8"])
def test_native_load_cannot_be_saved(checkpoints, tmp_path, recipe):
    native = load(checkpoints(recipe), make_unet(device="meta"))
    with pytest.raises(CheckpointError) as e:
        save(native, tmp_path / "again.safetensors")
    assert "compute='emulated'" in str(e.value)
    assert not (tmp_path / "again.safetensors").exists()
    # the way out the message names: an emulated load saves (and reloads) bit for bit
    emulated = load(checkpoints(recipe), make_unet(device="meta"), compute="emulated")
    again = load(save(emulated, tmp_path / "again.safetensors"), make_unet(device="meta"), compute="emulated")
    assert torch.equal(run(again), run(emulated))


@needs_cpu_bf16
def test_forced_paths_on_load(checkpoints):
    path = checkpoints("w8a8")
    ref = run(load(path, make_unet(device="meta"), compute="emulated"))
    as_bf16 = load(path, make_unet(device="meta"), compute="bf16")
    assert {m.compute_path for m in weight_layers(as_bf16).values()} == {"bf16"}  # the tiny layer too
    assert sqnr_db(ref, run(as_bf16)) > FORCED_BF16_SQNR_DB
    as_int8 = load(path, make_unet(device="meta"), compute="int8")
    layers = weight_layers(as_int8)
    emulated = [m for m in layers.values() if m.compute_path == "emulated"]
    assert emulated and all(not m.codes_released and m.stored for m in emulated)  # kept their codes
    assert all(m.codes_released for m in layers.values() if m.compute_path != "emulated")
    if onednn.available():
        assert sqnr_db(ref, run(as_int8)) > FORCED_INT8_SQNR_DB  # no bf16 layer: float32 epilogue rounding only


@pytest.mark.parametrize("bad", ["bogus", "native", "", "AUTO"])
def test_unknown_compute_is_refused(checkpoints, bad):
    with pytest.raises(CheckpointError) as e:
        load(checkpoints("w8a8"), make_unet(device="meta"), compute=bad)
    for p in ("auto", "int8", "bf16", "emulated"):
        assert p in str(e.value)


@pytest.mark.parametrize("recipe", ["w8a8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_model_traces_as_one_graph(checkpoints, recipe, dtype):
    """torch.compile sees the whole native model as one graph: every kernel call, activation
    quantizer and format constant is traceable (a graph break splits the model and costs the
    fusions that make compiled W8A8 fast; a cached format property once broke every FP layer).
    Attention split into blocks (lowbit._attention) traces as one graph too."""
    from lowbit.nn import QuantAttnProcessor

    with torch.device("meta"):
        model = make_unet(device="meta")
    model = load(checkpoints(recipe), model, dtype=dtype)
    x, t = X
    procs = [m for m in model.modules() if isinstance(m, QuantAttnProcessor)]
    assert procs
    for block_elements in (None, 100):  # the default (one block here); 100: a block per head
        for p in procs:
            p.block_elements = block_elements or QuantAttnProcessor.block_elements
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x.to(dtype), t)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


@pytest.mark.parametrize("bad", ["bogus", "tpu", 3.5])
def test_unknown_device_is_refused(checkpoints, bad):
    with pytest.raises(CheckpointError, match="device"):
        load(checkpoints("w8a8"), make_unet(device="meta"), device=bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_says_so(checkpoints):
    with pytest.raises(CheckpointError, match="no CUDA GPU.*device='cpu'"):
        load(checkpoints("w8a8"), make_unet(device="meta"), device="cuda")


def test_device_cpu_is_the_default_load(checkpoints):
    a = run(load(checkpoints("w8a8"), make_unet(device="meta")))
    b = run(load(checkpoints("w8a8"), make_unet(device="meta"), device="cpu"))
    assert torch.equal(a, b)

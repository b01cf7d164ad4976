"""Packed checkpoints: bit-identical round trip, real size reduction, and damaged-file errors."""

import json
import os
import struct

import pytest
import safetensors.torch
import torch
from torch import nn

import lowbit
from lowbit import LayerSpec, Plan, freeze, load, quantize, save
from lowbit.errors import CheckpointError
from lowbit.nn import QuantWeightLayer, quant_layers

from conftest import make_unet, unet_inputs


@pytest.mark.parametrize("recipe", list(lowbit.RECIPES))
def test_round_trip_is_bit_identical_for_every_recipe(tmp_path, recipe):
    model = quantize(make_unet(), recipe, unet_inputs(2, seed=1), progress=False)
    x = unet_inputs(1, seed=2)[0]
    with torch.no_grad():
        before = model(*x).sample
    path = save(model, tmp_path / "q.safetensors")
    loaded = load(path, make_unet(device="meta"), compute="emulated")
    with torch.no_grad():
        after = loaded(*x).sample
    assert torch.equal(before, after)
    for t in list(loaded.parameters()) + list(loaded.buffers()):
        assert t.device.type == "cpu"  # everything assigned, nothing left on meta
    for _, layer in quant_layers(loaded):
        if isinstance(layer, QuantWeightLayer) and layer.weight_quant.enabled:
            assert layer.stored and not hasattr(layer, "weight")  # codes only, no fp32 weight


def test_frozen_model_saves_the_same_codes(tmp_path):
    a = quantize(make_unet(), "w4a8", unet_inputs(2), progress=False)
    save(a, tmp_path / "sim.safetensors")
    save(freeze(a), tmp_path / "frozen.safetensors")
    ta = safetensors.torch.load_file(tmp_path / "sim.safetensors")
    tb = safetensors.torch.load_file(tmp_path / "frozen.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


class Wide(nn.Module):
    """≈1.2M parameters of Linear and Conv2d layers."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(64, 256, 3, padding=1)
        self.c2 = nn.Conv2d(256, 256, 3, padding=1)
        self.fc = nn.Linear(256, 1024)

    def forward(self, x):
        return self.fc(self.c2(self.c1(x)).mean((2, 3)))


@pytest.mark.parametrize("fmt, limit", [("int4", 0.135), ("int8", 0.26), ("int3", 0.105), ("fp4_e2m1", 0.135)])
def test_checkpoint_bytes_match_the_bit_width(tmp_path, fmt, limit):
    torch.manual_seed(0)
    model = Wide()
    fp32 = tmp_path / "fp32.safetensors"
    safetensors.torch.save_file(model.state_dict(), fp32)
    save(quantize(model, Plan.uniform(LayerSpec(fmt))), tmp_path / "q.safetensors")
    ratio = os.path.getsize(tmp_path / "q.safetensors") / os.path.getsize(fp32)
    bits = lowbit.parse(fmt).bits
    assert bits / 32 < ratio <= limit  # packed codes + per-channel scales + fp32 biases + metadata


@pytest.mark.parametrize("weight", ["int4", "fp8_e4m3", "uint4"])
def test_symmetric_weights_store_no_zero_points(tmp_path, weight):
    """Symmetric weights' zero-points are all 0 and not written; asymmetric ones are; both load
    back to the same outputs."""
    model = quantize(make_unet(), Plan.uniform(LayerSpec(weight, "uint8")), unet_inputs(2, seed=1), progress=False)
    x = unet_inputs(1, seed=2)[0]
    with torch.no_grad():
        before = model(*x).sample
    path = save(model, tmp_path / "q.safetensors")
    keys = safetensors.torch.load_file(path).keys()
    weight_layers = [n for n, m in quant_layers(model) if isinstance(m, QuantWeightLayer)]
    stored_zeros = [n for n in weight_layers if f"{n}.weight_quant.zero" in keys]
    assert weight_layers and stored_zeros == ([] if lowbit.parse(weight).symmetric else weight_layers)
    assert all(f"{n}.input_quant.zero" in keys for n in weight_layers)  # activations keep theirs
    loaded = load(path, make_unet(device="meta"), compute="emulated")
    with torch.no_grad():
        assert torch.equal(loaded(*x).sample, before)
    for n, m in quant_layers(loaded):
        if isinstance(m, QuantWeightLayer):
            assert torch.equal(m.weight_quant.zero, dict(quant_layers(model))[n].weight_quant.zero)


def _saved(tmp_path):
    model = quantize(make_unet(), "w4a8", unet_inputs(2), progress=False)
    return save(model, tmp_path / "q.safetensors")


def _header(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return data, n, json.loads(data[8:8 + n])


def test_truncated_file(tmp_path):
    path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load(path, make_unet())


def test_tampered_metadata_same_length(tmp_path):
    path = _saved(tmp_path)
    data, n, _ = _header(path)
    header = data[8:8 + n].replace(b'\\"bits\\": 4', b'\\"bits\\": 8', 1)
    assert header != data[8:8 + n]
    path.write_bytes(data[:8] + header + data[8 + n:])
    with pytest.raises(CheckpointError, match="modified or corrupted"):
        load(path, make_unet())


def test_tampered_tensor_bytes(tmp_path):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="modified or corrupted"):
        load(path, make_unet())


def test_plain_safetensors_and_missing_file(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(make_unet().state_dict(), plain)
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        load(plain, make_unet())
    with pytest.raises(CheckpointError, match="lowbit checkpoint not found at"):
        load(tmp_path / "nope.safetensors", make_unet())
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        load(tmp_path / "junk.safetensors", make_unet())


def test_wrong_architecture(tmp_path):
    from diffusers import UNet2DModel

    from conftest import TINY_UNET

    path = _saved(tmp_path)
    other = UNet2DModel(**{**TINY_UNET, "block_out_channels": (8, 24)})
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load(path, other)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load(path, nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(CheckpointError, match="float model"):
        load(path, load(path, make_unet()))


def test_save_is_atomic(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    before = path.read_bytes()

    def crash(*a, **k):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save(quantize(make_unet(seed=3), "w8a8", unet_inputs(1), progress=False), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.safetensors"]  # no temp file left behind


def test_save_refuses_an_unquantized_model(tmp_path):
    with pytest.raises(CheckpointError, match="no quantized layers"):
        save(make_unet(), tmp_path / "x.safetensors")


class _WithBuffer(nn.Module):
    """A Linear plus a non-persistent buffer computed in __init__ (as DiT's positional table)."""

    def __init__(self, extra: bool = False, table: bool = True):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        if table:
            self.register_buffer("table", torch.linspace(-1, 1, 8).sin(), persistent=False)
        if extra:
            self.register_buffer("other", torch.ones(8), persistent=False)

    def forward(self, x):
        return self.fc(x) + getattr(self, "table", 0) + getattr(self, "other", 0)


def test_non_persistent_buffers_are_stored_so_meta_built_models_load(tmp_path):
    torch.manual_seed(0)
    path = save(quantize(_WithBuffer(), "w4a16"), tmp_path / "b.safetensors")
    with torch.device("meta"):
        meta_model = _WithBuffer()
    q = load(path, meta_model)
    assert torch.equal(q.table, _WithBuffer().table)
    x = torch.randn(2, 8)
    assert torch.equal(q(x), load(path, _WithBuffer())(x))  # the same as a CPU-built model


def test_buffers_the_checkpoint_lacks_or_the_model_lacks_get_clear_errors(tmp_path):
    torch.manual_seed(0)
    path = save(quantize(_WithBuffer(), "w4a16"), tmp_path / "b.safetensors")
    with torch.device("meta"):
        newer = _WithBuffer(extra=True)  # a buffer the checkpoint never saw
    with pytest.raises(CheckpointError, match="'other' is still on the meta device"):
        load(path, newer)
    with pytest.raises(CheckpointError, match="non-persistent buffer 'table' does not fit this model"):
        load(path, _WithBuffer(table=False))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")
@pytest.mark.parametrize("compute", ["auto", "emulated"])
def test_loaded_model_does_not_keep_the_file_mapped(tmp_path, compute):
    # safetensors tensors are views of an mmap of the file: any one kept in the model would keep
    # every page of the checkpoint resident for as long as the model lives
    path = _saved(tmp_path)
    model = load(path, make_unet(device="meta"), compute=compute)
    with open("/proc/self/maps") as f:
        mapped = [ln for ln in f if str(path) in ln]
    assert model is not None and mapped == []

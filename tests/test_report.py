"""The report's byte counts are exactly what the checkpoint stores, layer by layer."""

import safetensors.torch
import torch

from lowbit import format_report, quantize, report, report_checkpoint, save
from lowbit.nn import sqnr_db

from conftest import make_unet, unet_inputs


def test_stored_bytes_equal_checkpoint_tensor_bytes(tmp_path):
    model = quantize(make_unet(), "w4a8", unet_inputs(2), progress=False)
    path = save(model, tmp_path / "q.safetensors")
    tensors = safetensors.torch.load_file(path)
    rows = report_checkpoint(path)
    for r in rows[:-1]:
        prefix = r.name + (".processor." if r.type == "attn-matmul" else ".")
        actual = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(prefix))
        assert r.stored_bytes == actual, r.name
    assert sum(r.stored_bytes for r in rows) == sum(t.numel() * t.element_size() for t in tensors.values())
    # the live model's report agrees with the checkpoint's
    live = report(model)
    assert [(r.name, r.stored_bytes, r.weight, r.act) for r in live[:-1]] == \
           [(r.name, r.stored_bytes, r.weight, r.act) for r in rows[:-1]]


def test_report_sqnr_is_the_weight_sqnr():
    model = quantize(make_unet(), "w4a16", progress=False)
    row = next(r for r in report(model) if r.name == "down_blocks.0.resnets.0.conv1")
    layer = model.get_submodule("down_blocks.0.resnets.0.conv1")
    with torch.no_grad():
        assert row.sqnr_db == sqnr_db(layer.weight, layer.qweight())
    assert 15 < row.sqnr_db < 30  # INT4 per-channel on a random init
    text = format_report(report(model))
    assert "int4/channel" in text and "emulated" in text and "quantized layers" in text

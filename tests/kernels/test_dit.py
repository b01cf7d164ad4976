"""Native kernels on a transformer diffusion model: a tiny diffusers DiT (class-conditional,
patch embedding with a non-persistent positional table, AdaLN-Zero blocks) quantizes (its
class-label tables too), saves, loads onto the meta device and runs its Linears on oneDNN's int8
kernels, matching the emulated (simulated) model."""

import pytest
import torch

import lowbit
from lowbit.kernels import onednn

diffusers = pytest.importorskip("diffusers")


def _dit() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                                           sample_size=8, patch_size=2, norm_num_groups=4).eval()


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.randint(0, 1000, (2,), generator=g),
            torch.randint(0, 1000, (2,), generator=g))


def _sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (x - ref).pow(2).mean()))


@pytest.mark.skipif(not onednn.available(), reason="no oneDNN int8 kernels on this CPU/PyTorch build")
def test_dit_w8a8_loads_on_meta_and_runs_native_int8(tmp_path):
    calib = [_inputs(s) for s in range(3)]
    path = lowbit.save(lowbit.quantize(_dit(), "w8a8", calib, progress=False), tmp_path / "dit.safetensors")
    with torch.device("meta"):
        fresh, fresh2 = _dit(), _dit()
    native = lowbit.load(path, fresh)  # pos_embed's table comes from the checkpoint
    emulated = lowbit.load(path, fresh2, compute="emulated")
    assert torch.equal(native.pos_embed.pos_embed, _dit().pos_embed.pos_embed)
    rows = lowbit.report(native)
    paths = [r.path for r in rows]
    assert paths.count("native int8 (oneDNN)") >= 8, paths  # every block's attention and MLP Linears
    tables = [r for r in rows if r.type == "Embedding"]  # each block's class-label table, at 8 bits
    assert len(tables) == 2 and all(r.weight.startswith("int8") and r.stored_bytes < r.fp32_bytes / 3.5 for r in tables)
    with torch.no_grad():
        x = _inputs(99)
        ref = _dit()(*x).sample
        a, b = native(*x).sample, emulated(*x).sample
    assert _sqnr(b, a) > 40  # native = emulated but for float rounding
    assert _sqnr(ref, a) > 20  # and both near the float model

"""The evaluate verb and the demo end to end on the bundled model, at a tiny sample count."""

import json

import pytest
import torch

from lowbit.errors import EvaluationError
from lowbit.evaluate.protocol import get_protocol
from lowbit.evaluate.run import evaluate, split_half_fid
from lowbit.zoo.fmnist_unet import FMNIST_SCHEDULER_CONFIG, load_fmnist_unet

TINY = get_protocol("quick").with_(num_samples=12, steps=2, batch_size=6, grid_samples=4)


@pytest.fixture(scope="module")
def fp():
    return load_fmnist_unet()


def test_evaluating_twice_gives_identical_numbers_with_or_without_warm_up(fp):
    from lowbit import quantize

    q = quantize(load_fmnist_unet(), "w8a8", [(torch.randn(6, 1, 28, 28), torch.randint(0, 1000, (6,)))], progress=False)
    a = evaluate({"fp32": fp, "w8a8": q}, FMNIST_SCHEDULER_CONFIG, TINY, progress=False)
    b = evaluate({"fp32": fp, "w8a8": q}, FMNIST_SCHEDULER_CONFIG, TINY, progress=False, warmup=False)
    assert all(m["warmup_seconds"] > 0 for m in a["models"].values())
    assert not any("warmup_seconds" in m for m in b["models"].values())
    strip = lambda r: {n: {k: v for k, v in m.items() if "seconds" not in k and k != "images_per_s"}  # noqa: E731
                       for n, m in r["models"].items()}
    assert strip(a) == strip(b)
    m = a["models"]["w8a8"]
    assert 0 <= m["ssim"] <= 1 and m["psnr"] > 10 and m["fid_to_fp"] >= 0
    assert abs(sum(a["models"]["fp32"]["class_hist"]) - 1) < 1e-3
    assert "fid_to_fp" not in a["models"]["fp32"] and a["noise_floor"]["test_split_half_fid"] > 0
    assert "not Inception" in a["feature_space"]
    assert a["_grid"]["w8a8"].shape == (4, 1, 28, 28)


def test_fp_model_against_itself_is_exact(fp):
    r = evaluate({"fp32": fp, "again": fp}, FMNIST_SCHEDULER_CONFIG, TINY, progress=False)
    m = r["models"]["again"]
    assert m["fid_to_fp"] < 1e-6 and m["ssim"] == pytest.approx(1.0) and m["psnr"] >= 99


def test_split_half_floor_shrinks_with_sample_count():
    from lowbit.evaluate.features import load_reference

    feats = load_reference()["features"]
    assert split_half_fid(feats, 5000) < split_half_fid(feats, 500)


def test_evaluate_bad_input(fp):
    with pytest.raises(EvaluationError, match="no models"):
        evaluate({}, FMNIST_SCHEDULER_CONFIG, TINY)
    with pytest.raises(EvaluationError, match="FP reference"):
        evaluate({"a": fp}, FMNIST_SCHEDULER_CONFIG, TINY, fp_name="b")
    with pytest.raises(EvaluationError, match="unknown protocol"):
        evaluate({"a": fp}, FMNIST_SCHEDULER_CONFIG, "medium")


def test_demo_end_to_end_writes_every_artifact(tmp_path, capsys):
    from lowbit.demo import run_demo

    # eager: compiling would add a minute on an empty inductor cache (the compiled sampling path is
    # tested in test_runner.py); bf16 activations, the demo's default
    res = run_demo(tmp_path, recipes=("w8a8",), num_samples=8, steps=2, calib_samples=4, progress=False,
                   compile=False)
    for f in ("results.json", "results.md", "grid.png", "bars.png", "report-w8a8.txt", "fmnist-unet-w8a8.safetensors"):
        assert (tmp_path / f).is_file(), f
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"]["w8a8"]["bytes"] < 0.35 * saved["models"]["fp32"]["bytes"]
    assert set(res["models"]) == {"fp32", "w8a8"}
    out = capsys.readouterr().out
    assert "| w8a8 |" in out and "FID*" in out and "speed × FP" in out
    run = saved["models"]["w8a8"]["run"]
    assert run.startswith("native int8 (oneDNN) ") and run.endswith("; bf16 between layers; eager"), run
    assert f"w8a8: {run}" in out and "fp32: float32 eager" in out
    assert "fp32 " in out.split("warm-up step per model")[1]  # the warm-up seconds are listed
    hint = f"lowbit evaluate {tmp_path / 'fmnist-unet-w8a8.safetensors'} --compute emulated"
    assert hint in out  # the printed command names the checkpoint the demo wrote


def test_demo_rejects_an_unknown_activation_dtype(tmp_path):
    from lowbit.demo import run_demo

    with pytest.raises(EvaluationError, match="unknown activation dtype 'fp16'"):
        run_demo(tmp_path, recipes=("w8a8",), num_samples=8, steps=2, calib_samples=4, progress=False, dtype="fp16")


def test_seed_spread_combines_single_seed_feature_files(tmp_path):
    from lowbit.evaluate import metrics as M
    from lowbit.evaluate.protocol import get_protocol
    from lowbit.evaluate.run import _save_features, seed_spread

    proto = get_protocol("quick").with_(num_samples=300)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 128, generator=g), torch.randn(300, 128, generator=g) + 0.5
    _save_features(tmp_path / "a.safetensors", a, proto, 0)
    _save_features(tmp_path / "b.safetensors", b, proto, 1)
    out = seed_spread([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    assert out["seeds"] == [0, 1] and out["num_samples"] == 300
    assert out["fp_seed_to_seed_fid"] == pytest.approx(M.fid(a, b))
    assert out["fid"] == pytest.approx(sum(out["fid_per_seed"]) / 2)
    with pytest.raises(EvaluationError, match="at least two seeds"):
        seed_spread([tmp_path / "a.safetensors"])
    _save_features(tmp_path / "c.safetensors", a, proto.with_(steps=5), 2)
    with pytest.raises(EvaluationError, match="different protocols"):
        seed_spread([tmp_path / "a.safetensors", tmp_path / "c.safetensors"])


def test_grid_draws_rgb_images_in_colour_and_refuses_latents(tmp_path):
    import matplotlib.image as mpimg

    from lowbit.errors import EvaluationError
    from lowbit.evaluate.output import save_grid

    red = torch.full((2, 3, 8, 8), -1.0)
    red[:, 0] = 1.0  # pure red in [-1, 1]
    px = mpimg.imread(save_grid({"rgb": red}, tmp_path / "rgb.png"))[..., :3]
    assert ((px[..., 0] > 0.9) & (px[..., 1] < 0.1) & (px[..., 2] < 0.1)).sum() > 50
    gray = mpimg.imread(save_grid({"gray": red[:, :1]}, tmp_path / "g.png"))[..., :3]
    assert not ((gray[..., 0] > 0.9) & (gray[..., 1] < 0.1)).any()  # one channel: grayscale
    with pytest.raises(EvaluationError, match="4 channels cannot be drawn"):
        save_grid({"latents": torch.zeros(2, 4, 8, 8)}, tmp_path / "l.png")

"""Diffusers folders on disk -> calibrated, saved, and rebuilt from the checkpoint alone."""

import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

import lowbit
from lowbit.cli import main
from lowbit.errors import CheckpointError, PlanError
from lowbit.evaluate.sampling import make_scheduler, trajectory_inputs
from lowbit.io import read_metadata
from lowbit.zoo.local import build_from_metadata, open_diffusion_model
from lowbit.zoo.toy import TOY_UNET_CONFIG


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A DDPM pipeline folder as diffusers writes it: unet/ + scheduler/ + model_index.json."""
    d = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    unet = UNet2DModel(**TOY_UNET_CONFIG)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(d)
    return d


def test_pipeline_folder_gives_the_saved_unet_and_schedule(pipeline_dir):
    dm = open_diffusion_model(str(pipeline_dir))
    ref = UNet2DModel.from_pretrained(str(pipeline_dir / "unet"), use_safetensors=True)
    assert all(torch.equal(a, b) for a, b in zip(dm.model.state_dict().values(), ref.state_dict().values()))
    assert dm.shape == (1, 16, 16) and dm.name == pipeline_dir.name and not dm.notes
    assert dm.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    assert "_class_name" not in dm.scheduler_config
    for kind in ("ddim", "dpm"):  # the schedule alone builds lowbit's samplers
        make_scheduler(kind, dm.scheduler_config)


def test_unet_folder_without_scheduler_says_what_it_assumes(pipeline_dir, tmp_path):
    UNet2DModel.from_pretrained(str(pipeline_dir / "unet")).save_pretrained(tmp_path / "u")
    dm = open_diffusion_model(str(tmp_path / "u"))
    assert dm.scheduler_config["beta_schedule"] == "linear" and "assuming DDPM's linear schedule" in dm.notes[0]


def test_load_without_a_model_rebuilds_the_architecture(pipeline_dir, tmp_path):
    dm = open_diffusion_model(str(pipeline_dir))
    calib = trajectory_inputs(dm.model, dm.scheduler_config, n=2, steps=3, shape=dm.shape, progress=False)
    lowbit.quantize(dm.model, "w8a8", calib, progress=False)
    path = lowbit.save(dm.model, tmp_path / "q.safetensors", metadata=dm.metadata)
    meta = read_metadata(path)
    model, schedule, shape = build_from_metadata(meta)
    assert next(model.parameters()).device.type == "meta"
    assert schedule == dm.scheduler_config and shape == (1, 16, 16)
    x, t = calib[1]
    with torch.device("meta"):
        fresh = UNet2DModel(**TOY_UNET_CONFIG)
    a = lowbit.load(path, compute="emulated")
    b = lowbit.load(path, fresh, compute="emulated")
    with torch.no_grad():
        ya, yb, yq = a(x, t).sample, b(x, t).sample, dm.model(x, t).sample
    assert torch.equal(ya, yb) and torch.equal(ya, yq)


def test_load_without_a_model_needs_the_checkpoint_to_say_which(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    lowbit.quantize(m, "w8a8", [torch.randn(4, 8)], progress=False)
    path = lowbit.save(m, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match=r"pass that float model: lowbit.load\(path, model\)"):
        lowbit.load(path)


def test_damaged_model_config_is_one_error():
    meta = {"user.model": "diffusers:UNet2DModel", "user.diffusers_config": "{not json"}
    with pytest.raises(CheckpointError, match="model config is damaged"):
        build_from_metadata(meta)


def _write_config(d, cls):
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_class_name": cls, "sample_size": 8}))


def test_conditional_unet_is_refused_with_the_route(tmp_path):
    _write_config(tmp_path / "c", "UNet2DConditionModel")
    with pytest.raises(PlanError, match="unconditional UNet2DModel only.*from Python"):
        open_diffusion_model(str(tmp_path / "c"))


def test_pickled_weights_are_refused(tmp_path):
    _write_config(tmp_path / "b", "UNet2DModel")
    (tmp_path / "b" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(PlanError, match="no .safetensors weights.*never unpickles"):
        open_diffusion_model(str(tmp_path / "b"))


def test_unknown_model_name(tmp_path):
    with pytest.raises(PlanError, match="unknown model 'nope'.*fmnist-unet"):
        open_diffusion_model("nope")
    (tmp_path / "e").mkdir()
    with pytest.raises(PlanError, match="holds no config.json"):
        open_diffusion_model(str(tmp_path / "e"))


def test_cli_quantize_folder_then_sample(pipeline_dir, tmp_path, capsys):
    ckpt = tmp_path / "q.safetensors"
    assert main(["quantize", "--model", str(pipeline_dir), "--recipe", "w4a8", "--calib-samples", "2",
                 "--calib-steps", "3", "--out", str(ckpt), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert ckpt.is_file() and "True" in out and f"lowbit sample --checkpoint {ckpt}" in out
    png = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(ckpt), "--n", "2", "--per-row", "2", "--steps", "2",
                 "--out", str(png), "--quiet"]) == 0
    assert png.stat().st_size > 0
    # evaluate scores the bundled model only, and says where to go instead
    assert main(["evaluate", str(ckpt), "--samples", "8", "--quiet"]) == 2
    assert "lowbit sample --checkpoint" in capsys.readouterr().err


def test_a_loaded_checkpoint_drops_into_a_diffusers_pipeline(pipeline_dir, tmp_path):
    """lowbit.load(path) gives back the diffusers UNet2DModel (config and all), so diffusers' own
    DDIMPipeline runs it; native kernels and the emulated model give the same images."""
    from diffusers import DDIMPipeline, DDIMScheduler

    ckpt = tmp_path / "q.safetensors"
    assert main(["quantize", "--model", str(pipeline_dir), "--recipe", "w8a8", "--calib-samples", "2",
                 "--calib-steps", "3", "--out", str(ckpt), "--quiet"]) == 0
    sched = DDIMScheduler.from_pretrained(str(pipeline_dir), subfolder="scheduler")
    images = []
    for compute in ("auto", "emulated"):
        pipe = DDIMPipeline(unet=lowbit.load(ckpt, compute=compute), scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=2, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
        images.append(torch.from_numpy(out.images))
    assert images[0].shape == (2, 16, 16, 1)
    from lowbit.nn import sqnr_db

    # a random-weight UNet amplifies the float rounding by which the int8 kernels' epilogue differs
    # from the emulated model (a code flipped at a tie); measured 47 dB, where its W8A8 ε prediction
    # against FP is 27 dB (`lowbit quantize` on this toy)
    assert float(sqnr_db(images[1], images[0])) > 40


def test_cli_evaluate_a_folder_without_features(pipeline_dir, tmp_path, capsys):
    """`lowbit evaluate --model DIR`: PSNR/SSIM to the folder's own FP images, and a table that
    says why FID* is absent; results.json carries no feature space."""
    ckpt = tmp_path / "q.safetensors"
    assert main(["quantize", "--model", str(pipeline_dir), "--recipe", "w8a8", "--calib-samples", "2",
                 "--calib-steps", "3", "--out", str(ckpt), "--quiet"]) == 0
    capsys.readouterr()
    out_dir = tmp_path / "ev"
    assert main(["evaluate", "--model", str(pipeline_dir), str(ckpt), "--samples", "4", "--steps", "2",
                 "--out", str(out_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| model | PSNR dB | SSIM |" in out and "FID*, KID*, precision, recall and IS* need a feature" in out
    res = json.loads((out_dir / "results.json").read_text())
    m = res["models"]["q"]
    assert res["feature_space"] is None and "fid" not in m and 10 < m["psnr"] < 100 and 0 < m["ssim"] <= 1
    assert (out_dir / "grid.png").is_file() and not (out_dir / "bars.png").exists()
    # a checkpoint of another model is refused by load's architecture check, in one line
    other = tmp_path / "fm.safetensors"
    assert main(["quantize", "--model", "fmnist-unet", "--recipe", "w8a8", "--calib-samples", "2",
                 "--calib-steps", "2", "--out", str(other), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(pipeline_dir), str(other), "--samples", "4", "--quiet"]) == 2
    assert "does not fit this model" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(pipeline_dir), "--save-features", "--quiet"]) == 2


def test_class_conditional_unet_and_ve_schedule_are_refused(tmp_path):
    d = tmp_path / "cls"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8, "num_class_embeds": 10}))
    with pytest.raises(PlanError, match="class-conditional UNet2DModel"):
        open_diffusion_model(str(d))
    torch.manual_seed(0)
    UNet2DModel(**TOY_UNET_CONFIG).save_pretrained(tmp_path / "ve")
    (tmp_path / "ve" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "ScoreSdeVeScheduler", "sigma_min": 0.01, "sigma_max": 1348.0}))
    with pytest.raises(PlanError, match="ScoreSdeVeScheduler without a beta schedule"):
        open_diffusion_model(str(tmp_path / "ve"))

"""The lowbit command line end to end: real output, one-line errors with exit status 2."""

import pytest

from lowbit.cli import main


def test_formats_lists_fp4_values(capsys):
    assert main(["formats", "fp4_e2m1"]) == 0
    out = capsys.readouterr().out
    assert "15 values: -6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6" in out


def test_recipes(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("w8a8", "w4a8", "w4a16", "w4a4", "fp8", "w4a8-fp"):
        assert f"\n{name} " in "\n" + out


def test_quantize_then_report(tmp_path, capsys):
    ckpt = tmp_path / "toy.safetensors"
    assert main(["quantize", "--model", "toy-unet", "--recipe", "w4a8", "--out", str(ckpt), "--quiet",
                 "--calib-batches", "2"]) == 0
    out = capsys.readouterr().out
    assert ckpt.is_file() and "w4a8" in out and "True" in out  # reload gave identical outputs
    assert main(["report", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "int4/channel" in out and "attn-matmul" in out


@pytest.mark.parametrize("argv, msg", [
    (["formats", "fp9_e9m9"], "out of range"),
    (["formats", "int17"], "out of range"),
    (["report", "/nonexistent/x.safetensors"], "lowbit checkpoint not found at"),
])
def test_errors_are_one_line(capsys, argv, msg):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error:") and msg in err and err.count("\n") == 1


def test_sample_writes_a_grid(tmp_path):
    out = tmp_path / "s.png"
    assert main(["sample", "--n", "4", "--per-row", "2", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    assert out.is_file() and out.stat().st_size > 1000


def test_evaluate_rejects_bad_protocol_in_one_line(capsys):
    assert main(["evaluate", "--protocol", "medium", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown protocol" in err and err.count("\n") == 1


def test_train_forwards_its_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--steps" in capsys.readouterr().out


def test_evaluate_runs_checkpoints_on_the_requested_compute_path(tmp_path, capsys):
    import torch

    import lowbit
    from lowbit.zoo.fmnist_unet import load_fmnist_unet

    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, 1, 28, 28, generator=g), torch.tensor([t])) for t in (999, 500, 1)]
    ckpt = lowbit.save(lowbit.quantize(load_fmnist_unet(), "w8a8", calib, progress=False), tmp_path / "q.safetensors")
    argv = ["evaluate", str(ckpt), "--samples", "12", "--steps", "2", "--quiet", "--out", str(tmp_path / "ev")]
    assert main(argv + ["--compute", "emulated"]) == 0
    out = capsys.readouterr().out
    assert "| q (emulated) |" in out and "| fp32 |" in out
    assert main(argv + ["--dtype", "bfloat16"]) == 0  # the checkpoint in bf16 (where the CPU lacks bf16: slow, exact)
    assert "| q (bf16) |" in capsys.readouterr().out
    assert main(argv + ["--compute", "emulated", "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert "--dtype bfloat16 applies to native kernels only" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:  # argparse's own one-line error for an unknown choice
        main(argv + ["--compute", "fast"])
    assert e.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err


def test_quantize_bundled_diffusion_model(tmp_path, capsys):
    """The bundled model through `lowbit quantize`: calibrated on its own trajectory, checked on a
    held-out one (ε SQNR), reloaded from the file alone."""
    ckpt = tmp_path / "fm.safetensors"
    assert main(["quantize", "--model", "fmnist-unet", "--recipe", "w8a8", "--calib-samples", "8",
                 "--calib-steps", "4", "--out", str(ckpt), "--quiet"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("w8a8 "))
    cols = row.split()
    assert float(cols[3]) > 25 and cols[4] == "True"  # ε SQNR vs FP on held-out inputs; reload identical
    from lowbit.io import read_metadata

    assert read_metadata(ckpt)["user.model"] == "fmnist-unet"

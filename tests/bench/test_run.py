"""lowbit.bench: the report shows what was measured (ratios to FP32 from the same rows) and the
model registry rejects unknown names clearly. The benchmark itself is run by `lowbit bench`, not
by the tests (timing in tests is banned)."""

import pytest

from lowbit.bench.run import MODELS, markdown


def _row(name, seconds, ckpt, mem=None, sqnr=None):
    r = dict(name=name, seconds=seconds, images_per_s=4 / seconds, speedup=2.0 / seconds, sqnr_db=sqnr,
             checkpoint_bytes=ckpt, paths={"fp32": 1}, build_seconds=0.0, first_seconds=seconds)
    if mem is not None:
        r["memory"] = mem
    return r


def test_markdown_reports_ratios_and_memory_against_the_fp32_row():
    rows = [_row("fp32", 2.0, 1000, {"baseline_mb": 100.0, "peak_mb": 300.0, "sampling_peak_mb": 300.0}),
            _row("lowbit w8a8", 0.5, 290, {"baseline_mb": 100.0, "peak_mb": 150.0, "sampling_peak_mb": 140.0},
                 sqnr=31.25),
            _row("peer", 1.0, None, {"error": "boom"}),
            _row("old kernel", 1.0, None, {"baseline_mb": 100.0, "peak_mb": 200.0, "sampling_peak_mb": None})]
    text = markdown([dict(model="m", description="d", batch=4, steps=5, repeats=3, rows=rows)], "lowbit bench", 1)
    line = next(ln for ln in text.splitlines() if ln.startswith("| lowbit w8a8"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == "4.00"  # 2.0 s / 0.5 s
    assert cells[4] == "31.2"
    assert cells[5] == "290 (0.290)"
    assert cells[7] == "50 (0.25)"  # (150-100) / (300-100)
    assert cells[8] == "40 (0.20)"  # sampling alone: (140-100) / (300-100)
    old = next(ln for ln in text.splitlines() if ln.startswith("| old kernel"))
    assert [c.strip() for c in old.strip("|").split("|")][7:9] == ["100 (0.50)", "–"]  # no reset: no column
    peer = next(ln for ln in text.splitlines() if ln.startswith("| peer"))
    assert "error" in peer and "boom" in peer
    assert "`lowbit bench`" in text and "1 thread(s)" in text


def test_markdown_reports_the_large_latent_memory_against_fp32():
    big = {"baseline_mb": 100.0, "peak_mb": 700.0, "sampling_peak_mb": 600.0}
    rows = [_row("fp32", 2.0, 1000, big), _row("lowbit w4a8", 0.5, 130, big)]
    rows[0]["memory_large"] = big
    rows[1]["memory_large"] = {"baseline_mb": 100.0, "peak_mb": 300.0, "sampling_peak_mb": 250.0}
    res = dict(model="m", description="d", batch=4, steps=5, repeats=3, rows=rows, large_size=128)
    text = markdown([res], "lowbit bench", 1)
    assert "Peak RSS at 128×128 latents" in text
    line = [ln for ln in text.splitlines() if ln.startswith("| lowbit w4a8")][-1]
    assert [c.strip() for c in line.strip("|").split("|")] == ["lowbit w4a8", "300", "200 (0.33)", "150 (0.30)"]
    res["large_size"] = None
    for r in rows:
        del r["memory_large"]
    assert "latents (batch 1" not in markdown([res], "lowbit bench", 1)


def test_unknown_model_name_names_the_choices():
    with pytest.raises(KeyError, match="bundled, sdlike"):
        MODELS["sd15"]


def test_attention_shapes_are_read_off_a_forward_pass():
    """The tiny UNet (8×8 input, 16 channels and 2 heads of 8 at 4×4) has four attention layers,
    all of one shape: the down block's, the mid block's and the up block's two."""
    from conftest import make_unet, unet_inputs

    from lowbit.bench.attention import attention_shapes

    unet = make_unet()
    x, t = unet_inputs(1, batch=3)[0]
    attn = [m for m in unet.modules() if hasattr(m, "get_attention_scores")]
    assert len(attn) == 4 and {m.heads for m in attn} == {2}
    assert attention_shapes(unet, (x, t)) == [(3 * 2, 4 * 4, 4 * 4, 8, 4)]


def test_cross_attention_shapes_have_the_prompt_as_keys():
    """A text-conditioned UNet's cross-attention reads its 5 context tokens as keys, its
    self-attention the image tokens: 3 transformer blocks at 8×8 (2 heads of 8), the mid block's
    at 4×4 (2 heads of 16), batch 3."""
    from conftest import make_text_unet, text_unet_inputs

    from lowbit.bench.attention import attention_shapes

    x, t = text_unet_inputs(1)[0]
    assert sorted(attention_shapes(make_text_unet(), (x, t))) == [(6, 16, 5, 16, 1), (6, 16, 16, 16, 1), (6, 64, 5, 8, 3), (6, 64, 64, 8, 3)]


def test_bench_model_runs_end_to_end_and_removes_its_checkpoints(tmp_path, monkeypatch):
    """One small end-to-end pass over a tiny UNet (no torch.compile, no peers, no memory
    processes): every variant gets a row and its images an SQNR, and the checkpoints written for
    the lowbit variants do not pile up in the temp folder afterwards."""
    from conftest import TINY_UNET, make_unet
    from diffusers import UNet2DModel

    import lowbit.bench.run as run
    import lowbit.bench.variants as variants

    spec = run.ModelSpec(lambda: UNet2DModel(**TINY_UNET), make_unet, {"num_train_timesteps": 1000}, (1, 8, 8), 2,
                         "tiny")
    monkeypatch.setitem(run.MODELS, "tiny", spec)
    monkeypatch.setattr(variants, "_compiled", variants._eps)  # compiling is the slow part; not under test
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(run, "default_workdir", lambda: work)
    out = run.bench_model("tiny", ("w8a8",), (), steps=1, repeats=1, threads=1, memory=False, log=lambda *a: None)
    names = [r["name"] for r in out["rows"]]
    assert "fp32" in names and "lowbit w8a8" in names and "lowbit w8a8 + compile" in names
    assert all(r["sqnr_db"] is not None for r in out["rows"] if r["name"] != "fp32")
    assert not work.exists()


def test_memory_processes_go_to_the_eager_variants_a_user_loads():
    """The peak-RSS processes (and the bench's progress bar over them) cover FP32, BF16 and the
    lowbit checkpoints eager, once more at the large latent size except for the float32-activation
    twin; compiled variants and peers get none, and ``memory=False`` none at all."""
    from pathlib import Path

    import lowbit.bench.run as run
    from lowbit.bench.variants import Variant

    ck = Path("w8a8.safetensors")
    vs = [Variant("fp32", None), Variant("bf16", None), Variant("fp32 + compile", None),
          Variant("lowbit w8a8 (fp32 act.)", None, checkpoint=ck), Variant("lowbit w8a8", None, checkpoint=ck),
          Variant("lowbit w8a8 + compile", None, checkpoint=ck), Variant("PT2E X86Inductor int8 + compile", None),
          Variant("optimum-quanto W8A8", None)]
    large = run.ModelSpec(None, None, {}, (1, 8, 8), 2, "m", large_size=32)
    small = run.ModelSpec(None, None, {}, (1, 8, 8), 2, "m")
    assert [run._memory_runs(v, large, True) for v in vs] == [2, 2, 0, 1, 2, 0, 0, 0]
    assert [run._memory_runs(v, small, True) for v in vs] == [1, 1, 0, 1, 1, 0, 0, 0]
    assert all(run._memory_runs(v, large, False) == 0 for v in vs)


def test_a_diffusers_folder_is_a_benchmark_model(tmp_path):
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from lowbit.zoo.toy import TOY_UNET_CONFIG

    torch.manual_seed(0)
    unet = UNet2DModel(**TOY_UNET_CONFIG)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(tmp_path / "p")
    spec = MODELS[str(tmp_path / "p")]
    assert spec.shape == (1, 16, 16) and spec.batch == 4 and spec.scheduler["beta_schedule"] == "squaredcos_cap_v2"
    with torch.device("meta"):
        assert next(spec.build().parameters()).is_meta
    assert torch.equal(spec.load().conv_in.weight, unet.conv_in.weight)
    assert "local diffusers UNet2DModel, 0.70M params, 1×16×16, channels 32/64" in spec.description


def test_cli_bench_sends_a_folder_report_to_runs(tmp_path, monkeypatch, capsys):
    import lowbit.bench.run as run
    from lowbit.cli import main

    got = {}
    monkeypatch.setattr(run, "bench", lambda *a, **kw: got.update(args=a, kw=kw))
    (tmp_path / "mine").mkdir()
    assert main(["bench", "--models", str(tmp_path / "mine"), "--batch", "2"]) == 0
    assert got["args"][7] == "runs/performance-mine.md" and got["kw"]["batch"] == 2
    assert main(["bench", "--models", str(tmp_path / "nothere")]) == 2
    assert "unknown benchmark model" in capsys.readouterr().err
    assert main(["bench", "--batch", "0"]) == 2

"""lowbit.zoo.dit_s: the DiT benchmark model builds on the meta device, gives sample i of a batch
class label i mod 1000, and is registered as the ``dit`` benchmark model."""

import torch

from lowbit.bench.run import MODELS
from lowbit.zoo.dit_s import DIT_S_CONFIG, ClassConditioned, build_dit_s


def test_class_conditioned_passes_label_i_mod_classes_for_sample_i():
    import diffusers

    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                          sample_size=8, patch_size=2, norm_num_groups=4).eval()
    model = ClassConditioned(dit, num_classes=3)
    x, t = torch.randn(5, 4, 8, 8), torch.full((5,), 500)
    with torch.no_grad():
        got = model(x, t).sample
        want = dit(x, t, class_labels=torch.tensor([0, 1, 2, 0, 1])).sample
        other = dit(x, t, class_labels=torch.tensor([1, 1, 1, 1, 1])).sample
    assert torch.equal(got, want) and not torch.equal(got, other)


def test_dit_s_builds_on_meta_with_dit_s_widths_and_is_a_benchmark_model():
    with torch.device("meta"):
        m = build_dit_s()
    assert m.transformer.config.num_layers == DIT_S_CONFIG["num_layers"] == 12
    assert m.transformer.inner_dim == 384
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - 39.8) < 0.1  # what the bench title says
    spec = MODELS["dit"]
    assert spec.shape == (4, 32, 32) and spec.large_size is None


def _ddim_stds(model, steps=5):
    from diffusers import DDIMScheduler

    from lowbit.zoo.dit_s import DIT_SCHEDULER_CONFIG

    sched = DDIMScheduler(**DIT_SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    stds = []
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t.expand(2)).sample, t, x).prev_sample
            stds.append(x.std().item())
    return stds, (x.abs() >= 1).float().mean().item()


def test_fitted_readout_keeps_the_ddim_trajectory_bounded():
    """With every weight random the trajectory runs away (the reason for the fit); with the
    fitted proj_out_2 the latents stay near unit std and most final values are not clipped."""
    from lowbit.zoo.dit_s import _random_dit_s

    stds, clipped = _ddim_stds(build_dit_s(0))
    assert max(stds) < 2.0 and clipped < 0.3, (stds, clipped)
    raw_stds, raw_clipped = _ddim_stds(_random_dit_s(0))
    assert max(raw_stds) > 5.0 and raw_clipped > 0.5, (raw_stds, raw_clipped)
    # the fit is the only change: every other parameter is the seeded random init
    fitted, raw = build_dit_s(0).state_dict(), _random_dit_s(0).state_dict()
    assert [k for k in raw if not torch.equal(raw[k], fitted[k])] == ["transformer.proj_out_2.weight",
                                                                       "transformer.proj_out_2.bias"]

"""Sampling: determinism across batch sizes and models, trajectory recording, bad input; the
shipped bundled model reproduces its stored reference sample."""

import pytest
import safetensors.torch
import torch

from lowbit.errors import CheckpointError, EvaluationError
from lowbit.evaluate.protocol import PROTOCOLS, Protocol, get_protocol
from lowbit.evaluate.sampling import initial_noise, sample, trajectory_inputs

from conftest import make_unet

SCHED = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
             prediction_type="epsilon", clip_sample=True)


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_sampling_is_deterministic_and_batch_size_independent(sampler):
    m = make_unet()
    kw = dict(n=5, seed=3, sampler=sampler, steps=4, shape=(1, 8, 8), progress=False)
    a = sample(m, SCHED, batch_size=5, **kw)
    b = sample(m, SCHED, batch_size=2, **kw)
    assert a.shape == (5, 1, 8, 8) and torch.allclose(a, b, atol=1e-4)  # BLAS blocking differs by batch size
    assert torch.equal(a, sample(m, SCHED, batch_size=5, **kw))
    assert a.abs().max() <= 1 and not torch.equal(a, sample(m, SCHED, batch_size=5, **{**kw, "seed": 4}))


def test_initial_noise_depends_only_on_seed_and_index():
    assert torch.equal(initial_noise(3, (1, 4, 4), 0), initial_noise(5, (1, 4, 4), 0)[:3])


def test_recording_covers_every_step_in_sampling_order():
    recorded = []
    sample(make_unet(), SCHED, n=3, steps=5, shape=(1, 8, 8), progress=False,
           record=lambda x, t: recorded.append((x.shape, int(t[0]))))
    ts = [t for _, t in recorded]
    assert len(recorded) == 5 and ts == sorted(ts, reverse=True) and ts[0] > 700
    assert all(s == (3, 1, 8, 8) for s, _ in recorded)


def test_trajectory_inputs_are_one_batch_per_step():
    from lowbit.zoo.fmnist_unet import FMNIST_SCHEDULER_CONFIG, load_fmnist_unet

    batches = trajectory_inputs(load_fmnist_unet(), FMNIST_SCHEDULER_CONFIG, n=2, steps=3, progress=False)
    assert len(batches) == 3 and all(x.shape == (2, 1, 28, 28) and t.shape == (2,) for x, t in batches)


@pytest.mark.parametrize("kw, msg", [(dict(n=0), "at least 1"), (dict(sampler="euler"), "unknown sampler"),
                                     (dict(steps=0), "step count")])
def test_bad_sampling_arguments(kw, msg):
    args = dict(n=2, steps=2, shape=(1, 8, 8), progress=False) | kw
    with pytest.raises(EvaluationError, match=msg):
        sample(make_unet(), SCHED, **args)


def test_protocols_and_bad_protocols():
    assert PROTOCOLS["quick"].num_samples == 2000 and PROTOCOLS["full"].num_samples == 10000
    assert len(PROTOCOLS["full"].seeds) == 3
    custom = get_protocol("quick").with_(num_samples=64)
    assert custom.num_samples == 64 and custom.name == "quick-custom"
    for bad, msg in [(lambda: get_protocol("fast"), "unknown protocol"), (lambda: Protocol("x", num_samples=0), "at least 2"),
                     (lambda: Protocol("x", sampler="euler"), "unknown sampler")]:
        with pytest.raises(EvaluationError, match=msg):
            bad()


def test_shipped_model_reproduces_its_reference_sample():
    from lowbit.zoo.ship import SAMPLE_PATH, reference_sample

    stored = safetensors.torch.load_file(SAMPLE_PATH)["images"]
    assert stored.shape == (4, 1, 28, 28)
    assert (reference_sample() - stored).abs().max() <= 1e-3


def test_bundled_loader_errors(tmp_path):
    from lowbit.zoo.fmnist_unet import WEIGHTS_PATH, load_fmnist_unet

    with pytest.raises(CheckpointError, match="not found"):
        load_fmnist_unet(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(WEIGHTS_PATH.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="damaged"):
        load_fmnist_unet(bad)
    wrong = tmp_path / "wrong.safetensors"
    safetensors.torch.save_file(make_unet().state_dict(), wrong, metadata={"config": '{"sample_size": 8}'})
    with pytest.raises(CheckpointError, match="another configuration"):
        load_fmnist_unet(wrong)

"""Calibration: observers against numpy/closed-form references, data handling, bad input."""

import numpy as np
import pytest
import torch
from torch import nn

from lowbit import LayerSpec, Plan, calibrate, formats, quantize
from lowbit.calibration import Observer, mse_clip, weight_range
from lowbit.errors import CalibrationError
from lowbit.quantizer import Quantizer


def test_minmax_observer_streams_exact_extremes():
    obs = Observer("minmax")
    xs = [torch.randn(100) * s for s in (1, 5, 2)]
    for x in xs:
        obs.update(x)
    lo, hi = obs.range(formats.parse("uint8"))
    allx = torch.cat(xs)
    assert lo == allx.min() and hi == allx.max()


def test_percentile_observer_matches_numpy():
    torch.manual_seed(0)
    x = torch.randn(10_000)
    obs = Observer("percentile", percentile=0.99)
    obs.update(x)
    lo, hi = obs.range(formats.parse("uint8"))
    assert abs(hi.item() - np.quantile(x.numpy(), 0.99)) < 1e-5
    assert abs(lo.item() - np.quantile(x.numpy(), 0.01)) < 1e-5


def test_mse_clip_beats_minmax_on_outliers_and_finds_the_best_clip():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 20_000)
    x[..., :20] *= 30  # 0.1 % outliers, as in diffusion activations
    fmt = formats.parse("int4")
    q = Quantizer(fmt)

    def err(lo, hi):
        q.set_range(lo, hi)
        return (q(x) - x).pow(2).mean().item()

    lo, hi = x.amin(-1), x.amax(-1)
    blo, bhi = mse_clip(x, fmt, lo, hi)
    assert err(blo, bhi) < 0.7 * err(lo, hi)  # measured 0.60x
    # brute-force check over a finer grid: the search is within 5% of the best clipping
    best = min(err(lo * a, hi * a) for a in np.linspace(0.05, 1, 200))
    assert err(blo, bhi) <= best * 1.05


def test_weight_range_per_channel_minmax():
    w = torch.randn(6, 10)
    q = Quantizer(formats.parse("int8"), "channel", shape=(6, 10))
    lo, hi = weight_range(w, q)
    assert torch.equal(lo.squeeze(1), w.amin(1)) and torch.equal(hi.squeeze(1), w.amax(1))


def _model():
    torch.manual_seed(0)
    return quantize(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), Plan.uniform(LayerSpec("int8", "uint8")))


def test_calibrate_accepts_tensors_tuples_dicts_and_forward_loop():
    x = torch.randn(16, 8)
    for data in ([x], [(x,)], [{"input": x}]):
        m = _model()
        calibrate(m, data, progress=False)
        assert torch.isfinite(m(x)).all()
    m = _model()
    calibrate(m, forward_loop=lambda mod: [mod(x[i:i + 4]) for i in range(0, 16, 4)])
    assert m[0].input_quant.scale.item() == pytest.approx((x.max() - min(x.min(), 0)).item() / 255, rel=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_data_is_rejected(bad):
    x = torch.randn(4, 8)
    x[1, 2] = bad
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        calibrate(_model(), [x], progress=False)


def test_non_finite_activation_inside_model_names_the_layer():
    m = _model()
    with torch.no_grad():
        m[0].bias[0] = float("inf")
    with pytest.raises(CalibrationError, match=r"2\.input_quant"):
        calibrate(m, [torch.randn(4, 8)], progress=False)


def test_empty_calibration_set_and_argument_errors():
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(_model(), [], progress=False)
    with pytest.raises(CalibrationError, match="exactly one"):
        calibrate(_model())


def test_observers_are_removed_after_a_failed_calibration():
    m = _model()
    with pytest.raises(CalibrationError):
        calibrate(m, [], progress=False)
    assert m[0].input_quant.observer is None

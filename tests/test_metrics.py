"""Metrics against closed forms and independent reference implementations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import EvaluationError, LowbitError
from lowbit.evaluate.metrics import (
    class_histogram,
    fid,
    frechet_distance,
    gaussian_stats,
    inception_score,
    kid,
    polynomial_kernel,
    polynomial_mmd2,
    precision_recall,
    psnr,
    ssim,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _spd(rng: np.random.Generator, d: int, cond: float = 10.0) -> np.ndarray:
    q = scipy.stats.ortho_group.rvs(d, random_state=rng)
    w = np.exp(rng.uniform(0.0, math.log(cond), d))
    return (q * w) @ q.T


# --------------------------------------------------------------------------------------------
# Gaussian statistics and Fréchet distance
# --------------------------------------------------------------------------------------------

def test_gaussian_stats_matches_numpy_in_float64():
    x = _rng(1).normal(size=(40, 6)).astype(np.float32)
    mu, sigma = gaussian_stats(torch.from_numpy(x))
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    assert mu.shape == (6,) and sigma.shape == (6, 6)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False, ddof=1), rtol=1e-12, atol=1e-12)
    assert np.array_equal(sigma, sigma.T)
    mu2, sigma2 = gaussian_stats(x)  # numpy input gives the same
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)


def test_frechet_diagonal_closed_form():
    rng = _rng(2)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_frechet_commuting_covariances_closed_form():
    rng = _rng(3)
    d = 10
    q = scipy.stats.ortho_group.rvs(d, random_state=rng)  # shared random eigenbasis
    a, b = rng.uniform(0.05, 5.0, d), rng.uniform(0.05, 5.0, d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-10)
    # torch inputs are accepted too
    t = torch.from_numpy
    assert frechet_distance(t(mu1), t(s1), t(mu2), t(s2)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n,d", [(200, 16), (10, 32)])  # well- and rank-deficient (N < D)
def test_frechet_self_distance_is_zero(n, d):
    x = _rng(4).normal(size=(n, d)) * 3.0 + 5.0
    mu, sigma = gaussian_stats(x)
    assert 0.0 <= frechet_distance(mu, sigma, mu, sigma) < 1e-8
    assert 0.0 <= fid(x, x) < 1e-8


def test_frechet_is_symmetric():
    rng = _rng(5)
    d = 9
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _spd(rng, d, 100.0), _spd(rng, d, 100.0)
    ab, ba = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert ab == pytest.approx(ba, rel=1e-10)


def test_frechet_matches_scipy_sqrtm_reference():
    rng = _rng(6)
    for d in (2, 5, 8):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _spd(rng, d), _spd(rng, d)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(np.real(covmean))
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9, abs=1e-10)


def test_fid_of_samples_approaches_closed_form():
    rng = _rng(7)
    d, n = 6, 20000
    q = scipy.stats.ortho_group.rvs(d, random_state=rng)
    a, b = rng.uniform(0.5, 3.0, d), rng.uniform(0.5, 3.0, d)
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    x = rng.normal(size=(n, d)) * np.sqrt(a) @ q.T + mu1
    y = rng.normal(size=(n, d)) * np.sqrt(b) @ q.T + mu2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid(torch.from_numpy(x).float(), y)
    assert got == pytest.approx(expected, rel=0.05, abs=0.02)


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_frechet_nonnegative_symmetric_and_zero_on_diagonal(d, seed):
    rng = _rng(seed)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _spd(rng, d, 1e4) if d > 1 else rng.uniform(0.01, 5, (1, 1)), _spd(rng, d, 1e4) if d > 1 else rng.uniform(0.01, 5, (1, 1))
    ab = frechet_distance(mu1, s1, mu2, s2)
    assert ab >= 0.0
    assert ab == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-7, abs=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) < 1e-8 * max(1.0, np.trace(s1))


# --------------------------------------------------------------------------------------------
# KID
# --------------------------------------------------------------------------------------------

def _brute_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(u, v):
        return (sum(u[i] * v[i] for i in range(d)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2.0 * sxy


def test_kid_kernel_and_estimator_match_brute_force_loops():
    rng = _rng(8)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.7
    kmat = polynomial_kernel(x, y).numpy()
    for i in range(6):
        for j in range(6):
            assert kmat[i, j] == pytest.approx((np.dot(x[i], y[j]) / 3 + 1) ** 3, rel=1e-12)
    ref = _brute_mmd2(x, y)
    assert polynomial_mmd2(x, y) == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert polynomial_mmd2(x, y[:4]) == pytest.approx(_brute_mmd2(x, y[:4]), rel=1e-10, abs=1e-12)
    # one subset as large as both sets is a permutation of the full sets: same value, std 0
    mean, std = kid(x, y, subsets=3, subset_size=100)
    assert mean == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_same_distribution_is_near_zero():
    rng = _rng(9)
    a, b = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    mean, std = kid(a, b, subsets=20, subset_size=500)
    assert std > 0
    assert abs(mean) < 3 * std + 1e-12
    assert abs(mean) < 1e-2


def test_kid_increases_with_mean_shift():
    rng = _rng(10)
    a, b = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    means = [kid(a, b + s, subsets=10, subset_size=300)[0] for s in (0.0, 0.25, 0.5, 1.0)]
    assert all(lo < hi for lo, hi in itertools.pairwise(means)), means
    assert means[-1] > 10 * abs(means[0])


def test_kid_unbiased_vs_biased_estimator():
    # Expected value over many independent draws from one distribution: ~0 for the unbiased
    # U-statistic, clearly positive for the biased V-statistic.
    rng = _rng(11)
    unb, bia = [], []
    for _ in range(300):
        x, y = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
        unb.append(polynomial_mmd2(x, y))
        bia.append(polynomial_mmd2(x, y, unbiased=False))
    unb, bia = np.array(unb), np.array(bia)
    se_u, se_b = unb.std(ddof=1) / math.sqrt(len(unb)), bia.std(ddof=1) / math.sqrt(len(bia))
    assert abs(unb.mean()) < 3.5 * se_u
    assert bia.mean() > 10 * se_b
    assert bia.mean() > 10 * abs(unb.mean())


def test_kid_deterministic_for_seed_and_clips_subset_size():
    rng = _rng(12)
    a, b = rng.normal(size=(80, 5)), rng.normal(size=(50, 5)) + 0.3
    r1 = kid(a, b, subsets=7, subset_size=1000, seed=3)  # clipped to 50
    r2 = kid(torch.from_numpy(a), torch.from_numpy(b), subsets=7, subset_size=1000, seed=3)
    assert r1 == r2
    r3 = kid(a, b, subsets=7, subset_size=1000, seed=4)
    assert r3 != r1
    assert all(math.isfinite(v) for v in r1)


# --------------------------------------------------------------------------------------------
# Precision / recall
# --------------------------------------------------------------------------------------------

def test_precision_recall_identical_sets():
    x = _rng(13).normal(size=(300, 10))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)


def test_precision_recall_disjoint_sets():
    rng = _rng(14)
    real, fake = rng.normal(size=(200, 5)), rng.normal(size=(150, 5)) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_half_the_modes():
    rng = _rng(15)
    per = 250
    centers = np.array([[50.0, 0.0], [0.0, 50.0], [-50.0, 0.0], [0.0, -50.0]])
    real = np.concatenate([c + rng.normal(size=(per, 2)) for c in centers])
    fake = np.concatenate([c + rng.normal(size=(2 * per, 2)) for c in centers[:2]])  # modes 0, 1 only
    p, r = precision_recall(real, fake, k=3)
    assert p > 0.95  # (finite-sample k-NN balls miss a few outliers, so not exactly 1)
    assert 0.45 < r <= 0.5  # the two uncovered modes contribute nothing


def test_precision_recall_hand_computed_excludes_own_distance():
    # 1-D, k=1. Real radii (nearest *other* point): 0,1,2,3 -> 1 ; 10 -> 7.
    # Fake radii: 1.5 -> 1 ; 2.5 -> 1 ; 40 -> 37.5.
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    fake = np.array([[1.5], [2.5], [40.0]])
    p, r = precision_recall(real, fake, k=1)
    assert p == pytest.approx(2 / 3)  # 40 lies outside every real ball
    assert r == pytest.approx(4 / 5)  # 0 is 1.5 from the nearest fake, whose radius is 1


def test_precision_recall_chunking_does_not_change_result():
    rng = _rng(16)
    real, fake = rng.normal(size=(130, 6)), rng.normal(size=(90, 6)) * 1.3 + 0.2
    full = precision_recall(real, fake)
    assert precision_recall(real, fake, chunk_size=7) == full
    assert precision_recall(torch.from_numpy(real).float(), torch.from_numpy(fake).float(), chunk_size=1) == pytest.approx(full, abs=1 / 90)
    assert 0.0 < full[0] < 1.0 and 0.0 < full[1] < 1.0


# --------------------------------------------------------------------------------------------
# Inception score and class histogram
# --------------------------------------------------------------------------------------------

def test_inception_score_uniform_logits_is_one():
    mean, std = inception_score(torch.zeros(100, 10))
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_balanced_is_num_classes():
    labels = torch.arange(1000) % 10
    logits = torch.nn.functional.one_hot(labels, 10).double() * 1e4  # extreme: stable log-softmax
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)
    # mode collapse: confident but always the same class -> 1
    assert inception_score(torch.nn.functional.one_hot(torch.zeros(200, dtype=torch.long), 10) * 50.0)[0] == pytest.approx(1.0, abs=1e-9)


def test_inception_score_matches_naive_reference():
    logits = _rng(17).normal(size=(103, 7)) * 3
    splits = 4
    ref = []
    for part in np.array_split(logits, splits):
        p = np.exp(part - part.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        py = p.mean(0)
        ref.append(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(py)), axis=1))))
    mean, std = inception_score(logits, splits=splits)
    assert mean == pytest.approx(np.mean(ref), rel=1e-10)
    assert std == pytest.approx(np.std(ref), rel=1e-8, abs=1e-12)
    assert 1.0 <= mean <= 7.0


def test_class_histogram():
    labels = torch.tensor([0, 0, 1, 3, 3, 3, 9, 9])
    logits = torch.nn.functional.one_hot(labels, 10).float() + 0.01 * torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    h = class_histogram(logits)
    assert h.shape == (10,)
    assert float(h.sum()) == pytest.approx(1.0, abs=1e-12)
    expected = torch.tensor([2, 1, 0, 3, 0, 0, 0, 0, 0, 2], dtype=torch.float64) / 8
    torch.testing.assert_close(h, expected)
    torch.testing.assert_close(class_histogram(labels, num_classes=10), expected)
    assert float(class_histogram(torch.randn(50, 4), num_classes=4).sum()) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# PSNR and SSIM
# --------------------------------------------------------------------------------------------

def _images(n=3, c=2, h=20, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images in [-1, 1] with structure, not pure noise
    base = torch.randn(n, c, h // 4, w // 4, generator=g)
    x = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    return torch.tanh(x + 0.1 * torch.randn(n, c, h, w, generator=g))


def test_psnr_constant_offset_closed_form():
    x = _images().double() * 0.5  # float64 so that x + delta is offset by exactly delta (to rounding)
    for delta in (0.01, 0.1, 0.5):
        got = psnr(x, x + delta)
        assert got.shape == (3,) and got.dtype == torch.float64
        torch.testing.assert_close(got, torch.full((3,), 10 * math.log10(4.0 / delta**2), dtype=torch.float64), rtol=1e-9, atol=1e-9)
    assert float(psnr(x, x + 0.1, data_range=1.0)[0]) == pytest.approx(10 * math.log10(1 / 0.01), rel=1e-9)


def test_psnr_identical_is_inf():
    x = _images()
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()


def test_ssim_identity_noise_and_symmetry():
    x = _images(seed=1)
    s = ssim(x, x)
    assert s.shape == (3,) and s.dtype == torch.float64
    torch.testing.assert_close(s, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(x.shape, generator=g)
    vals = torch.stack([ssim(x, x + a * noise) for a in (0.02, 0.1, 0.3, 1.0)])
    assert (vals[1:] < vals[:-1]).all()
    assert (vals < 1).all() and (vals > -1).all()
    y = x + 0.2 * noise
    torch.testing.assert_close(ssim(x, y), ssim(y, x), rtol=0, atol=1e-12)


def _ssim_reference_scipy(a: np.ndarray, b: np.ndarray, L: float) -> np.ndarray:
    """Per-image SSIM with scipy.ndimage.gaussian_filter (radius 5 = 11x11 window), valid crop."""
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2

    def f(z):  # truncate * sigma = 5 -> radius 5, an 11x11 window; crop to the valid region
        return scipy.ndimage.gaussian_filter(z, sigma=1.5, truncate=5 / 1.5, mode="reflect")[5:-5, 5:-5]

    out = []
    for ai, bi in zip(a, b):
        chans = []
        for x, y in zip(ai, bi):
            mx, my = f(x), f(y)
            vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
            m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            chans.append(m.mean())
        out.append(np.mean(chans))
    return np.array(out)


def _ssim_reference_loops(x: np.ndarray, y: np.ndarray, L: float) -> float:
    """Single-channel SSIM with an explicit 11x11 window and explicit loops over positions."""
    r = np.arange(11) - 5
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_independent_references():
    x = _images(n=2, c=3, h=18, w=21, seed=3)
    y = (x + 0.15 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))).clamp(-1, 1)
    got = ssim(x, y).numpy()
    ref = _ssim_reference_scipy(x.double().numpy(), y.double().numpy(), 2.0)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)  # in fact agrees to rounding
    xs, ys = x[:1, :1], y[:1, :1]
    loop = _ssim_reference_loops(xs[0, 0].double().numpy(), ys[0, 0].double().numpy(), 2.0)
    assert float(ssim(xs, ys)[0]) == pytest.approx(loop, abs=1e-10)
    # numpy inputs are accepted as well
    np.testing.assert_allclose(ssim(x.numpy(), y.numpy()).numpy(), got, rtol=0, atol=1e-12)


def test_ssim_small_images_need_smaller_window():
    x = _images(n=2, c=1, h=8, w=8, seed=5)
    with pytest.raises(EvaluationError, match="win_size=7"):
        ssim(x, x)
    torch.testing.assert_close(ssim(x, x, win_size=7), torch.ones(2, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

_F = np.ones((5, 3))
_G = _rng(18).normal(size=(6, 3))
_NAN = _G.copy()
_NAN[2, 1] = np.nan
_INF = _G.copy()
_INF[0, 0] = np.inf
_IMG = torch.zeros(2, 1, 12, 12)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: gaussian_stats(np.zeros((0, 3))), id="empty-rows"),
        pytest.param(lambda: gaussian_stats(np.zeros((4, 0))), id="empty-dims"),
        pytest.param(lambda: gaussian_stats(np.zeros(4)), id="1d-features"),
        pytest.param(lambda: gaussian_stats(np.ones((1, 3))), id="one-sample-cov"),
        pytest.param(lambda: fid(_G[:1], _G), id="fid-one-sample"),
        pytest.param(lambda: gaussian_stats(_NAN), id="nan"),
        pytest.param(lambda: gaussian_stats(torch.from_numpy(_INF)), id="inf"),
        pytest.param(lambda: fid(_G, np.ones((6, 4))), id="fid-dims"),
        pytest.param(lambda: kid(_G, np.ones((6, 4))), id="kid-dims"),
        pytest.param(lambda: kid(_G, _NAN), id="kid-nan"),
        pytest.param(lambda: kid(_G[:1], _G), id="kid-one-sample"),
        pytest.param(lambda: kid(_G, _G, subsets=0), id="kid-subsets"),
        pytest.param(lambda: precision_recall(_G, np.ones((6, 2))), id="pr-dims"),
        pytest.param(lambda: precision_recall(_G[:3], _G, k=3), id="pr-too-few"),
        pytest.param(lambda: precision_recall(np.zeros((0, 3)), _G), id="pr-empty"),
        pytest.param(lambda: frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2)), id="fd-dims"),
        pytest.param(lambda: frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)), id="fd-cov-shape"),
        pytest.param(lambda: frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2)), id="fd-not-psd"),
        pytest.param(lambda: frechet_distance(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2)), id="fd-asym"),
        pytest.param(lambda: frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2)), id="fd-nan"),
        pytest.param(lambda: inception_score(np.zeros((5, 10)), splits=10), id="is-splits"),
        pytest.param(lambda: inception_score(np.zeros((0, 10))), id="is-empty"),
        pytest.param(lambda: class_histogram(np.zeros((5, 12)), num_classes=10), id="hist-classes"),
        pytest.param(lambda: class_histogram(torch.tensor([0, 11]), num_classes=10), id="hist-labels"),
        pytest.param(lambda: psnr(_IMG, torch.zeros(2, 1, 12, 13)), id="psnr-shape"),
        pytest.param(lambda: ssim(_IMG, torch.zeros(3, 1, 12, 12)), id="ssim-shape"),
        pytest.param(lambda: ssim(_IMG[0], _IMG[0]), id="ssim-3d"),
        pytest.param(lambda: psnr(_IMG, torch.full_like(_IMG, float("nan"))), id="psnr-nan"),
        pytest.param(lambda: psnr(_IMG, _IMG, data_range=0.0), id="psnr-range"),
        pytest.param(lambda: ssim(_IMG, _IMG, win_size=4), id="ssim-even-window"),
        pytest.param(lambda: ssim(torch.zeros(0, 1, 12, 12), torch.zeros(0, 1, 12, 12)), id="ssim-empty"),
    ],
)
def test_user_errors_are_one_line_evaluation_errors(call):
    with pytest.raises(EvaluationError) as info:
        call()
    assert isinstance(info.value, LowbitError) and isinstance(info.value, ValueError)
    msg = str(info.value)
    assert msg and "\n" not in msg

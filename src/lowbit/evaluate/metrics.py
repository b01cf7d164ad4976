"""Sample-quality metrics: FID, KID, precision/recall, Inception Score, PSNR and SSIM.

Every function here is pure (no global state, no model inside): distribution metrics take
feature matrices ``[N, D]`` (torch tensors or numpy arrays) produced by whatever feature
extractor the caller uses, and the paired image metrics take image batches ``[N, C, H, W]``
(float, nominally in [-1, 1], hence ``data_range=2``) that were generated from the *same seeds*
by the full-precision and the quantized model.

Numerics: all statistics are computed in float64. The Fréchet distance never forms the
non-symmetric product ``S1 @ S2``; it takes the eigenvalues of the symmetric PSD matrix
``S1^{1/2} S2 S1^{1/2}`` instead (see :func:`frechet_distance`). Pairwise distances for
precision/recall are computed in row chunks so 10k x 10k sets fit in bounded memory.

References
----------
* Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium" (FID).
* Bińkowski et al. 2018, "Demystifying MMD GANs" (KID).
* Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative
  Models".
* Salimans et al. 2016, "Improved Techniques for Training GANs" (Inception Score).
* Wang et al. 2004, "Image Quality Assessment: From Error Visibility to Structural Similarity"
  (SSIM).

Every user error (empty or non-finite input, wrong shape, mismatched dimensions, too few samples)
raises :class:`~lowbit.errors.EvaluationError` with a one-line message naming the fix.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EvaluationError
from ._validate import _check_finite, _features, _positive_int, _same_dim, _to_tensor
from .image_metrics import psnr, ssim  # re-exported: one namespace for every metric

__all__ = [
    "class_histogram",
    "fid",
    "frechet_distance",
    "gaussian_stats",
    "inception_score",
    "kid",
    "polynomial_kernel",
    "polynomial_mmd2",
    "precision_recall",
    "psnr",
    "ssim",
]

# Elements of one float64 pairwise-distance block in precision_recall (32 MiB); the matmul that
# produces it needs about the same again, so peak extra memory stays around 100 MiB at any N.
_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------
# Fréchet (Inception) Distance
# --------------------------------------------------------------------------------------------

def gaussian_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of a feature matrix, in float64.

    ``mu = (1/N) Σ_i x_i`` and ``sigma = 1/(N-1) Σ_i (x_i - mu)(x_i - mu)ᵀ`` (needs N >= 2).

    Returns numpy arrays ``mu`` [D] and ``sigma`` [D, D] (exactly symmetric).
    """
    x = _features(features, "features", min_samples=2).cpu().numpy()
    mu = x.mean(axis=0)
    xc = x - mu
    sigma = (xc.T @ xc) / (x.shape[0] - 1)
    sigma = 0.5 * (sigma + sigma.T)  # BLAS gemm need not be bit-symmetric
    return mu, sigma


def _vec(v: Any, name: str) -> np.ndarray:
    t = _to_tensor(v, name)
    if t.ndim != 1 or t.numel() == 0:
        raise EvaluationError(f"{name} must be a non-empty 1-D mean vector, got shape {tuple(t.shape)}: use gaussian_stats(features)")
    t = t.to(torch.float64)
    _check_finite(t, name)
    return t.cpu().numpy()


def _cov(s: Any, name: str, d: int) -> np.ndarray:
    t = _to_tensor(s, name)
    if tuple(t.shape) != (d, d):
        raise EvaluationError(f"{name} must be a [{d}, {d}] covariance matching the mean, got shape {tuple(t.shape)}: use gaussian_stats(features)")
    t = t.to(torch.float64)
    _check_finite(t, name)
    m = t.cpu().numpy()
    scale = max(float(np.abs(m).max()), np.finfo(np.float64).tiny)
    if float(np.abs(m - m.T).max()) > 1e-6 * scale:
        raise EvaluationError(f"{name} is not symmetric: pass a covariance matrix, e.g. from gaussian_stats(features)")
    return 0.5 * (m + m.T)


def _psd_eigh(s: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    w, v = np.linalg.eigh(s)
    # Rounding makes eigenvalues of a PSD (possibly rank-deficient, N < D) covariance slightly
    # negative, of order D·eps·||S||. Anything far beyond that is not a covariance matrix.
    if w.size and w[0] < -1e-6 * max(float(np.abs(w).max()), np.finfo(np.float64).tiny):
        raise EvaluationError(
            f"{name} is not positive semi-definite (smallest eigenvalue {w[0]:.3g}): pass a covariance matrix, e.g. from gaussian_stats(features)"
        )
    return np.clip(w, 0.0, None), v


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``  (Dowson & Landau 1982; used as FID by
    Heusel et al. 2017).

    Numerics: the usual implementation calls ``scipy.linalg.sqrtm(S1 @ S2)`` on a non-symmetric
    product, which can return complex values or lose accuracy when the covariances are
    ill-conditioned (N < D). Here ``Tr (S1 S2)^{1/2} = Σ_i sqrt(λ_i)`` where λ_i are the
    eigenvalues of ``S1 S2``, which equal those of the *symmetric PSD* matrix
    ``M = S1^{1/2} S2 S1^{1/2}`` (similar matrices). With ``S1 = V diag(w) Vᵀ`` we form
    ``M' = diag(√w) (Vᵀ S2 V) diag(√w)`` (orthogonally similar to M), take ``eigvalsh`` and clip
    rounding-level negative eigenvalues to 0 before the square root.

    Returns a Python float >= 0.
    """
    m1, m2 = _vec(mu1, "mu1"), _vec(mu2, "mu2")
    if m1.shape != m2.shape:
        raise EvaluationError(f"mu1 has {m1.size} dims but mu2 has {m2.size}: compute both statistics in the same feature space")
    d = m1.size
    s1, s2 = _cov(sigma1, "sigma1", d), _cov(sigma2, "sigma2", d)
    w1, v1 = _psd_eigh(s1, "sigma1")
    _psd_eigh(s2, "sigma2")  # validation only
    sw = np.sqrt(w1)
    m = sw[:, None] * (v1.T @ s2 @ v1) * sw[None, :]
    lam = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = float(np.sqrt(np.clip(lam, 0.0, None)).sum())
    diff = m1 - m2
    value = float(diff @ diff) + float(np.trace(s1)) + float(np.trace(s2)) - 2.0 * tr_covmean
    # The exact value is >= 0; a negative result is cancellation in the trace terms (of order
    # eps·Tr(S1 + S2), e.g. -1e-13 for identical inputs), so clip it to 0.
    return max(value, 0.0)


def fid(feats_a: Any, feats_b: Any) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (each needs >= 2 samples).

    ``fid(a, b) = frechet_distance(*gaussian_stats(a), *gaussian_stats(b))`` (Heusel et al. 2017).
    It is "FID" in the usual sense only when the features are Inception-v3 pool3 features; with
    another feature network it is the same statistic in that network's feature space.
    """
    a = _features(feats_a, "feats_a", min_samples=2)
    b = _same_dim(a, _features(feats_b, "feats_b", min_samples=2), "feats_a", "feats_b")
    mu1, s1 = gaussian_stats(a)
    mu2, s2 = gaussian_stats(b)
    return frechet_distance(mu1, s1, mu2, s2)


# --------------------------------------------------------------------------------------------
# Kernel Inception Distance
# --------------------------------------------------------------------------------------------

def polynomial_kernel(x: Any, y: Any) -> torch.Tensor:
    """KID's cubic polynomial kernel matrix ``k(x, y) = (xᵀy / D + 1)³`` (Bińkowski et al. 2018),
    for ``x`` [M, D] and ``y`` [N, D]; returns float64 [M, N]."""
    tx = _features(x, "x")
    ty = _same_dim(tx, _features(y, "y"), "x", "y")
    return _poly(tx, ty)


def _poly(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2(x: torch.Tensor, y: torch.Tensor, unbiased: bool) -> float:
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = _poly(x, x), _poly(y, y), _poly(x, y)
    if unbiased:
        sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
        syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    else:
        sxx, syy = kxx.mean(), kyy.mean()
    return float(sxx + syy - 2.0 * kxy.mean())


def polynomial_mmd2(x: Any, y: Any, unbiased: bool = True) -> float:
    """Squared MMD between two samples under :func:`polynomial_kernel`.

    Unbiased (U-statistic, Gretton et al. 2012, Lemma 6), needs m, n >= 2:
    ``1/(m(m-1)) Σ_{i≠j} k(x_i,x_j) + 1/(n(n-1)) Σ_{i≠j} k(y_i,y_j) - 2/(mn) Σ_{i,j} k(x_i,y_j)``.
    Its expectation is exactly MMD² (0 for equal distributions), so it can be negative.
    The biased (V-statistic) version keeps the diagonal terms and is positively biased by about
    ``(E k(x,x) - E k(x,x')) (1/m + 1/n)``; it is offered for comparison only.
    """
    need = 2 if unbiased else 1
    tx = _features(x, "x", min_samples=need)
    ty = _same_dim(tx, _features(y, "y", min_samples=need), "x", "y")
    return _mmd2(tx, ty, unbiased)


def kid(feats_a: Any, feats_b: Any, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): mean and std of the unbiased MMD²
    (:func:`polynomial_mmd2`, kernel ``(xᵀy/D + 1)³``) over ``subsets`` random subsets.

    Each subset draws ``m = min(subset_size, N_a, N_b)`` samples *without replacement* from each
    set, with ``numpy.random.default_rng(seed)``, so the result is deterministic for a fixed
    seed. The defaults (100 subsets of 1000) follow the reference implementation and
    torch-fidelity; ``std`` is the population std (ddof=0) over subsets, as there. If
    ``subset_size`` is at least both set sizes every subset is the full set and ``std`` is 0.

    Returns ``(mean, std)`` as Python floats; the mean can be slightly negative for equal
    distributions (the estimator is unbiased).
    """
    a = _features(feats_a, "feats_a")
    b = _same_dim(a, _features(feats_b, "feats_b"), "feats_a", "feats_b")
    subsets = _positive_int(subsets, "subsets")
    subset_size = _positive_int(subset_size, "subset_size", 2)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise EvaluationError(f"seed must be an integer, got {seed!r}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise EvaluationError(f"KID needs at least 2 samples in each set, got {a.shape[0]} and {b.shape[0]}: pass more samples")
    rng = np.random.default_rng(int(seed))
    vals = np.empty(subsets, dtype=np.float64)
    for s in range(subsets):
        ia = torch.from_numpy(rng.choice(a.shape[0], m, replace=False)).to(a.device)
        ib = torch.from_numpy(rng.choice(b.shape[0], m, replace=False)).to(b.device)
        vals[s] = _mmd2(a[ia], b[ib], unbiased=True)
    return float(vals.mean()), float(vals.std())


# --------------------------------------------------------------------------------------------
# Improved precision and recall
# --------------------------------------------------------------------------------------------

def _sq_dists(q: torch.Tensor, q_sq: torch.Tensor, ref: torch.Tensor, ref_sq: torch.Tensor) -> torch.Tensor:
    # ||q - r||² = ||q||² + ||r||² - 2 qᵀr, clamped at 0 against cancellation.
    return (q_sq[:, None] + ref_sq[None, :] - 2.0 * (q @ ref.T)).clamp_min_(0.0)


def _knn_sq_radii(x: torch.Tensor, k: int, rows: int) -> torch.Tensor:
    n = x.shape[0]
    x_sq = (x * x).sum(1)
    radii = torch.empty(n, dtype=x.dtype, device=x.device)
    for i0 in range(0, n, rows):
        i1 = min(i0 + rows, n)
        d = _sq_dists(x[i0:i1], x_sq[i0:i1], x, x_sq)
        r = torch.arange(i1 - i0, device=x.device)
        d[r, r + i0] = float("inf")  # exclude the sample itself (not merely one zero distance)
        radii[i0:i1] = d.kthvalue(k, dim=1).values
    return radii


def _in_manifold(q: torch.Tensor, ref: torch.Tensor, ref_sq_radii: torch.Tensor, rows: int) -> torch.Tensor:
    q_sq, ref_sq = (q * q).sum(1), (ref * ref).sum(1)
    inside = torch.empty(q.shape[0], dtype=torch.bool, device=q.device)
    for i0 in range(0, q.shape[0], rows):
        i1 = min(i0 + rows, q.shape[0])
        d = _sq_dists(q[i0:i1], q_sq[i0:i1], ref, ref_sq)
        inside[i0:i1] = (d <= ref_sq_radii[None, :]).any(1)
    return inside


def precision_recall(real: Any, fake: Any, k: int = 3, chunk_size: int | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set approximates its manifold by the union of Euclidean balls ``B(x_i, r_k(x_i))``,
    where ``r_k(x_i)`` is the distance from ``x_i`` to its k-th nearest neighbour in the same set
    (the sample itself excluded). Then

    * ``precision = (1/|fake|) Σ_f 1[∃ r ∈ real: ||f - r|| <= r_k(r)]`` (fake samples that look real),
    * ``recall    = (1/|real|) Σ_r 1[∃ f ∈ fake: ||r - f|| <= r_k(f)]`` (real samples that are covered).

    Pairwise distances are computed ``chunk_size`` query rows at a time (default: as many rows
    as keep one float64 block at 2**22 elements), so 10k x 10k sets run in ~100 MiB.
    Each set needs more than ``k`` samples. Returns Python floats in [0, 1].
    """
    r = _features(real, "real")
    f = _same_dim(r, _features(fake, "fake"), "real", "fake")
    k = _positive_int(k, "k")
    for t, name in ((r, "real"), (f, "fake")):
        if t.shape[0] <= k:
            raise EvaluationError(f"{name} has {t.shape[0]} samples but k={k} nearest neighbours need more than {k}: pass more samples or lower k")
    if chunk_size is None:
        rows = max(1, _CHUNK_ELEMENTS // max(r.shape[0], f.shape[0]))
    else:
        rows = _positive_int(chunk_size, "chunk_size")
    r_rad, f_rad = _knn_sq_radii(r, k, rows), _knn_sq_radii(f, k, rows)
    precision = _in_manifold(f, r, r_rad, rows).double().mean()
    recall = _in_manifold(r, f, f_rad, rows).double().mean()
    return float(precision), float(recall)


# --------------------------------------------------------------------------------------------
# Inception Score and class histogram
# --------------------------------------------------------------------------------------------

def inception_score(logits: Any, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016) from classifier logits [N, C].

    ``IS = exp( E_x KL(p(y|x) || p(y)) )`` with ``p(y)`` the mean of ``p(y|x)`` over the split.
    Computed in log space: ``log p(y|x) = log_softmax(logits)``,
    ``log p(y) = logsumexp_x log p(y|x) - log n``, and
    ``KL = Σ_y p(y|x) (log p(y|x) - log p(y))`` — stable for very confident logits (0·finite = 0).
    The N samples are cut into ``splits`` contiguous, near-equal parts (``torch.tensor_split``;
    the original code drops the remainder instead); returns the mean and population std
    (ddof=0, as in the original code) of the per-split scores. IS lies in [1, C].
    """
    t = _features(logits, "logits")
    splits = _positive_int(splits, "splits")
    if t.shape[0] < splits:
        raise EvaluationError(f"logits has {t.shape[0]} samples but splits={splits}: pass at least as many samples as splits or lower splits")
    logp = F.log_softmax(t, dim=1)
    scores = []
    for part in torch.tensor_split(logp, splits, dim=0):
        log_py = torch.logsumexp(part, dim=0) - math.log(part.shape[0])
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(math.exp(float(kl)))
    arr = np.asarray(scores)
    return float(arr.mean()), float(arr.std())


def class_histogram(logits: Any, num_classes: int = 10) -> torch.Tensor:
    """Fraction of samples assigned to each class: ``h_c = (1/N) Σ_x 1[argmax logits(x) = c]``.

    ``logits`` is [N, num_classes] (classifier outputs) or a 1-D integer tensor of predicted
    labels in [0, num_classes). Returns float64 [num_classes] summing to 1; a mode-collapsed
    generator shows up as a peaked histogram.
    """
    num_classes = _positive_int(num_classes, "num_classes")
    t = _to_tensor(logits, "logits")
    if t.ndim == 1 and not t.is_floating_point():
        if t.numel() == 0:
            raise EvaluationError("labels are empty: pass at least one sample")
        labels = t.long()
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise EvaluationError(f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]: pass the right num_classes")
    else:
        t = _features(t, "logits")
        if t.shape[1] != num_classes:
            raise EvaluationError(f"logits have {t.shape[1]} classes but num_classes={num_classes}: pass num_classes={t.shape[1]}")
        labels = t.argmax(1)
    counts = torch.bincount(labels.cpu(), minlength=num_classes).to(torch.float64)
    return counts / labels.numel()

"""Input validation shared by the metric modules: one-line EvaluationErrors naming the fix."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import EvaluationError


def _to_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as e:  # ragged lists and the like
            raise EvaluationError(f"{name} is not array-like ({e}): pass a torch tensor or numpy array") from None
        if arr.dtype.kind not in "biuf":
            raise EvaluationError(f"{name} has non-numeric dtype {arr.dtype}: pass a real-valued tensor or array")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise EvaluationError(f"{name} is complex ({t.dtype}): pass real-valued data")
    return t


def _check_finite(t: torch.Tensor, name: str) -> None:
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise EvaluationError(f"{name} contains {bad} NaN/Inf values: drop or fix non-finite entries before computing metrics")


def _features(x: Any, name: str, min_samples: int = 1) -> torch.Tensor:
    """Validate an ``[N, D]`` feature matrix and return it as float64."""
    t = _to_tensor(x, name)
    if t.ndim != 2:
        raise EvaluationError(f"{name} must be a 2-D [N, D] feature matrix, got shape {tuple(t.shape)}: flatten features to [N, D]")
    n, d = t.shape
    if n == 0 or d == 0:
        raise EvaluationError(f"{name} is empty (shape {tuple(t.shape)}): pass at least one sample with at least one feature")
    if n < min_samples:
        raise EvaluationError(f"{name} has {n} sample(s) but at least {min_samples} are needed: pass more samples")
    t = t.to(torch.float64)
    _check_finite(t, name)
    return t


def _same_dim(a: torch.Tensor, b: torch.Tensor, na: str, nb: str) -> torch.Tensor:
    if a.shape[1] != b.shape[1]:
        raise EvaluationError(
            f"{na} has {a.shape[1]} features but {nb} has {b.shape[1]}: extract both with the same feature network"
        )
    return b.to(a.device)


def _positive_int(v: Any, name: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise EvaluationError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)

"""The ``evaluate`` verb: sample every model with the protocol's seeds, then score the images.

Scores (see docs/evaluation.md):
  * against the 10k Fashion-MNIST test images: FID and KID, precision/recall (k = 3), and the
    classifier's Inception Score and class histogram — all in lowbit's classifier feature space;
  * against the FP model's images from the same seeds: FID-to-FP (the FP-reference FID proposed by
    Chen et al. 2024), PSNR and SSIM;
  * noise floors: the FID between two disjoint halves of the test set (at the protocol's sample
    count) and, with several seeds, the FP model's seed-to-seed FID and FID spread.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import EvaluationError
from . import metrics as M
from .features import extract, load_classifier, load_reference
from .protocol import Protocol, get_protocol
from .sampling import sample

FEATURE_SPACE = "lowbit Fashion-MNIST classifier, 128-d penultimate features (not Inception)"


def _stats(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values)) if len(values) > 1 else 0.0


def _real_subset(ref_feats: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """A fixed subset of the test features of the same size as the sample set (precision/recall
    and KID are size-sensitive, so both sides get the same count)."""
    perm = torch.randperm(len(ref_feats), generator=torch.Generator().manual_seed(seed))
    return ref_feats[perm[: min(n, len(ref_feats))]]


def _warm_up(model: nn.Module, scheduler_config: dict, proto: Protocol, shape: tuple[int, ...]) -> float:
    # one sampler step through the same code path as the timed sampling (same batch size, input
    # dtypes and kind of call), so a compiled model meets nothing new afterwards
    batch = min(proto.batch_size, proto.num_samples)
    t0 = time.perf_counter()
    sample(model, scheduler_config, n=batch, seed=0, sampler=proto.sampler, steps=1, batch_size=batch,
           progress=False, shape=shape)
    return time.perf_counter() - t0


def split_half_fid(ref_feats: torch.Tensor, n: int, seed: int = 0) -> float:
    """FID between two disjoint random halves of the test set, each of min(n, N/2) images: the
    smallest FID difference the protocol can resolve at this sample count."""
    perm = torch.randperm(len(ref_feats), generator=torch.Generator().manual_seed(seed))
    k = min(n, len(ref_feats) // 2)
    return M.fid(ref_feats[perm[:k]], ref_feats[perm[k:2 * k]])


def evaluate(models: dict[str, nn.Module], scheduler_config: dict, protocol: "str | Protocol" = "quick", *,
             fp_name: str | None = None, sizes: dict[str, int] | None = None, progress: bool = True,
             save_features: "str | Path | None" = None, shape: tuple[int, ...] = (1, 28, 28),
             features: bool = True, warmup: bool = True) -> dict:
    """Evaluate ``models`` (name → UNet) under ``protocol``; ``fp_name`` (default: the first
    model) is the full-precision reference for FID-to-FP, PSNR and SSIM. ``sizes`` adds
    checkpoint bytes to the results. Returns a JSON-ready dict; grid images are under
    ``result["_grid"]`` (tensors, not written to JSON). ``save_features`` (a folder) also writes
    the FP model's sample features of each seed, so that seeds run in separate processes can be
    combined by :func:`seed_spread`.

    ``shape`` is one sample's (C, H, W). ``features=False`` is for models of other data than
    Fashion-MNIST, for which lowbit has no feature extractor: only the metrics that need none
    are computed (PSNR and SSIM against the FP model's images from the same seeds, sampling
    time), and the results say so.

    ``warmup`` (default) runs one sampler step per model at the sampling batch size before the
    timed sampling, and reports its seconds as ``warmup_seconds``: a compiled model compiles
    there (tens of seconds on an empty inductor cache) and native kernels lay out their weights
    for the batch shape, one-off costs that would otherwise be charged to the first seed's
    sampling time. It changes no image: every model computes each call independently."""
    proto = get_protocol(protocol)
    if not models:
        raise EvaluationError("no models to evaluate: pass at least the FP model")
    fp_name = fp_name or next(iter(models))
    if fp_name not in models:
        raise EvaluationError(f"FP reference {fp_name!r} is not among the models {list(models)}")
    if features:
        clf, ref = load_classifier(), load_reference()
        ref_feats = ref["features"].float()
        ref_mu, ref_sigma = ref["mean"].double().numpy(), ref["cov"].double().numpy()
        real = _real_subset(ref_feats, proto.num_samples)
    order = [fp_name] + [n for n in models if n != fp_name]
    per: dict[str, dict[str, list]] = {n: {} for n in order}
    warm = {}
    if warmup:  # a bar per model: compiling one takes about a minute on an empty inductor cache
        for n in tqdm(order, desc="warm-up (compiled models compile)", unit="model", disable=None if progress else True,
                      leave=False):
            warm[n] = _warm_up(models[n], scheduler_config, proto, shape)
    fp_seed_feats: list[torch.Tensor] = []
    grid: dict[str, torch.Tensor] = {}
    for seed in proto.seeds:
        fp_imgs = fp_feats = None
        for name in order:
            t0 = time.perf_counter()
            imgs = sample(models[name], scheduler_config, n=proto.num_samples, seed=seed, sampler=proto.sampler,
                          steps=proto.steps, batch_size=proto.batch_size, progress=progress,
                          desc=f"{name} seed {seed}", shape=shape)
            secs = time.perf_counter() - t0
            r = per[name]
            r.setdefault("sample_seconds", []).append(secs)
            feats = None
            if features:
                feats, logits = extract(imgs, clf)
                # against the shipped float64 test statistics (computed from fp32 features)
                r.setdefault("fid", []).append(M.frechet_distance(*M.gaussian_stats(feats), ref_mu, ref_sigma))
                r.setdefault("kid", []).append(M.kid(feats, real)[0])
                p, rc = M.precision_recall(real, feats, k=3)
                r.setdefault("precision", []).append(p)
                r.setdefault("recall", []).append(rc)
                r.setdefault("inception_score", []).append(M.inception_score(logits, splits=min(10, len(logits)))[0])
                r.setdefault("class_hist", []).append(M.class_histogram(logits).tolist())
            if name == fp_name:
                fp_imgs, fp_feats = imgs, feats
                if features:
                    fp_seed_feats.append(feats)
                if save_features is not None and features:
                    _save_features(Path(save_features) / f"{name}-seed{seed}.features.safetensors", feats, proto, seed)
            else:
                if features:
                    r.setdefault("fid_to_fp", []).append(M.fid(feats, fp_feats))
                r.setdefault("psnr", []).append(float(M.psnr(imgs, fp_imgs).clamp(max=100).mean()))
                r.setdefault("ssim", []).append(float(M.ssim(imgs, fp_imgs).mean()))
            if seed == proto.seeds[0]:
                grid[name] = imgs[: proto.grid_samples].clone()
    results: dict = {"protocol": proto.to_dict(), "feature_space": FEATURE_SPACE if features else None,
                     "fp_model": fp_name}
    if features:
        results["reference"] = {k: v for k, v in ref["metadata"].items() if k in ("test_accuracy", "classifier_sha256")}
    results["models"] = {}
    for name in order:
        out = {}
        for key, vals in per[name].items():
            if key == "class_hist":
                out[key] = np.mean(vals, axis=0).round(4).tolist()
            else:
                out[key], out[key + "_std"] = _stats(vals)
        out["images_per_s"] = proto.num_samples / out["sample_seconds"]
        if sizes and name in sizes:
            out["bytes"] = sizes[name]
        if name in warm:
            out["warmup_seconds"] = warm[name]
        results["models"][name] = out
    results["_grid"] = grid
    if not features:
        return results
    floors = {"test_split_half_fid": split_half_fid(ref_feats, proto.num_samples)}
    if len(fp_seed_feats) > 1:
        floors["fp_seed_to_seed_fid"] = M.fid(fp_seed_feats[0], fp_seed_feats[1])
        floors["fp_fid_seed_std"] = results["models"][fp_name]["fid_std"]
    results["noise_floor"] = floors
    return results


def _save_features(path: Path, feats: torch.Tensor, proto: Protocol, seed: int) -> None:
    from safetensors.torch import save as st_save

    from ..io import atomic_write

    meta = {"protocol": json.dumps(proto.to_dict()), "seed": str(seed), "feature_space": FEATURE_SPACE}
    atomic_write(path, st_save({"features": feats.float().contiguous()}, metadata=meta))


def seed_spread(paths: "list[str | Path]") -> dict:
    """Combine FP sample features saved by separate ``evaluate(..., save_features=)`` runs (one
    seed each, same protocol otherwise): FID*, precision and recall per seed with mean ± std,
    the seed-to-seed FID* of the first two seeds, and the test split-half floor."""
    from ..io import read_safetensors

    if len(paths) < 2:
        raise EvaluationError("seed_spread needs the feature files of at least two seeds")
    ref = load_reference()
    ref_feats = ref["features"].float()
    mu, sigma = ref["mean"].double().numpy(), ref["cov"].double().numpy()
    runs, protos = [], set()
    for p in paths:
        meta, t = read_safetensors(Path(p), "sample features", "re-run lowbit evaluate --save-features")
        if "features" not in t or "seed" not in meta:
            raise EvaluationError(f"{p} is not a features file written by lowbit evaluate --save-features")
        p_meta = json.loads(meta["protocol"])
        p_meta.pop("seeds", None)
        protos.add(json.dumps(p_meta, sort_keys=True))
        runs.append((int(meta["seed"]), t["features"].float()))
    if len(protos) != 1:
        raise EvaluationError("the feature files come from different protocols; combine runs of one protocol only")
    n = len(runs[0][1])
    real = _real_subset(ref_feats, n)
    per = {"fid": [], "precision": [], "recall": []}
    for _, f in runs:
        per["fid"].append(M.frechet_distance(*M.gaussian_stats(f), mu, sigma))
        p, r = M.precision_recall(real, f, k=3)
        per["precision"].append(p)
        per["recall"].append(r)
    out = {"seeds": [s for s, _ in runs], "num_samples": n, "protocol": json.loads(protos.pop()),
           "feature_space": FEATURE_SPACE}
    for k, v in per.items():
        out[k + "_per_seed"] = v
        out[k], out[k + "_std"] = _stats(v)
    out["fp_seed_to_seed_fid"] = M.fid(runs[0][1], runs[1][1])
    out["test_split_half_fid"] = split_half_fid(ref_feats, n)
    return out

"""lowbit's own feature space for Fashion-MNIST: a small CNN classifier and reference statistics.

lowbit scores its Fashion-MNIST diffusion model (and every quantized version of it) with FID,
KID and precision/recall. Those metrics need a feature extractor. The usual one, Inception-v3
trained on ImageNet, has no weights available offline and knows nothing about 28×28 grey clothes.
So lowbit ships its own: :class:`FashionClassifier`, a 140k-parameter CNN trained on the 60k
Fashion-MNIST training images (``python -m lowbit.evaluate.train_classifier``; model card in
``lowbit/zoo/CLASSIFIER.md``). It ships with reference statistics of the 10k test images.

**An FID computed here is "FID in lowbit's Fashion-MNIST classifier feature space"**, not standard
Inception FID. Its values cannot be compared with published FIDs, or with FIDs from another
classifier. They can be compared with each other: the same shipped classifier, the same
reference statistics and the same number of samples.

Feature definition (the analogue of Inception's 2048-d ``pool3``): the output of the last conv
block, ``ReLU(conv5(·))`` on the 7×7 map, global-average-pooled to a 128-d vector. It is the
input of the final ``Linear(128, 10)``, so every feature is >= 0. Inputs are ``[N, 1, 28, 28]``
float images in ``[-1, 1]``. That is the diffusion model's range, and what
:func:`lowbit.data.to_model_range` gives.

Files (in ``lowbit/zoo/``):

* ``fmnist_classifier.safetensors``: the weights, fp16. :func:`load_classifier` casts them to
  fp32 and returns the model in eval mode. The network has no normalisation layers (BatchNorm
  used in training is folded into the convolutions on export), so there is no
  train/eval-dependent state.
* ``fmnist_test_features.safetensors``: the reference, loaded by :func:`load_reference`. It
  holds ``features`` (fp16 ``[10000, 128]``), ``labels`` (int64 ``[10000]``), and ``mean``
  (float64 ``[128]``) and ``cov`` (float64 ``[128, 128]``, unbiased, ``ddof=1``). ``mean`` and
  ``cov`` were computed in float64 from the fp32 features, before the fp16 cast. The metadata
  records the SHA-256 of the classifier file the features came from and a SHA-256 over the
  tensors and metadata, so a reference from another classifier or a damaged file is refused.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from lowbit.errors import CheckpointError, EvaluationError
from lowbit.io import read_safetensors

__all__ = [
    "CLASSIFIER_PATH",
    "FEATURE_DIM",
    "NUM_CLASSES",
    "REFERENCE_PATH",
    "EvaluationError",
    "FashionClassifier",
    "extract",
    "file_sha256",
    "load_classifier",
    "load_reference",
    "save_classifier",
    "save_reference",
]

#: Width of the feature vector returned by :meth:`FashionClassifier.features`.
FEATURE_DIM = 128
#: Number of Fashion-MNIST classes (logit width).
NUM_CLASSES = 10

_ZOO = Path(__file__).resolve().parent.parent / "zoo"
#: The shipped classifier weights (fp16 safetensors).
CLASSIFIER_PATH = _ZOO / "fmnist_classifier.safetensors"
#: The shipped reference statistics of the 10k Fashion-MNIST test images.
REFERENCE_PATH = _ZOO / "fmnist_test_features.safetensors"

CLASSIFIER_FORMAT = "lowbit-fmnist-classifier/1"
REFERENCE_FORMAT = "lowbit-fmnist-reference/1"

FEATURE_DEFINITION = (
    "ReLU(conv5) on the 7x7 map, global average pool -> 128-d (input of the final Linear(128, 10)); "
    "inputs [N,1,28,28] in [-1,1]"
)

_RETRAIN = "`python -m lowbit.evaluate.train_classifier`"
_REGENERATE = "`python -m lowbit.evaluate.train_classifier --reference-only`"
# Inputs may exceed [-1, 1] by this much (rounding in fp16/bf16 samples); more is a range mistake.
_RANGE_TOL = 1e-2


class FashionClassifier(nn.Module):
    """Small CNN for Fashion-MNIST, 1×28×28 inputs in [-1, 1]; 140,138 parameters.

    ``conv1(1→32) → conv2(32→32) → maxpool → conv3(32→64) → conv4(64→64) → maxpool →
    conv5(64→128) → global avg pool → fc(128→10)``. Every conv is 3×3 with padding 1, followed
    by ReLU.

    With ``batchnorm=True`` each conv is bias-free and followed by a BatchNorm. That variant is
    used only for training. :meth:`fold_batchnorm` turns it into the plain network that is
    shipped.
    """

    CHANNELS = ((1, 32), (32, 32), (32, 64), (64, 64), (64, 128))

    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        self.batchnorm = batchnorm
        for i, (cin, cout) in enumerate(self.CHANNELS, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm))
            if batchnorm:
                setattr(self, f"bn{i}", nn.BatchNorm2d(cout))
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = getattr(self, f"conv{i}")(x)
        if self.batchnorm:
            x = getattr(self, f"bn{i}")(x)
        return torch.relu(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [N, 128]: ReLU(conv5) global-average-pooled (all >= 0)."""
        x = self._block(2, self._block(1, x))
        x = nn.functional.max_pool2d(x, 2)
        x = self._block(4, self._block(3, x))
        x = nn.functional.max_pool2d(x, 2)
        x = self._block(5, x)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N, 10]."""
        return self.fc(self.features(x))

    @torch.no_grad()
    def fold_batchnorm(self) -> FashionClassifier:
        """A plain (``batchnorm=False``) copy, with each BatchNorm's running statistics folded
        into its conv: ``w' = w·γ/√(var+ε)``, ``b' = β − mean·γ/√(var+ε)``. Eval outputs match."""
        if not self.batchnorm:
            raise EvaluationError("fold_batchnorm needs a FashionClassifier(batchnorm=True)")
        plain = FashionClassifier(batchnorm=False).to(self.fc.weight.device)
        for i in range(1, len(self.CHANNELS) + 1):
            conv, bn, out = getattr(self, f"conv{i}"), getattr(self, f"bn{i}"), getattr(plain, f"conv{i}")
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            out.weight.copy_(conv.weight * scale[:, None, None, None])
            out.bias.copy_(bn.bias - bn.running_mean * scale)
        plain.fc.load_state_dict(self.fc.state_dict())
        return plain.eval()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read(path: Path, what: str, fmt: str, fix: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Read a shipped safetensors file and check that its metadata names format ``fmt``."""
    meta, tensors = read_safetensors(path, what, fix)
    if meta.get("format") != fmt:
        raise CheckpointError(f"{path} is not a lowbit {what} file (format {meta.get('format')!r}, expected {fmt!r}); {fix}")
    return meta, tensors


# ----------------------------------------------------------------------------------- classifier


def save_classifier(model: FashionClassifier, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a plain (no-BatchNorm) classifier as fp16 safetensors, atomically."""
    from lowbit.io import atomic_write

    if model.batchnorm:
        raise EvaluationError("save a plain classifier: call fold_batchnorm() on the training model first")
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": CLASSIFIER_FORMAT, "feature_definition": FEATURE_DEFINITION}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    path = Path(path)
    atomic_write(path, safetensors.torch.save(tensors, metadata=meta))
    return path


def load_classifier(path: str | Path | None = None) -> FashionClassifier:
    """Load the shipped classifier (or the one at ``path``), in fp32 and in eval mode.

    The file's metadata (test accuracy, epochs, seed, …) is attached as ``model.metadata``.
    Raises :class:`CheckpointError` when the file is missing or damaged, or holds other tensors.
    """
    path = Path(CLASSIFIER_PATH if path is None else path)
    fix = f"reinstall lowbit or retrain with {_RETRAIN}"
    meta, tensors = _read(path, "Fashion-MNIST classifier", CLASSIFIER_FORMAT, fix)
    model = FashionClassifier()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        detail = (
            f"missing {missing[0]!r}" if missing
            else f"unexpected {extra[0]!r}" if extra
            else f"{wrong[0]!r} has shape {list(got[wrong[0]])}, expected {list(expected[wrong[0]])}"
        )
        raise CheckpointError(f"{path} does not fit FashionClassifier ({detail}); {fix}")
    for k, v in tensors.items():
        if not v.is_floating_point() or not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{path}: tensor {k!r} is not finite floating point; {fix}")
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    model.metadata = meta
    return model.eval()


@functools.lru_cache(maxsize=1)
def _default_classifier() -> FashionClassifier:
    return load_classifier()


# ----------------------------------------------------------------------------------- extraction


def _check_images(images: object) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise EvaluationError(
            f"expected a torch.Tensor of images [N, 1, 28, 28] in [-1, 1], got {type(images).__name__}; "
            "convert with torch.as_tensor (uint8 pixels: lowbit.data.to_model_range)"
        )
    if not images.is_floating_point():
        raise EvaluationError(
            f"expected float images in [-1, 1], got dtype {images.dtype}; "
            "convert uint8 pixels with lowbit.data.to_model_range"
        )
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise EvaluationError(
            f"expected images of shape [N, 1, 28, 28], got {list(images.shape)}; "
            "add the channel dimension with images.unsqueeze(1)"
        )
    if images.shape[0] == 0:
        raise EvaluationError("got an empty batch (N = 0); pass at least one image")
    if not bool(torch.isfinite(images).all()):
        n_bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
        raise EvaluationError(
            f"{n_bad} of {images.shape[0]} images contain NaN or Inf; drop them or fix the sampler "
            "(a diverged or badly quantized model produces these)"
        )
    lo, hi = float(images.min()), float(images.max())
    if lo < -1 - _RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise EvaluationError(
            f"images span [{lo:.3g}, {hi:.3g}], expected [-1, 1] (the diffusion model's range); "
            "clamp samples to [-1, 1] or map uint8 pixels with lowbit.data.to_model_range"
        )
    return images


@torch.no_grad()
def extract(
    images: torch.Tensor, classifier: FashionClassifier | None = None, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits of ``images`` (float ``[N, 1, 28, 28]`` in ``[-1, 1]``).

    Returns ``(features, logits)``: float32 ``[N, 128]`` and ``[N, 10]``, on the CPU. Runs on the
    classifier's device, in batches of ``batch_size``. Uses the shipped classifier when
    ``classifier`` is None. Raises :class:`EvaluationError` for a wrong shape or dtype, an empty
    batch, non-finite values, or values outside [-1, 1].
    """
    images = _check_images(images)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size must be a positive int, got {batch_size!r}")
    model = _default_classifier() if classifier is None else classifier
    if model.training:
        raise EvaluationError("the classifier is in training mode; call classifier.eval() first")
    device = next(model.parameters()).device
    feats, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device=device, dtype=torch.float32)
        f = model.features(x)
        feats.append(f.float().cpu())
        logits.append(model.fc(f).float().cpu())
    return torch.cat(feats), torch.cat(logits)


# ----------------------------------------------------------------------------------- reference

_REFERENCE_SHAPES = {
    "features": (None, FEATURE_DIM),
    "labels": (None,),
    "mean": (FEATURE_DIM,),
    "cov": (FEATURE_DIM, FEATURE_DIM),
}
_REFERENCE_DTYPES = {
    "features": torch.float16,
    "labels": torch.int64,
    "mean": torch.float64,
    "cov": torch.float64,
}


def _reference_digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_reference(
    path: str | Path,
    features: torch.Tensor,
    labels: torch.Tensor,
    classifier_path: str | Path | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write reference statistics of fp32 ``features`` [N, 128] (with their ``labels``), atomically.

    ``mean`` and ``cov`` (``ddof=1``) are computed in float64 from the fp32 features, and then
    the features are stored as fp16. The metadata records the SHA-256 of ``classifier_path``
    (default: the shipped classifier) and a checksum over everything.
    """
    from lowbit.io import atomic_write

    if features.dim() != 2 or features.shape[1] != FEATURE_DIM or features.shape[0] < 2:
        raise EvaluationError(f"reference features must be [N >= 2, {FEATURE_DIM}], got {list(features.shape)}")
    if labels.shape != (features.shape[0],):
        raise EvaluationError(f"labels must be [{features.shape[0]}], got {list(labels.shape)}")
    if not bool(torch.isfinite(features).all()):
        raise EvaluationError("reference features contain NaN or Inf; check the classifier")
    f64 = features.detach().cpu().double()
    mean = f64.mean(0)
    centred = f64 - mean
    cov = centred.T @ centred / (f64.shape[0] - 1)
    cov = (cov + cov.T) / 2
    classifier_path = Path(CLASSIFIER_PATH if classifier_path is None else classifier_path)
    tensors = {
        "features": features.detach().cpu().float().to(torch.float16).contiguous(),
        "labels": labels.detach().cpu().to(torch.int64).contiguous(),
        "mean": mean.contiguous(),
        "cov": cov.contiguous(),
    }
    meta = {
        "format": REFERENCE_FORMAT,
        "classifier_file": classifier_path.name,
        "classifier_sha256": file_sha256(classifier_path),
        "n": str(features.shape[0]),
        "feature_definition": FEATURE_DEFINITION,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "how_computed": (
            "features = extract(images) with load_classifier() (fp16 weights cast to fp32); "
            "mean/cov (ddof=1) in float64 from the fp32 features; features then stored as fp16"
        ),
    }
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    meta["checksum"] = _reference_digest(meta, tensors)
    path = Path(path)
    atomic_write(path, safetensors.torch.save(tensors, metadata=meta))
    return path


def load_reference(path: str | Path | None = None, classifier_path: str | Path | None = None) -> dict:
    """Load reference statistics (default: the shipped 10k test-set reference).

    Returns a dict with ``features`` (float32 ``[N, 128]``, widened from the stored fp16),
    ``labels`` (int64 ``[N]``), ``mean`` (float64 ``[128]``), ``cov`` (float64 ``[128, 128]``)
    and ``metadata`` (dict of str). Raises :class:`CheckpointError` when the file is missing or
    damaged, or was computed with a classifier other than the one at ``classifier_path``
    (default: the shipped classifier).
    """
    path = Path(REFERENCE_PATH if path is None else path)
    fix = f"reinstall lowbit or regenerate it with {_REGENERATE}"
    meta, tensors = _read(path, "reference statistics", REFERENCE_FORMAT, fix)
    if set(tensors) != set(_REFERENCE_SHAPES):
        raise CheckpointError(
            f"{path} holds tensors {sorted(tensors)}, expected {sorted(_REFERENCE_SHAPES)}; {fix}"
        )
    n = tensors["features"].shape[0] if tensors["features"].dim() >= 1 else -1
    for k, shape in _REFERENCE_SHAPES.items():
        want = tuple(n if d is None else d for d in shape)
        t = tensors[k]
        if tuple(t.shape) != want or t.dtype != _REFERENCE_DTYPES[k]:
            raise CheckpointError(
                f"{path}: {k!r} is {t.dtype} {list(t.shape)}, expected {_REFERENCE_DTYPES[k]} {list(want)}; {fix}"
            )
    if n < 2 or meta.get("n") != str(n):
        raise CheckpointError(f"{path}: metadata n={meta.get('n')!r} does not match {n} feature rows; {fix}")
    if meta.get("checksum") != _reference_digest(meta, tensors):
        raise CheckpointError(f"{path} fails its checksum (the file is corrupted or was edited); {fix}")
    classifier_path = Path(CLASSIFIER_PATH if classifier_path is None else classifier_path)
    if not classifier_path.is_file():
        raise CheckpointError(
            f"Fashion-MNIST classifier not found at {classifier_path}; reinstall lowbit or retrain with {_RETRAIN}"
        )
    sha = file_sha256(classifier_path)
    if meta.get("classifier_sha256") != sha:
        raise CheckpointError(
            f"reference statistics {path.name} were computed with a different classifier "
            f"(sha256 {str(meta.get('classifier_sha256'))[:12]}…, {classifier_path.name} has {sha[:12]}…); "
            f"regenerate them with {_REGENERATE}"
        )
    for k in ("features", "mean", "cov"):
        if not bool(torch.isfinite(tensors[k]).all()):
            raise CheckpointError(f"{path}: {k!r} contains NaN or Inf; {fix}")
    return {
        "features": tensors["features"].float(),
        "labels": tensors["labels"],
        "mean": tensors["mean"],
        "cov": tensors["cov"],
        "metadata": meta,
    }

"""Tests of lowbit's Fashion-MNIST feature space: the shipped classifier and reference statistics.

The tests use only the shipped files and random tensors, never the Debian dataset (CI lacks it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

import lowbit.errors
from lowbit.errors import CheckpointError, LowbitError
from lowbit.evaluate.features import (
    CLASSIFIER_PATH,
    FEATURE_DIM,
    REFERENCE_PATH,
    EvaluationError,
    FashionClassifier,
    extract,
    file_sha256,
    load_classifier,
    load_reference,
    save_classifier,
    save_reference,
)
from lowbit.evaluate.train_classifier import random_shift


@pytest.fixture(scope="module")
def classifier() -> FashionClassifier:
    return load_classifier()


@pytest.fixture(scope="module")
def reference() -> dict:
    return load_reference()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g) * 2 - 1


# ------------------------------------------------------------------------------ shipped classifier


def test_shipped_files_are_small():
    assert CLASSIFIER_PATH.stat().st_size < 4_000_000
    assert REFERENCE_PATH.stat().st_size < 4_000_000


def test_classifier_loads_fp32_eval(classifier):
    assert not classifier.training
    assert not classifier.batchnorm
    assert all(p.dtype == torch.float32 for p in classifier.parameters())
    n_params = sum(p.numel() for p in classifier.parameters())
    assert n_params <= 300_000
    assert int(classifier.metadata["param_count"]) == n_params


def test_features_shape_deterministic_and_consistent(classifier):
    x = _images(7)
    f1, l1 = extract(x, classifier)
    f2, l2 = extract(x.clone(), classifier)
    assert f1.shape == (7, FEATURE_DIM) and l1.shape == (7, 10)
    assert f1.dtype == torch.float32 and l1.dtype == torch.float32
    assert torch.equal(f1, f2) and torch.equal(l1, l2)
    assert (f1 >= 0).all()  # after ReLU + average pool
    with torch.no_grad():
        assert torch.allclose(classifier.features(x), f1, atol=1e-6)
        assert torch.allclose(classifier(x), l1, atol=1e-5)
    # default classifier = the shipped one; batching does not change the answer beyond rounding
    f3, _ = extract(x, batch_size=3)
    assert torch.allclose(f1, f3, atol=1e-5)


def test_recorded_accuracy(classifier, reference):
    assert float(classifier.metadata["test_accuracy"]) >= 0.90
    assert float(reference["metadata"]["test_accuracy"]) >= 0.90
    per_class = json.loads(classifier.metadata["per_class_accuracy"])
    assert len(per_class) == 10


# ------------------------------------------------------------------------------ shipped reference


def test_reference_shapes(reference):
    assert reference["features"].shape == (10_000, FEATURE_DIM)
    assert reference["labels"].shape == (10_000,)
    assert reference["mean"].shape == (FEATURE_DIM,) and reference["mean"].dtype == torch.float64
    assert reference["cov"].shape == (FEATURE_DIM, FEATURE_DIM) and reference["cov"].dtype == torch.float64
    assert torch.bincount(reference["labels"], minlength=10).tolist() == [1000] * 10
    assert reference["metadata"]["classifier_sha256"] == file_sha256(CLASSIFIER_PATH)


def test_reference_mean_cov_match_features(reference):
    f = reference["features"].double()  # stored fp16
    mean, cov = reference["mean"], reference["cov"]
    scale_m, scale_c = mean.abs().max(), cov.abs().max()
    assert torch.allclose(f.mean(0), mean, rtol=0, atol=1e-3 * float(scale_m))
    assert torch.allclose(torch.cov(f.T), cov, rtol=0, atol=2e-3 * float(scale_c))
    assert torch.equal(cov, cov.T)
    eig = torch.linalg.eigvalsh(cov)
    assert float(eig.min()) >= -1e-9 * float(eig.max())


# ------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(2, 28, 28), "shape"),
        (torch.zeros(2, 3, 28, 28), "shape"),
        (torch.zeros(2, 1, 32, 32), "shape"),
        (torch.zeros(0, 1, 28, 28), "empty"),
        (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "to_model_range"),
        (torch.full((2, 1, 28, 28), 255.0), r"\[-1, 1\]"),
    ],
)
def test_extract_rejects_bad_input(classifier, bad, match):
    with pytest.raises(EvaluationError, match=match):
        extract(bad, classifier)


def test_extract_rejects_nan(classifier):
    x = _images(3)
    x[1, 0, 5, 5] = float("nan")
    with pytest.raises(EvaluationError, match="1 of 3 images contain NaN"):
        extract(x, classifier)
    x[1, 0, 5, 5] = float("inf")
    with pytest.raises(LowbitError):
        extract(x, classifier)


def test_error_class_is_the_shared_one():
    assert EvaluationError is lowbit.errors.EvaluationError
    assert issubclass(EvaluationError, LowbitError) and issubclass(EvaluationError, ValueError)


# ------------------------------------------------------------------------------ damaged files


def test_missing_classifier_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*retrain with `python -m lowbit.evaluate.train_classifier`"):
        load_classifier(tmp_path / "nope.safetensors")


def test_classifier_with_wrong_tensors(tmp_path, classifier):
    state = {k: v.half() for k, v in classifier.state_dict().items()}
    meta = dict(classifier.metadata)
    wrong_shape = dict(state, **{"fc.weight": torch.zeros(11, FEATURE_DIM, dtype=torch.float16)})
    safetensors.torch.save_file(wrong_shape, tmp_path / "a.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match="'fc.weight' has shape"):
        load_classifier(tmp_path / "a.safetensors")
    missing = {k: v for k, v in state.items() if k != "conv3.bias"}
    safetensors.torch.save_file(missing, tmp_path / "b.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match="missing 'conv3.bias'"):
        load_classifier(tmp_path / "b.safetensors")
    (tmp_path / "c.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="damaged"):
        load_classifier(tmp_path / "c.safetensors")


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    data[offset + 1] ^= 0x55
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["data_start", "data_end", "header"])
def test_corrupted_reference(tmp_path, where):
    bad = tmp_path / "ref.safetensors"
    shutil.copy(REFERENCE_PATH, bad)
    size = bad.stat().st_size
    header_len = int.from_bytes(bad.read_bytes()[:8], "little")
    offset = {"data_start": 8 + header_len + 10, "data_end": size - 10, "header": 20}[where]
    _flip(bad, offset)
    with pytest.raises(CheckpointError, match="corrupted|damaged|not a lowbit|expected"):
        load_reference(bad)


def test_truncated_and_missing_reference(tmp_path):
    bad = tmp_path / "ref.safetensors"
    bad.write_bytes(REFERENCE_PATH.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="damaged"):
        load_reference(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_reference(tmp_path / "missing.safetensors")


def test_reference_for_another_classifier(tmp_path, classifier):
    # A retrained classifier (here: perturbed weights) no longer matches the shipped statistics.
    other = FashionClassifier()
    other.load_state_dict(classifier.state_dict())
    with torch.no_grad():
        other.fc.bias.add_(0.5)
    other_path = save_classifier(other, tmp_path / "other.safetensors", metadata={"test_accuracy": "0.5"})
    assert load_classifier(other_path).metadata["test_accuracy"] == "0.5"
    with pytest.raises(CheckpointError, match="different classifier.*regenerate them with"):
        load_reference(classifier_path=other_path)


def test_reference_with_edited_classifier_sha(tmp_path, reference):
    # A reference file whose recorded sha256 names another classifier, with a valid checksum.
    ref = tmp_path / "ref.safetensors"
    save_reference(ref, reference["features"][:50], reference["labels"][:50])
    assert load_reference(ref)["features"].shape == (50, FEATURE_DIM)
    meta_other = {"classifier_sha256": "0" * 64}
    save_reference(ref, reference["features"][:50], reference["labels"][:50], metadata=meta_other)
    with pytest.raises(CheckpointError, match="different classifier"):
        load_reference(ref)


def test_save_reference_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(1)
    feats = torch.rand(64, FEATURE_DIM, generator=g) * 3
    labels = torch.arange(64) % 10
    path = save_reference(tmp_path / "r.safetensors", feats, labels)
    ref = load_reference(path)
    f64 = feats.double()
    assert torch.allclose(ref["mean"], f64.mean(0), atol=1e-12)  # from fp32, not from fp16
    assert torch.allclose(ref["cov"], torch.cov(f64.T), atol=1e-12)
    assert torch.equal(ref["features"], feats.half().float())
    assert torch.equal(ref["labels"], labels)


# ------------------------------------------------------------------------------ training helpers


def test_fold_batchnorm_matches_eval_model():
    torch.manual_seed(0)
    m = FashionClassifier(batchnorm=True)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.5, 0.5)
    m.eval()
    plain = m.fold_batchnorm()
    x = _images(4)
    with torch.no_grad():
        assert torch.allclose(m(x), plain(x), atol=1e-5)
    assert set(plain.state_dict()) == set(FashionClassifier().state_dict())


def test_random_shift_is_a_translation_with_background_fill():
    x = _images(16, seed=3)
    s = random_shift(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    for b in range(16):
        assert any(
            torch.equal(padded[b, :, dy : dy + 28, dx : dx + 28], s[b]) for dy in range(5) for dx in range(5)
        )

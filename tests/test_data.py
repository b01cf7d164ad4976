"""Tests of the Fashion-MNIST idx reader on tiny idx files written here (not the Debian package)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.data import (
    FASHION_MNIST_CLASSES,
    DataError,
    load_fashion_mnist,
    read_idx,
    to_model_range,
)
from lowbit.errors import LowbitError


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def _write(path: Path, payload: bytes) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(payload)
    return path


def _fake_split(root: Path, split: str, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    _write(root / f"{prefix}-images-idx3-ubyte.gz", _idx_bytes(images))
    _write(root / f"{prefix}-labels-idx1-ubyte.gz", _idx_bytes(labels))
    return images, labels


def test_classes() -> None:
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"


@pytest.mark.parametrize("split", ["train", "test"])
def test_load_roundtrip(tmp_path: Path, split: str) -> None:
    images, labels = _fake_split(tmp_path, split)
    x, y = load_fashion_mnist(split, root=tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (5, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (5,)
    assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)


def test_env_var_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_split(tmp_path, "test", n=3)
    monkeypatch.setenv("LOWBIT_FASHION_MNIST_DIR", str(tmp_path))
    x, _ = load_fashion_mnist("test")
    assert x.shape == (3, 28, 28)


def test_uncompressed_idx(tmp_path: Path) -> None:
    labels = np.array([1, 2, 3], dtype=np.uint8)
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(_idx_bytes(labels))
    assert np.array_equal(read_idx(path, expected_ndim=1), labels)


def test_missing_files_say_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path / "nowhere")


def test_wrong_magic(tmp_path: Path) -> None:
    # A labels file (idx1) where an images file (idx3) is expected.
    path = _write(tmp_path / "x.gz", _idx_bytes(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(DataError, match="magic"):
        read_idx(path, expected_ndim=3)
    # Non-uint8 dtype code (0x0D = float32).
    path = _write(tmp_path / "y.gz", _idx_bytes(np.zeros(4, dtype=np.uint8), magic=0x0D01))
    with pytest.raises(DataError, match="magic"):
        read_idx(path, expected_ndim=1)


def test_truncated_data(tmp_path: Path) -> None:
    payload = _idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    path = _write(tmp_path / "short.gz", payload[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path, expected_ndim=3)


def test_truncated_header(tmp_path: Path) -> None:
    payload = _idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    path = _write(tmp_path / "header.gz", payload[:9])
    with pytest.raises(DataError, match="header"):
        read_idx(path, expected_ndim=3)


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    path = _write(tmp_path / "cut.gz", _idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8)))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="damaged"):
        read_idx(path, expected_ndim=3)


def test_wrong_image_size(tmp_path: Path) -> None:
    _write(tmp_path / "t10k-images-idx3-ubyte.gz", _idx_bytes(np.zeros((2, 32, 32), np.uint8)))
    _write(tmp_path / "t10k-labels-idx1-ubyte.gz", _idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(DataError, match="28, 28"):
        load_fashion_mnist("test", root=tmp_path)


def test_count_mismatch(tmp_path: Path) -> None:
    _write(tmp_path / "t10k-images-idx3-ubyte.gz", _idx_bytes(np.zeros((2, 28, 28), np.uint8)))
    _write(tmp_path / "t10k-labels-idx1-ubyte.gz", _idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match="labels"):
        load_fashion_mnist("test", root=tmp_path)


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="split"):
        load_fashion_mnist("validation", root=tmp_path)


def test_to_model_range() -> None:
    x = torch.tensor([[[0, 255], [127, 128]]], dtype=torch.uint8)
    y = to_model_range(x)
    assert y.shape == (1, 1, 2, 2) and y.dtype == torch.float32
    assert y.min().item() == -1.0 and y.max().item() == 1.0
    assert to_model_range(x.unsqueeze(1)).shape == (1, 1, 2, 2)
    with pytest.raises(DataError):
        to_model_range(y)

"""Fashion-MNIST loading for lowbit's bundled model and its calibration data.

The images come from the Debian package ``dataset-fashion-mnist`` (four gzip-compressed idx
files under ``/usr/share/datasets/fashion-mnist/``). The idx format is parsed here with
``gzip`` + ``numpy`` so that lowbit needs neither torchvision nor network access.

idx format (http://yann.lecun.com/exdb/mnist/): a big-endian header ``0x00 0x00 <dtype> <ndim>``
followed by ``ndim`` big-endian uint32 dimension sizes, then the raw data. Fashion-MNIST uses
dtype 0x08 (uint8): labels are ``idx1`` (magic 2049), images are ``idx3`` (magic 2051).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import DataError

#: Where the Debian package puts the files; ``LOWBIT_FASHION_MNIST_DIR`` overrides it.
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")

#: The 10 class names, indexed by label (from the Fashion-MNIST README).
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_IDX_UBYTE = 0x08
_MAGIC_LABELS = 0x00000801  # 2049: uint8, 1 dimension
_MAGIC_IMAGES = 0x00000803  # 2051: uint8, 3 dimensions


def _install_hint() -> str:
    return "install them with `apt-get install dataset-fashion-mnist` (or `make data`)"


def read_idx(path: str | os.PathLike[str], expected_ndim: int) -> np.ndarray:
    """Read one (optionally gzip-compressed) uint8 idx file into a numpy array.

    Raises :class:`DataError` when the file is missing, has a wrong magic number, or holds
    fewer/more bytes than its header promises (a truncated download or a wrong file).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Fashion-MNIST file not found: {path}; {_install_hint()}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # gzip raises these on a truncated/corrupt stream
        raise DataError(
            f"cannot read {path} ({exc}); the file is damaged, reinstall it with "
            "`apt-get install --reinstall dataset-fashion-mnist`"
        ) from None
    if len(raw) < 4:
        raise DataError(f"{path} is too short to be an idx file; reinstall dataset-fashion-mnist")
    magic = int.from_bytes(raw[:4], "big")
    zero, dtype_code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zero != 0 or dtype_code != _IDX_UBYTE or ndim != expected_ndim:
        expected = (_IDX_UBYTE << 8) | expected_ndim
        raise DataError(
            f"{path} has idx magic 0x{magic:08x}, expected 0x{expected:08x} "
            f"(uint8, {expected_ndim}-D); pass the right Fashion-MNIST file"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path} ends inside its idx header; reinstall dataset-fashion-mnist")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    n_expected = int(np.prod(shape, dtype=np.int64))
    n_actual = len(raw) - header_len
    if n_actual != n_expected:
        raise DataError(
            f"{path} holds {n_actual} data bytes but its header {shape} needs {n_expected} "
            "(truncated or corrupt); reinstall dataset-fashion-mnist"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape).copy()


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a Fashion-MNIST split.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        root: directory holding the four ``*-ubyte.gz`` files; defaults to
            ``$LOWBIT_FASHION_MNIST_DIR`` or ``/usr/share/datasets/fashion-mnist``.

    Returns:
        ``(images, labels)``: uint8 ``[N, 28, 28]`` and int64 ``[N]``.
    """
    if split not in _FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    if root is None:
        root = os.environ.get("LOWBIT_FASHION_MNIST_DIR", DEFAULT_DIR)
    root = Path(root)
    image_name, label_name = _FILES[split]
    images = read_idx(root / image_name, expected_ndim=3)
    labels = read_idx(root / label_name, expected_ndim=1)
    if images.shape[1:] != (28, 28):
        raise DataError(
            f"{root / image_name} has images of size {images.shape[1:]}, expected (28, 28); "
            "point at the Fashion-MNIST files"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{split} split has {images.shape[0]} images but {labels.shape[0]} labels; "
            "reinstall dataset-fashion-mnist"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{root / label_name} has labels >= 10; point at the Fashion-MNIST files")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 images [N, 28, 28] or [N, 1, 28, 28] to float32 [N, 1, 28, 28] in [-1, 1].

    [-1, 1] is the range the DDPM sampler clips to (``clip_sample=True``).
    """
    if images.dtype != torch.uint8:
        raise DataError(f"to_model_range expects uint8 images, got {images.dtype}; pass raw pixels")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] != 1:
        raise DataError(
            f"to_model_range expects [N, 28, 28] or [N, 1, 28, 28], got {tuple(images.shape)}"
        )
    return images.float().div(127.5).sub(1.0)

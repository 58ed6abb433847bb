"""MNIST and Fashion-MNIST from the official IDX files (gzipped or not).

Searched, in order: ``ROOT/MNIST/raw`` (torchvision's layout), ``ROOT/MNIST`` and ``ROOT`` itself
(``FashionMNIST`` instead of ``MNIST`` for Fashion-MNIST). Every file may be the official ``.gz`` or
the un-gzipped file next to it.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from kdforge.core.errors import DataError
from kdforge.data.catalog import DATASETS
from kdforge.data.download import download_dataset
from kdforge.data.sources.common import (
    MATERIALIZE_HINT,
    build_splits,
    find_folder,
    missing_files_error,
    resolve_root,
)
from kdforge.data.types import DataSplits

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

MNIST_CLASSES = [str(digit) for digit in range(10)]
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (``.gz`` or plain) as a numpy array of its declared type and shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"cannot read {path}: {error}; the file is damaged, fetch it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path} is truncated: {len(raw)} bytes, but its header alone needs {header} ({ndim} dimensions); "
            "fetch the file again"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path} is truncated or padded: {len(raw)} bytes, header says {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _read_images(path: Path) -> np.ndarray:
    array = read_idx(path)
    if array.dtype != np.uint8 or array.ndim != 3:
        raise DataError(
            f"{path}: expected uint8 images N x H x W (magic {IMAGES_MAGIC}), got {array.dtype} {array.shape}"
        )
    return array[:, None, :, :]


def _read_labels(path: Path) -> np.ndarray:
    array = read_idx(path)
    if array.ndim != 1:
        raise DataError(f"{path}: expected a label vector (magic {LABELS_MAGIC}), got shape {array.shape}")
    return array.astype(np.int64)


def _load_idx_dataset(name: str, folder_name: str, root: Path, download: bool) -> dict[str, Path]:
    candidates = [root / folder_name / "raw", root / folder_name, root]
    required = {key: (f"{base}.gz", base) for key, base in IDX_FILES.items()}
    found = find_folder(candidates, required)
    if found is None and download:
        download_dataset(name, root)
        found = find_folder(candidates, required)
    if found is None:
        how = "set data.download: true (load_dataset(..., download=True)) to fetch them"
        if name == "mnist":
            how += ", or " + MATERIALIZE_HINT.format(root=root)
        expected = ", ".join(f"{base}.gz" for base in IDX_FILES.values()) + " (gzipped or not)"
        raise missing_files_error(name, candidates, expected, how)
    return found


def _idx_splits(
    name: str,
    folder_name: str,
    root,
    download: bool,
    class_names: list[str],
    stats: tuple[tuple[float, ...], tuple[float, ...]],
) -> DataSplits:
    paths = _load_idx_dataset(name, folder_name, resolve_root(root), download)
    train = (_read_images(paths["train_images"]), _read_labels(paths["train_labels"]))
    test = (_read_images(paths["test_images"]), _read_labels(paths["test_labels"]))
    for split, (images, labels) in (("train", train), ("test", test)):
        if len(images) != len(labels):
            raise DataError(f"{name}: {split} has {len(images)} images but {len(labels)} labels")
    return build_splits(name, train, test, class_names, stats)


@DATASETS.register("mnist")
def mnist(root=None, download: bool = False) -> DataSplits:
    """MNIST handwritten digits, 60,000/10,000 28x28 grayscale (official IDX files)."""
    return _idx_splits("mnist", "MNIST", root, download, MNIST_CLASSES, ((0.1307,), (0.3081,)))


@DATASETS.register("fashion_mnist")
def fashion_mnist(root=None, download: bool = False) -> DataSplits:
    """Fashion-MNIST clothing images, 60,000/10,000 28x28 grayscale (official IDX files)."""
    return _idx_splits("fashion_mnist", "FashionMNIST", root, download, FASHION_CLASSES, ((0.2860,), (0.3530,)))

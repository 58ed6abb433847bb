"""CIFAR-10 and CIFAR-100 from the official "python version" pickles.

CIFAR-10: ``ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``.
CIFAR-100: ``ROOT/cifar-100-python/{train, test, meta}`` with fine (100) and coarse (20) labels.
``ROOT`` may also point at the folder itself. The official pickles were written by Python 2: they
load with ``encoding="latin1"`` as str keys; pickles written by Python 3 may carry bytes keys. Both
are accepted. Unpickling is restricted to numpy arrays and plain containers, so a tampered file
cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from kdforge.core.errors import ConfigError, DataError
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

IMAGE_SHAPE = (3, 32, 32)
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
CIFAR10_TRAIN = [f"data_batch_{number}" for number in range(1, 6)]
_TORONTO_HINT = "download {archive} from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it in {root}"

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}  # fmt: skip


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR file")


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def read_cifar_pickle(path: Path) -> dict[str, Any]:
    """One official CIFAR pickle as a dict with str keys (bytes keys are decoded)."""
    try:
        with open(path, "rb") as handle:
            content = _ArrayUnpickler(handle, encoding="latin1").load()
    except Exception as error:  # garbage bytes make the unpickler raise almost anything
        raise DataError(
            f"cannot read CIFAR pickle {path} ({type(error).__name__}: {error}); the file is damaged or not "
            "an official CIFAR pickle, fetch it again"
        ) from None
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a dict, found {type(content).__name__}")
    return {_text(key): value for key, value in content.items()}


def _entry(content: dict[str, Any], key: str, path: Path) -> Any:
    if key not in content:
        raise DataError(f"{path}: no '{key}' entry (found {', '.join(sorted(content))})")
    return content[key]


def _names(meta: dict[str, Any], key: str, path: Path) -> list[str]:
    names = _entry(meta, key, path)
    if not isinstance(names, list | tuple | np.ndarray) or not len(names):
        raise DataError(f"{path}: '{key}' must be a list of class names, got {type(names).__name__}")
    return [_text(label) for label in names]


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 3 x 32 x 32, int64 labels) from one data pickle."""
    content = read_cifar_pickle(path)
    rows = np.asarray(_entry(content, "data", path))
    labels = np.asarray(_entry(content, label_key, path))
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: '{label_key}' must be a list of class indices (int), got {labels.dtype} {labels.shape}; "
            "class names belong in the meta file"
        )
    labels = labels.astype(np.int64)
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != int(np.prod(IMAGE_SHAPE)):
        raise DataError(f"{path}: 'data' must be uint8 rows of 3072 values, got {rows.dtype} {rows.shape}")
    if len(rows) != len(labels):
        raise DataError(f"{path}: {len(rows)} images but {len(labels)} labels")
    return rows.reshape(len(rows), *IMAGE_SHAPE), labels


def _read_batches(paths: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    parts = [_read_batch(path, label_key) for path in paths]
    return np.concatenate([images for images, _ in parts]), np.concatenate([labels for _, labels in parts])


def _locate(
    name: str, candidates: list[Path], files: list[str], download: bool, root: Path, how: str
) -> dict[str, Path]:
    """The dataset's files (fetched first when missing and ``download``), else a one-line DataError."""
    required = {file: (file,) for file in files}
    found = find_folder(candidates, required)
    if found is None and download:
        download_dataset(name, root)
        found = find_folder(candidates, required)
    if found is None:
        raise missing_files_error(name, candidates, ", ".join(files), how)
    return found


_DOWNLOAD_HINT = "set data.download: true (load_dataset(..., download=True)) to fetch them, or "


@DATASETS.register("cifar10")
def cifar10(root=None, download: bool = False) -> DataSplits:
    """CIFAR-10, 50,000/10,000 32x32 RGB images in 10 classes (official python pickles)."""
    root = resolve_root(root)
    files = [*CIFAR10_TRAIN, "test_batch", "batches.meta"]
    how = _DOWNLOAD_HINT + MATERIALIZE_HINT.format(root=root)
    paths = _locate("cifar10", [root / "cifar-10-batches-py", root], files, download, root, how)
    train = _read_batches([paths[file] for file in CIFAR10_TRAIN], "labels")
    test = _read_batch(paths["test_batch"], "labels")
    meta = read_cifar_pickle(paths["batches.meta"])
    class_names = _names(meta, "label_names", paths["batches.meta"])
    return build_splits("cifar10", train, test, class_names, CIFAR10_STATS)


@DATASETS.register("cifar100")
def cifar100(root=None, download: bool = False, label_type: str = "fine") -> DataSplits:
    """CIFAR-100, 50,000/10,000 32x32 RGB images; 100 fine classes, or 20 with label_type="coarse"."""
    if label_type not in ("fine", "coarse"):
        raise ConfigError(f"cifar100 label_type must be 'fine' or 'coarse', got '{label_type}'")
    root = resolve_root(root)
    how = _DOWNLOAD_HINT + _TORONTO_HINT.format(archive="cifar-100-python.tar.gz", root=root)
    paths = _locate("cifar100", [root / "cifar-100-python", root], ["train", "test", "meta"], download, root, how)
    label_key = f"{label_type}_labels"
    train = _read_batch(paths["train"], label_key)
    test = _read_batch(paths["test"], label_key)
    meta = read_cifar_pickle(paths["meta"])
    class_names = _names(meta, f"{label_type}_label_names", paths["meta"])
    return build_splits("cifar100", train, test, class_names, CIFAR100_STATS)

"""Helpers shared by the dataset sources: finding files, one-line errors, building DataSplits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from kdforge.core.errors import DataError
from kdforge.data.types import DatasetInfo, DataSplits, TensorData

DEFAULT_ROOT = Path("data")
MATERIALIZE_HINT = (
    "copy the official files into {root} (docs/data.md; kdforge's own test machines run "
    "python ../shared/tools/materialize_datasets.py {root})"
)
_STATS_CHUNK = 4096


def resolve_root(root: str | Path | None) -> Path:
    """The data root: ``root`` if given, else ``./data``."""
    return Path(root).expanduser() if root is not None else DEFAULT_ROOT


def find_file(folder: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` (alternatives for one file) that exists in ``folder``."""
    for name in names:
        path = folder / name
        if path.is_file():
            return path
    return None


def find_folder(candidates: Sequence[Path], required: dict[str, Sequence[str]]) -> dict[str, Path] | None:
    """In the first candidate folder that holds every required file: key -> path, else None.

    ``required`` maps a key to the accepted file names (e.g. the ``.gz`` and the plain file).
    """
    for folder in candidates:
        found = {key: find_file(folder, names) for key, names in required.items()}
        if all(path is not None for path in found.values()):
            return found  # type: ignore[return-value]
    return None


class MissingDataError(DataError):
    """A dataset's files are not where they were looked for; ``where`` says what was searched."""

    def __init__(self, dataset: str, where: str, how: str) -> None:
        super().__init__(f"{dataset}: {where}; {how}")
        self.dataset = dataset
        self.where = where


def missing_files_error(dataset: str, searched: Sequence[Path], expected: str, how: str) -> DataError:
    """One line: which folders were searched, which files were expected, how to get them."""
    folders = ", ".join(str(folder) for folder in searched)
    return MissingDataError(dataset, f"dataset files not found (searched {folders}; expected {expected})", how)


def feature_stats(values: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std along axis 1 of float data (per feature of N x D rows, per channel of images),
    accumulated in float64; a constant feature gets std 1 (it is centred, not blown up)."""
    if values.shape[0] == 0:
        return (0.0,) * values.shape[1], (1.0,) * values.shape[1]
    moved = values.transpose(0, 1).reshape(values.shape[1], -1).double()
    mean = moved.mean(dim=1)
    std = moved.std(dim=1, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return tuple(float(m) for m in mean), tuple(float(v) for v in std)


def info_for(
    dataset: str,
    sample_shape: Sequence[int],
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    kind: str,
    fit_stats: bool = False,
) -> DatasetInfo:
    """DatasetInfo for samples of ``sample_shape``: (D,) features, (H, W) or (C, H, W)."""
    shape = tuple(int(size) for size in sample_shape)
    if len(shape) == 1:
        channels, size = shape[0], (1, 1)
    elif len(shape) == 2:
        channels, size = 1, shape
        shape = (1, *shape)
    elif len(shape) == 3:
        channels, size = shape[0], shape[1:]
    else:
        raise DataError(f"{dataset}: samples must be D features, H x W or C x H x W, got shape {shape}")
    return DatasetInfo(
        name=dataset,
        num_classes=len(class_names),
        in_channels=channels,
        image_size=(int(size[0]), int(size[1])),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        class_names=[str(name) for name in class_names],
        input_shape=shape,
        kind=kind,
        fit_stats=fit_stats,
    )


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images N x C x H x W, on the [0, 1] scale (exact sums)."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.int64)
    total_squares = torch.zeros(channels, dtype=torch.int64)
    for start in range(0, images.shape[0], _STATS_CHUNK):
        chunk = images[start : start + _STATS_CHUNK].to(torch.int64)
        total += chunk.sum(dim=(0, 2, 3))
        total_squares += (chunk * chunk).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total.double() / count
    variance = (total_squares.double() / count - mean * mean).clamp_min(0.0)
    return (
        tuple(float(m) / 255.0 for m in mean),
        tuple(math.sqrt(float(v)) / 255.0 for v in variance),
    )


def _as_images(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        tensor = array.contiguous()
    else:
        if not array.flags.writeable or not array.flags.c_contiguous:
            array = np.array(array, order="C")
        tensor = torch.from_numpy(array)
    if tensor.is_floating_point() and tensor.dtype != torch.float32:
        tensor = tensor.to(torch.float32)  # features stay float (never rounded to 8 bits)
    return tensor


def _check_labels(dataset: str, split: str, labels: torch.Tensor, num_classes: int) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"{dataset}: {split} labels must lie in 0..{num_classes - 1} "
            f"(found {int(labels.min())}..{int(labels.max())})"
        )


def build_splits(
    dataset: str,
    train: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor],
    test: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor],
    class_names: Sequence[str],
    stats: tuple[Sequence[float], Sequence[float]] | None = None,
    source_indices: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> DataSplits:
    """DataSplits from (samples, labels) pairs; stats computed from train if None.

    Samples are uint8 images N x C x H x W, or float features N x D / N x C x H x W (kept as
    float32, standardised with per-feature statistics fitted on the training split).
    ``source_indices`` (train, test) overrides the default ``0..N-1`` sample identities.
    """
    splits = {}
    indices = source_indices or (None, None)
    for (split, (images, labels)), index in zip((("train", train), ("test", test)), indices, strict=True):
        data = TensorData(
            _as_images(images),
            torch.as_tensor(np.asarray(labels), dtype=torch.int64),
            name=f"{dataset}/{split}",
            indices=index,
        )
        _check_labels(dataset, split, data.labels, len(class_names))
        splits[split] = data
    if splits["train"].images.shape[1:] != splits["test"].images.shape[1:]:
        raise DataError(
            f"{dataset}: train images are {tuple(splits['train'].images.shape[1:])} but test images are "
            f"{tuple(splits['test'].images.shape[1:])}; both splits must share one C x H x W"
        )
    train_values = splits["train"].images
    if splits["train"].is_float:
        mean, std = stats if stats is not None else feature_stats(train_values)
        kind, fitted = "float", stats is None
    else:
        mean, std = stats if stats is not None else channel_stats(train_values)
        kind, fitted = "image", False
    info = info_for(dataset, tuple(train_values.shape[1:]), class_names, mean, std, kind, fitted)
    return DataSplits(train=splits["train"], val=None, test=splits["test"], info=info)

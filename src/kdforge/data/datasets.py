"""``load_dataset``: a registered source, then the optional validation split and training subset."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import kdforge.data.sources  # noqa: F401  (registers the sources)
from kdforge.core.errors import ConfigError, closest
from kdforge.data.catalog import DATASETS
from kdforge.data.splits import balanced_subset, stratified_split
from kdforge.data.types import DataSplits

_COMMON_ARGUMENTS = {"root", "download"}


def dataset_options(name: str) -> list[str]:
    """The source-specific options dataset ``name`` accepts (beyond root and download)."""
    parameters = inspect.signature(DATASETS.get(name)).parameters
    return [option for option in parameters if option not in _COMMON_ARGUMENTS]


def _check_options(name: str, options: dict[str, Any]) -> None:
    accepted = dataset_options(name)
    for option in options:
        if option not in accepted:
            raise ConfigError(
                f"dataset '{name}' has no option '{option}'{closest(option, accepted)}; "
                f"accepted: {', '.join(accepted) or 'none'}"
            )


def carve_splits(
    splits: DataSplits, *, val_fraction: float = 0.0, train_subset: int | None = None, seed: int = 0
) -> DataSplits:
    """Hold out a stratified validation split from train, then keep a class-balanced train subset.

    Both are seeded by ``seed``; both keep the source order and record source positions in
    ``TensorData.indices`` (positions in the official train split).
    """
    name = splits.info.name
    train, val = splits.train, None
    if val_fraction:
        kept, held = stratified_split(train.labels, float(val_fraction), seed)
        val = train.select(held, name=f"{name}/val")
        train = train.select(kept)
    if train_subset is not None:
        if isinstance(train_subset, bool) or not isinstance(train_subset, int):
            raise ConfigError(f"train_subset must be a whole number of samples, got {train_subset!r}")
        train = train.select(balanced_subset(train.labels, train_subset, seed))
    return DataSplits(train=train, val=val, test=splits.test, info=splits.info)


def load_dataset(
    name: str,
    root: str | Path | None = None,
    download: bool = False,
    *,
    val_fraction: float = 0.0,
    train_subset: int | None = None,
    seed: int = 0,
    **options: Any,
) -> DataSplits:
    """Load dataset ``name`` (see ``DATASETS.names()``) into memory as uint8 tensors.

    ``root`` is the data folder (default ``./data``); ``download`` fetches missing official files.
    ``val_fraction`` > 0 carves a seeded class-stratified validation split out of train;
    ``train_subset`` then keeps that many training samples, class-balanced and seeded.
    ``options`` go to the source (``label_type`` for cifar100, ``path``/``layout`` for npz,
    ``grayscale`` for imagefolder).
    """
    _check_options(name, options)
    splits = DATASETS.get(name)(root=root, download=download, **options)
    return carve_splits(splits, val_fraction=val_fraction, train_subset=train_subset, seed=seed)

"""``load_dataset``: a registered source, then the optional validation split and training subset."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import kdforge.data.sources  # noqa: F401  (registers the sources)
from kdforge.core.errors import ConfigError, closest
from kdforge.data.catalog import DATASETS
from kdforge.data.custom import is_import_spec, load_custom
from kdforge.data.sources.common import feature_stats
from kdforge.data.splits import balanced_subset, stratified_split
from kdforge.data.types import DataSplits, TensorData

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
    train, val = splits.train, splits.val
    if val_fraction:
        if val is not None:
            raise ConfigError(
                f"dataset '{name}' has its own validation split; drop data.val_fraction (or return no 'val')"
            )
        kept, held = stratified_split(train.labels, float(val_fraction), seed)
        val = train.select(held, name=f"{name}/val")
        train = train.select(kept)
    if train_subset is not None:
        if isinstance(train_subset, bool) or not isinstance(train_subset, int):
            raise ConfigError(f"train_subset must be a whole number of samples, got {train_subset!r}")
        classification = splits.info.task == "classification"
        classes = splits.info.num_classes if classification else int(train.labels.unique().numel())
        if train_subset < classes:
            raise ConfigError(
                f"train_subset {train_subset} is smaller than the {classes} classes of '{name}': some classes would "
                f"have no training sample; use at least {classes} (or drop train_subset)"
            )
        train = train.select(balanced_subset(train.labels, train_subset, seed))
    info = splits.info
    if info.fit_stats and isinstance(train, TensorData) and train is not splits.train:
        mean, std = feature_stats(train.images)  # standardisation is fitted on the training split only
        info = dataclasses.replace(info, mean=mean, std=std)
    return DataSplits(train=train, val=val, test=splits.test, info=info)


def load_dataset(
    name: str,
    root: str | Path | None = None,
    download: bool = False,
    *,
    val_fraction: float = 0.0,
    train_subset: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
    base: str | Path | None = None,
    **options: Any,
) -> DataSplits:
    """Load dataset ``name`` (see ``DATASETS.names()``) into memory as uint8 tensors.

    ``root`` is the data folder (default ``./data``); ``download`` fetches missing official files.
    ``val_fraction`` > 0 carves a seeded class-stratified validation split out of train;
    ``train_subset`` then keeps that many training samples, class-balanced and seeded.
    ``options`` go to the source (``label_type`` for cifar100, ``path``/``layout`` for npz,
    ``grayscale`` for imagefolder, ``path``/``label``/``test_fraction`` for csv).

    ``name`` may also be an import spec, ``"package.module:function"`` or ``"file.py:function"``
    (relative to the working directory, else to ``base``): any map-style Dataset, streamed
    (``kdforge.data.custom``; its label pass uses ``num_workers`` workers).
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"data.name must name a dataset, got {name!r}; see `kdforge list datasets`")
    if name not in DATASETS and is_import_spec(name):
        splits = load_custom(name, options, root=root, num_workers=num_workers, base=base)
        return carve_splits(splits, val_fraction=val_fraction, train_subset=train_subset, seed=seed)
    _check_options(name, options)
    splits = DATASETS.get(name)(root=root, download=download, **options)
    return carve_splits(splits, val_fraction=val_fraction, train_subset=train_subset, seed=seed)

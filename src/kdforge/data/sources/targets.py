"""Regression versions of the table and array sources: float targets instead of class labels.

``regression_splits`` turns (samples, float targets) pairs into DataSplits whose task is
``regression``: ``TensorData.targets`` holds the targets divided by one scale (N, or N x K for
vector targets), ``DatasetInfo.num_classes`` is K (the network's number of outputs),
``class_names`` names the target components, ``target_scale`` multiplies errors back into the
target's units and ``target_unit`` names them.

Scale: ``"auto"`` (default) divides by the root mean square of the training targets, so the
network sees values of order one (MAE is unchanged by a shift, so only the scale matters for the
reported errors); a number divides by that number; 1 keeps the raw values. One scale serves every
component of a vector target: standardise columns of different units yourself.

``labels`` (the strata that class-balanced subsets and validation carves keep in proportion) are
the decile of the first target component among the training targets, so a ``train_subset``
keeps the spread of the targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from kdforge.core.errors import ConfigError, DataError
from kdforge.data.sources.common import build_splits
from kdforge.data.types import DataSplits, TensorData

TASKS = ("classification", "regression")
STRATA = 10


def check_task(dataset: str, task: object) -> str:
    if task not in TASKS:
        raise ConfigError(f"{dataset}: data.options.task must be one of {', '.join(TASKS)}, got {task!r}")
    return str(task)


def float_targets(values: np.ndarray | Sequence, where: str) -> np.ndarray:
    """Targets as float64 N or N x K, finite; one line naming ``where`` otherwise."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: regression targets must be numbers") from None
    if array.ndim not in (1, 2) or (array.ndim == 2 and array.shape[1] < 1):
        raise DataError(f"{where}: regression targets must be N or N x K numbers, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise DataError(f"{where}: regression targets hold NaN or infinite values; clean them first")
    return array


def target_scale_of(train_targets: np.ndarray, scale: object, dataset: str) -> float:
    if scale == "auto":
        rms = float(np.sqrt(np.mean(np.square(train_targets)))) if train_targets.size else 0.0
        return rms if rms > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not np.isfinite(scale) or scale <= 0:
        raise ConfigError(f"{dataset}: data.options.target_scale must be 'auto' or a positive number, got {scale!r}")
    return float(scale)


def strata(train_targets: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The decile (0..9) of each target's first component among the training targets."""
    first = train_targets.reshape(len(train_targets), -1)[:, 0]
    if not len(first):
        return np.zeros(len(targets), dtype=np.int64)
    edges = np.quantile(first, np.linspace(0, 1, STRATA + 1)[1:-1])
    return np.searchsorted(edges, targets.reshape(len(targets), -1)[:, 0], side="right").astype(np.int64)


def regression_splits(
    dataset: str,
    train: tuple[np.ndarray | torch.Tensor, np.ndarray],
    test: tuple[np.ndarray | torch.Tensor, np.ndarray],
    target_names: Sequence[str] | None = None,
    scale: object = "auto",
    unit: str = "",
    source_indices: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> DataSplits:
    """DataSplits of a regression task from (samples, float targets N or N x K) pairs."""
    if not isinstance(unit, str):
        raise ConfigError(f"{dataset}: data.options.target_unit must be text, got {unit!r}")
    train_y = float_targets(train[1], f"{dataset} train targets")
    test_y = float_targets(test[1], f"{dataset} test targets")
    if train_y.shape[1:] != test_y.shape[1:]:
        raise DataError(
            f"{dataset}: train targets are {train_y.shape[1:]} per sample but test targets {test_y.shape[1:]}"
        )
    outputs = 1 if train_y.ndim == 1 else train_y.shape[1]
    names = [str(n) for n in target_names] if target_names is not None else [f"target{i}" for i in range(outputs)]
    if len(names) != outputs:
        raise DataError(f"{dataset}: {len(names)} target names for {outputs} target value(s) per sample")
    factor = target_scale_of(train_y, scale, dataset)
    stratum = (strata(train_y, train_y), strata(train_y, test_y))
    base = build_splits(
        dataset, (train[0], stratum[0]), (test[0], stratum[1]), [str(s) for s in range(STRATA)],
        source_indices=source_indices,
    )  # fmt: skip
    splits = []
    for split, values in ((base.train, train_y), (base.test, test_y)):
        splits.append(
            TensorData(
                split.images,
                split.labels,
                name=split.name,
                indices=split.indices,
                targets=torch.as_tensor(values / factor, dtype=torch.float32),
            )
        )
    info = dataclasses.replace(
        base.info, num_classes=outputs, class_names=names, task="regression", target_scale=factor, target_unit=unit
    )
    return DataSplits(train=splits[0], val=None, test=splits[1], info=info)


__all__ = ["TASKS", "check_task", "float_targets", "regression_splits", "strata", "target_scale_of"]

"""Generated samples added to a real training split (``data.generated`` in a recipe).

A generation run (``kind: generate``, :mod:`kdforge.engine.generate`) writes ``generated.pt``: uint8
images, int64 labels and targets (or, after soft relabelling, N x C class probabilities), kept and
relabelled by a teacher. :func:`add_generated` appends
them to the training split after any subset or validation carve, so the test and validation splits
stay real. Their ``indices`` continue after the source split's (never confused with a real image).
With soft targets the real training samples' class indices become one-hot rows, so one cross-entropy
covers both (``F.cross_entropy`` takes class probabilities as targets).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from kdforge.core.checkpoint import load_file
from kdforge.core.errors import ConfigError, DataError
from kdforge.data.types import DataSplits, TensorData

GENERATED_FORMAT = "kdforge-generated"


def generated_file(path: str | Path) -> Path:
    """``path`` itself, or ``path/generated.pt`` for a generation run directory."""
    path = Path(path)
    return path / "generated.pt" if path.is_dir() else path


def read_generated(path: str | Path) -> tuple[TensorData, dict]:
    """The generated samples of a generation run (directory or ``generated.pt``) and its dataset record."""
    file = generated_file(path)
    if not file.is_file():
        raise ConfigError(
            f"data.generated: '{file}' not found; give the run directory of a 'kind: generate' recipe "
            "(it holds generated.pt)"
        )
    record = load_file(file)
    if record.get("format") != GENERATED_FORMAT:
        raise ConfigError(f"data.generated: '{file}' is not a kdforge generated-samples file (kind: generate)")
    samples = TensorData(images=record["images"], labels=record["labels"], name="generated", targets=record["targets"])
    return samples, record.get("dataset") or {}


def add_generated(splits: DataSplits, path: str | Path) -> DataSplits:
    """``splits`` with the generated samples of ``path`` appended to the training split."""
    samples, dataset = read_generated(path)
    train = splits.train
    if not isinstance(train, TensorData) or train.is_float:
        raise DataError("data.generated needs an in-memory image dataset (uint8 images)")
    if dataset.get("name") not in (None, splits.info.name):
        raise ConfigError(
            f"data.generated: the samples imitate '{dataset.get('name')}' but this recipe's data is "
            f"'{splits.info.name}'; generate from a GAN trained on '{splits.info.name}'"
        )
    if tuple(samples.images.shape[1:]) != tuple(train.images.shape[1:]):
        raise DataError(
            f"data.generated: samples are {tuple(samples.images.shape[1:])} but '{splits.info.name}' images are "
            f"{tuple(train.images.shape[1:])}"
        )
    real_targets = train.targets
    if _soft(samples.targets) and splits.info.task == "classification":
        # soft relabelling: class probabilities; the real samples' class indices become one-hot rows
        classes = int(splits.info.num_classes)
        if samples.targets.shape[1] != classes:
            raise DataError(
                f"data.generated: soft targets have {samples.targets.shape[1]} classes but '{splits.info.name}' "
                f"has {classes}"
            )
        if not _soft(real_targets):
            real_targets = torch.nn.functional.one_hot(real_targets.long(), classes).float()
        fake_targets = samples.targets.float()
    else:
        fake_targets = samples.targets.to(real_targets.dtype)
    if real_targets.dim() != fake_targets.dim():
        fake_targets = fake_targets.reshape(len(fake_targets), *real_targets.shape[1:])
    start = int(train.indices.max()) + 1 if len(train) else 0
    merged = TensorData(
        images=torch.cat([train.images, samples.images]),
        labels=torch.cat([train.labels, samples.labels]),
        name=train.name,
        indices=torch.cat([train.indices, start + torch.arange(len(samples))]),
        targets=torch.cat([real_targets, fake_targets]),
    )
    return dataclasses.replace(splits, train=merged)


def _soft(targets: torch.Tensor) -> bool:
    """Class probabilities (N x C floats) rather than class indices."""
    return targets.is_floating_point() and targets.dim() == 2

"""``retrieval_mnist`` and ``retrieval_cifar10``: retrieval on classes never seen in training.

A proxy for person re-identification built from data at hand: the classes play the identities.
The network trains on the official training images of the *seen* classes (by default the first
half: digits 0-4, or airplane..deer), with those classes as identity labels 0..S-1. It is evaluated
on the official test images of the *other* classes (5-9), which it never saw: per unseen identity
``queries`` test images are drawn as queries (a fixed function of ``split_seed``, not of the run's
seed, so every run scores the same benchmark) and the rest form the gallery. Test targets are
``(identity, is_query)`` rows; see ``kdforge.data.tasks.retrieval``. A class-level proxy is easier
than re-ID (ten "identities" with thousands of images each, no camera change), so absolute numbers
are not comparable with Market-1501's; rankings of methods are what it measures.

``data.val_fraction`` carves a validation split from the seen classes' training images; it is
scored leave-one-out (every sample a query against the rest).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kdforge.core.errors import ConfigError
from kdforge.data.catalog import DATASETS
from kdforge.data.hashing import derive_seed
from kdforge.data.sources.cifar import cifar10
from kdforge.data.sources.idx import mnist
from kdforge.data.types import DataSplits, TensorData

_QUERY_STREAM = 21


def _classes(value: object, num_classes: int, name: str) -> list[int]:
    if value is None:
        return list(range(num_classes // 2))
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < num_classes for c in value)
        or len(set(value)) != len(value)
    ):
        raise ConfigError(
            f"{name}: train_classes must be a list of distinct class indices in 0..{num_classes - 1}, got {value!r}"
        )
    if len(value) >= num_classes:
        raise ConfigError(f"{name}: train_classes leaves no class for the query/gallery split; list fewer classes")
    return sorted(value)


def _remap(split: Any, classes: list[int], name: str) -> TensorData:
    """The samples of ``classes``, relabelled 0..len(classes)-1 in the order given."""
    lookup = torch.full((int(split.labels.max()) + 1,), -1, dtype=torch.int64)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))
    kept = torch.nonzero(lookup[split.labels] >= 0).flatten()
    subset = split.select(kept, name=name)
    return TensorData(images=subset.images, labels=lookup[subset.labels], name=name, indices=subset.indices)


def held_out_splits(
    base: DataSplits, name: str, train_classes: object, queries: object, split_seed: object
) -> DataSplits:
    """Train on ``train_classes`` of ``base.train``; query/gallery from the other classes of ``base.test``."""
    total = base.info.num_classes
    seen = _classes(train_classes, total, name)
    unseen = [c for c in range(total) if c not in seen]
    if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
        raise ConfigError(f"{name}: queries must be a positive whole number per identity, got {queries!r}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int):
        raise ConfigError(f"{name}: split_seed must be a whole number, got {split_seed!r}")
    train = _remap(base.train, seen, "train")
    test = _remap(base.test, unseen, "test")
    generator = torch.Generator().manual_seed(derive_seed(split_seed, _QUERY_STREAM))
    is_query = torch.zeros(len(test), dtype=torch.int64)
    for identity in range(len(unseen)):
        members = torch.nonzero(test.labels == identity).flatten()
        if len(members) < 2:
            raise ConfigError(
                f"{name}: held-out class {unseen[identity]} has {len(members)} test image(s); it needs a query "
                "and a gallery image"
            )
        chosen = members[torch.randperm(len(members), generator=generator)[: min(queries, len(members) - 1)]]
        is_query[chosen] = 1
    test = TensorData(
        images=test.images,
        labels=test.labels,
        name="test",
        indices=test.indices,
        targets=torch.stack([test.labels, is_query], 1),
    )
    names = base.info.class_names or [str(c) for c in range(total)]
    info = dataclasses.replace(
        base.info,
        name=name,
        num_classes=len(seen),
        class_names=[names[c] for c in seen],
        task="retrieval",
    )
    return DataSplits(train=train, val=None, test=test, info=info)


@DATASETS.register("retrieval_mnist")
def retrieval_mnist(
    root=None, download: bool = False, train_classes: list[int] | None = None, queries: int = 100, split_seed: int = 0
) -> DataSplits:
    """MNIST retrieval: train on digits 0-4, rank test digits 5-9 (queries per digit vs the gallery)."""
    return held_out_splits(mnist(root=root, download=download), "retrieval_mnist", train_classes, queries, split_seed)


@DATASETS.register("retrieval_cifar10")
def retrieval_cifar10(
    root=None, download: bool = False, train_classes: list[int] | None = None, queries: int = 100, split_seed: int = 0
) -> DataSplits:
    """CIFAR-10 retrieval: train on classes 0-4, rank test classes 5-9 (queries per class vs the gallery)."""
    splits = cifar10(root=root, download=download)
    return held_out_splits(splits, "retrieval_cifar10", train_classes, queries, split_seed)

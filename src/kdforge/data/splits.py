"""Seeded, class-aware selection: stratified validation splits and class-balanced subsets.

Both work the same way: shuffle all positions with a seeded generator, group them by class (a
stable sort keeps the shuffled order inside each class), and keep the first ``quota[c]`` of every
class. Returned positions are sorted, so a selection keeps the source order.
"""

from __future__ import annotations

import torch

from kdforge.core.errors import ConfigError
from kdforge.data.hashing import derive_seed

_VAL_STREAM = 1
_SUBSET_STREAM = 2
_EVAL_STREAM = 3


def _class_counts(labels: torch.Tensor) -> torch.Tensor:
    return torch.bincount(labels, minlength=int(labels.max()) + 1 if len(labels) else 0)


def _shuffled_class_ranks(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions grouped by class in seeded random order, and each one's rank within its class."""
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(labels), generator=generator)
    grouped = shuffled[torch.argsort(labels[shuffled], stable=True)]
    counts = _class_counts(labels)
    class_start = torch.cumsum(counts, 0) - counts
    ranks = torch.arange(len(labels)) - class_start[labels[grouped]]
    return grouped, ranks


def _take_per_class(labels: torch.Tensor, quota: torch.Tensor, seed: int) -> torch.Tensor:
    """Sorted positions of ``quota[c]`` randomly chosen samples of every class ``c``."""
    grouped, ranks = _shuffled_class_ranks(labels, seed)
    chosen = grouped[ranks < quota[labels[grouped]]]
    return torch.sort(chosen).values


def proportional_quota(counts: torch.Tensor, total: int) -> torch.Tensor:
    """Split ``total`` over classes in proportion to ``counts`` (largest-remainder rounding)."""
    exact = counts.double() * total / counts.sum().double()
    quota = exact.floor().to(torch.int64)
    shortfall = total - int(quota.sum())
    if shortfall > 0:
        # Largest fractional parts first; ties go to the lower class id (stable sort).
        order = torch.argsort(-(exact - quota.double()), stable=True)
        quota[order[:shortfall]] += 1
    return quota


def balanced_quota(counts: torch.Tensor, total: int) -> torch.Tensor:
    """Split ``total`` as evenly as possible over classes, capped by what each class has.

    Water-filling: a class too small for its even share gives all its samples and the shortfall
    is shared by the others; leftover units (``total`` not divisible) go to the lowest class ids.
    """
    quota = torch.zeros_like(counts)
    open_classes = [c for c in range(len(counts)) if counts[c] > 0]
    remaining = total
    while open_classes:
        share = remaining // len(open_classes)
        capped = [c for c in open_classes if counts[c] <= share]
        if not capped:
            extra = remaining - share * len(open_classes)
            for rank, c in enumerate(open_classes):
                quota[c] = share + (1 if rank < extra else 0)
            break
        for c in capped:
            quota[c] = counts[c]
            remaining -= int(counts[c])
        open_classes = [c for c in open_classes if c not in capped]
    return quota


def stratified_holdout(labels: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept positions, held-out positions): ``count`` samples held out in proportion to class size."""
    if not 0 < count < len(labels):
        raise ConfigError(
            f"a held-out split of {count} from {len(labels)} samples leaves an empty side; "
            "keep at least one sample on each side"
        )
    quota = proportional_quota(_class_counts(labels), count)
    held = _take_per_class(labels, quota, derive_seed(seed, _VAL_STREAM))
    keep_mask = torch.ones(len(labels), dtype=torch.bool)
    keep_mask[held] = False
    return torch.nonzero(keep_mask).flatten(), held


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept positions, held-out positions) with ``round(fraction * N)`` held out, class-stratified."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {fraction}")
    count = round(fraction * len(labels))
    if not 0 < count < len(labels):
        raise ConfigError(
            f"val_fraction {fraction} of {len(labels)} training samples leaves an empty split; "
            "choose a fraction that keeps at least one sample on each side"
        )
    return stratified_holdout(labels, count, seed)


def balanced_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Sorted positions of a seeded subset of ``size`` samples, as class-balanced as possible."""
    if not 0 < size <= len(labels):
        raise ConfigError(f"train_subset must be between 1 and the training split size {len(labels)}, got {size}")
    quota = balanced_quota(_class_counts(labels), size)
    return _take_per_class(labels, quota, derive_seed(seed, _SUBSET_STREAM))


def evaluation_subset(labels: torch.Tensor, limit: int | None, seed: int = 0) -> torch.Tensor:
    """Sorted positions of ``limit`` samples for a partial evaluation: all of them when ``limit`` is
    None or not smaller than the split, else a seeded class-balanced subset.

    Never the first ``limit`` samples: a split stored in class order (an image folder, or a test
    set written sorted by label) would make those a few classes only.
    """
    if limit is None or limit >= len(labels):
        return torch.arange(len(labels))
    if limit < 1:
        raise ConfigError(f"an evaluation limit must be at least 1 image, got {limit}")
    quota = balanced_quota(_class_counts(labels), int(limit))
    return _take_per_class(labels, quota, derive_seed(seed, _EVAL_STREAM))

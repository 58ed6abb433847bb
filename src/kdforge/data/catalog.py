"""The dataset registry: every source module registers a loader ``(root, download, **options)``."""

from __future__ import annotations

from kdforge.core.registry import Registry
from kdforge.data.types import DataSplits

DATASETS: Registry[DataSplits] = Registry("dataset", group="kdforge.datasets")

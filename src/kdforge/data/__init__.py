"""Datasets in memory (uint8 images, float32 features) or streamed from any Dataset, deterministic
batched augmentation, and batch loaders.

>>> splits = load_dataset("digits", val_fraction=0.1)
>>> loader = BatchLoader(splits.train, 64, augmentation=default_augmentation(splits.info))
"""

from kdforge.data.augment import Augmentation, default_augmentation
from kdforge.data.batch import Batch
from kdforge.data.catalog import DATASETS
from kdforge.data.datasets import carve_splits, dataset_options, load_dataset
from kdforge.data.download import DOWNLOADS, download_dataset
from kdforge.data.loader import BatchLoader, StreamLoader, make_loader
from kdforge.data.types import DatasetInfo, DataSplits, StreamData, TensorData

__all__ = [
    "DATASETS",
    "DOWNLOADS",
    "Augmentation",
    "Batch",
    "BatchLoader",
    "DataSplits",
    "DatasetInfo",
    "StreamData",
    "StreamLoader",
    "TensorData",
    "carve_splits",
    "dataset_options",
    "default_augmentation",
    "download_dataset",
    "load_dataset",
    "make_loader",
]

"""scikit-learn's bundled 8x8 handwritten digits (1,797 images; no download, no root).

Pixel values 0..16 are scaled to 0..255 (``round(v * 255 / 16)``). The train/test split is fixed:
500 test images chosen class-stratified with seed 0, 1,297 for training, both in source order;
``TensorData.indices`` are positions in scikit-learn's 1,797-sample array.
"""

from __future__ import annotations

import numpy as np
import torch

from kdforge.data.catalog import DATASETS
from kdforge.data.sources.common import build_splits
from kdforge.data.splits import stratified_holdout
from kdforge.data.types import DataSplits

TEST_SIZE = 500
SPLIT_SEED = 0
MAX_VALUE = 16


@DATASETS.register("digits")
def digits(root=None, download: bool = False) -> DataSplits:
    """scikit-learn's 8x8 digits, 1,297 train / 500 test, 1 channel (bundled, no files needed)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / MAX_VALUE)).astype(np.uint8)[:, None, :, :]
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    train, test = stratified_holdout(labels, TEST_SIZE, SPLIT_SEED)
    return build_splits(
        "digits",
        (images[train.numpy()], labels[train]),
        (images[test.numpy()], labels[test]),
        [str(name) for name in bunch.target_names],
        source_indices=(train, test),
    )

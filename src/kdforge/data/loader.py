"""``BatchLoader``: batches straight from an in-memory uint8 tensor, no worker processes.

Every batch is one index gather from ``TensorData.images`` followed by one batched augmentation
call. ``Batch.index`` is the sample's position in the TensorData the loader was built on (0..N-1):
stable for the whole run, dense (a memory bank of N rows fits), and the key of the augmentation's
randomness. ``TensorData.indices[batch.index]`` maps it back to the official split.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from kdforge.core.errors import ConfigError
from kdforge.data.augment import Augmentation
from kdforge.data.batch import Batch
from kdforge.data.hashing import derive_seed
from kdforge.data.types import TensorData

_SHUFFLE_STREAM = 3


class BatchLoader:
    """Iterates over ``data`` in batches of ``Batch(inputs={"image": float32}, targets, index)``.

    Order: a permutation seeded by (``seed``, epoch) with ``torch.Generator`` (identity when
    ``shuffle=False``), the same on every rank. With ``world_size > 1`` the order is padded by
    repeating its start until divisible by ``world_size`` (as ``DistributedSampler`` does), and
    rank r takes positions r, r + world_size, ...; ranks are disjoint apart from that padding.
    Call ``set_epoch`` before each epoch. Without an augmentation, images are only scaled to [0, 1].
    ``device`` moves each batch there (uint8 is moved, then augmented on the device).
    """

    def __init__(
        self,
        data: TensorData,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        augmentation: Augmentation | None = None,
        train: bool = True,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in 0..world_size-1, got rank {rank} of {world_size}")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.augmentation = augmentation
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device) if device is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: it seeds the order and the augmentation."""
        self.epoch = int(epoch)

    @property
    def samples_per_rank(self) -> int:
        return math.ceil(len(self.data) / self.world_size)

    @property
    def partial_batch_size(self) -> int:
        """Size of each epoch's smaller last batch on this rank (0 when every batch is full)."""
        return 0 if self.drop_last else self.samples_per_rank % self.batch_size

    def __len__(self) -> int:
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return math.ceil(self.samples_per_rank / self.batch_size)

    def epoch_order(self) -> torch.Tensor:
        """This rank's sample positions for the current epoch, in visiting order."""
        count = len(self.data)
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, _SHUFFLE_STREAM))
            order = torch.randperm(count, generator=generator)
        else:
            order = torch.arange(count)
        padding = self.samples_per_rank * self.world_size - count
        if padding:
            order = torch.cat([order, order.repeat(math.ceil(padding / count))[:padding]])
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        order = self.epoch_order()
        for batch_number in range(len(self)):
            yield self.make_batch(order[batch_number * self.batch_size : (batch_number + 1) * self.batch_size])

    def make_batch(self, positions: torch.Tensor) -> Batch:
        """The batch of the samples at ``positions``: gathered, moved, augmented."""
        images = self.data.images[positions]
        targets = self.data.labels[positions]
        index = positions
        if self.device is not None:
            images, targets, index = (t.to(self.device, non_blocking=True) for t in (images, targets, index))
        return Batch(inputs={"image": self._transform(images, index)}, targets=targets, index=index)

    def _transform(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.augmentation is None:
            return images.to(torch.float32) / 255.0
        return self.augmentation(images, index, self.seed, self.epoch, train=self.train)

"""P x K identity batches for metric learning (Hermans, Beyer & Leibe, "In Defense of the Triplet
Loss for Person Re-Identification", 2017): every batch holds ``p`` identities with ``k`` samples each,
so that every anchor has positives and a batch-hard triplet loss has something to mine.

Recipe: ``data.sampler: {name: pk, k: 4}`` (``p`` defaults to ``train.batch_size / k``; giving both
requires ``p * k == train.batch_size``). The order is a pure function of (seed, epoch): per epoch the
identities are shuffled and each identity's samples are shuffled into a queue; batches take the next
``p`` identities of the shuffled list (re-shuffled when it runs out) and the next ``k`` samples of each
queue (re-shuffled and restarted when it runs out; an identity with fewer than ``k`` samples repeats
some). An epoch has ``len(data) // (p * k)`` batches; ranks take batches round-robin.
"""

from __future__ import annotations

from typing import Any

import torch

from kdforge.core.errors import ConfigError
from kdforge.data.hashing import derive_seed
from kdforge.data.loader import BatchLoader
from kdforge.data.types import TensorData

_PK_STREAM = 31


def pk_batches(labels: torch.Tensor, p: int, k: int, batches: int, seed: int) -> torch.Tensor:
    """``batches`` x (p * k) sample positions: p identities, k samples each, seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    identities = labels.unique()
    if len(identities) < p:
        raise ConfigError(
            f"data.sampler: p={p} identities per batch but the training split has only {len(identities)}; "
            "lower p (or raise k)"
        )
    pools = [torch.nonzero(labels == identity).flatten() for identity in identities.tolist()]
    queues = [pool[torch.randperm(len(pool), generator=generator)] for pool in pools]
    cursors = [0] * len(pools)
    cycle = torch.randperm(len(pools), generator=generator).tolist()
    out = torch.empty(batches, p * k, dtype=torch.int64)
    for batch in range(batches):
        if len(cycle) < p:
            cycle += torch.randperm(len(pools), generator=generator).tolist()
        chosen, cycle = cycle[:p], cycle[p:]
        for slot, identity in enumerate(chosen):
            taken: list[int] = []
            while len(taken) < k:
                if cursors[identity] >= len(queues[identity]):
                    pool = pools[identity]
                    queues[identity] = pool[torch.randperm(len(pool), generator=generator)]
                    cursors[identity] = 0
                need = k - len(taken)
                part = queues[identity][cursors[identity] : cursors[identity] + need]
                cursors[identity] += len(part)
                taken.extend(part.tolist())
            out[batch, slot * k : (slot + 1) * k] = torch.tensor(taken)
    return out


class PKBatchLoader(BatchLoader):
    """A ``BatchLoader`` whose batches are P identities x K samples (see the module docstring)."""

    def __init__(self, data: TensorData, p: int, k: int, **options: Any) -> None:
        options.pop("shuffle", None)
        options.pop("drop_last", None)
        super().__init__(data, p * k, shuffle=True, drop_last=True, **options)
        self.p, self.k = p, k
        self.total_batches = len(data) // (p * k)

    def __len__(self) -> int:
        return self.total_batches // self.world_size

    @property
    def partial_batch_size(self) -> int:
        return 0

    def epoch_order(self) -> torch.Tensor:
        seed = derive_seed(self.seed, self.epoch, _PK_STREAM)
        batches = pk_batches(self.data.labels, self.p, self.k, len(self) * self.world_size, seed)
        return batches[self.rank :: self.world_size].flatten()


def pk_loader(data: Any, batch_size: int, sampler: dict[str, Any], **options: Any) -> PKBatchLoader:
    """The P x K loader for a ``data.sampler`` mapping (``{name: pk, p, k}``), checked."""
    if not isinstance(data, TensorData):
        raise ConfigError("data.sampler 'pk' needs an in-memory dataset; a streamed (custom) Dataset has no labels index")
    k = sampler.get("k")
    p = sampler.get("p")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"data.sampler.k must be a positive whole number of samples per identity, got {k!r}")
    if p is None:
        if batch_size % k:
            raise ConfigError(f"data.sampler.k={k} does not divide train.batch_size={batch_size}; pick k dividing it")
        p = batch_size // k
    elif p * k != batch_size:
        raise ConfigError(f"data.sampler p*k = {p}*{k} = {p * k} differs from train.batch_size={batch_size}; make them equal")
    if p < 2:
        raise ConfigError(f"data.sampler: p={p}; a batch needs at least 2 identities (negatives for every anchor)")
    loader = PKBatchLoader(data, p, k, **options)
    if len(loader) == 0:
        raise ConfigError(
            f"data.sampler: {len(data)} training samples make no batch of p*k = {p * k} on each rank; lower p or k"
        )
    return loader

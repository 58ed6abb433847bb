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

import torch

from kdforge.core.errors import ConfigError


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

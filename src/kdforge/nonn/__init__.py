"""NoNN: a teacher compressed into several disjoint students that run on separate devices.

* :mod:`kdforge.nonn.graph`: the co-activation (or correlation) graph of the teacher's
  final-layer filters over training images;
* :mod:`kdforge.nonn.partition`: Louvain (NoNN) and balanced spectral (Jeong et al. 2021)
  partitions of that graph, saved as JSON with their statistics;
* :mod:`kdforge.nonn.serve`: real distributed inference, one process per student ("device")
  on the loopback network and an aggregator with a deadline (``kdforge serve-nonn``).

The combined system is the zoo model ``nonn`` (:mod:`kdforge.models.nonn`); the ``nonn`` method
(:mod:`kdforge.methods.nonn`) trains it; the ``nonn-partition`` and ``serve-nonn`` commands are
:mod:`kdforge.commands.nonn`. See docs/nonn.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn

    from kdforge.nonn.partition import Partition

# heavy modules (torch, numpy) load on first use, so `kdforge --help` stays fast
_LAZY = {
    "GRAPH_KINDS": "kdforge.nonn.graph",
    "filter_graph": "kdforge.nonn.graph",
    "pooled_activations": "kdforge.nonn.graph",
    "threshold_graph": "kdforge.nonn.graph",
    "PARTITION_METHODS": "kdforge.nonn.partition",
    "Partition": "kdforge.nonn.partition",
    "partition_filters": "kdforge.nonn.partition",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdforge.nonn' has no attribute {name!r}")


def partition_teacher(
    teacher: nn.Module,
    images: Tensor,
    layer: str,
    num_groups: int,
    *,
    method: str = "spectral",
    graph: str = "hebbian",
    top_k: int | None = 50,
    percentile: float | None = 99.0,
    resolution: float = 0.7,
    seed: int = 0,
    normalized: bool = False,
    discard_largest: bool = True,
    underfull: str = "split",
    normalize: Callable[[Tensor], Tensor] | None = None,
    source: dict[str, Any] | None = None,
) -> Partition:
    """Teacher activations on ``images`` -> filter graph -> partition (with statistics).

    ``images`` (uint8 or float, N x C x H x W) are turned into model inputs by ``normalize``.
    """
    from kdforge.nonn.graph import filter_graph, pooled_activations
    from kdforge.nonn.partition import partition_filters

    activations = pooled_activations(teacher, images, layer, normalize=normalize)
    weights = filter_graph(activations, graph, top_k)
    settings = {"graph": graph, "top_k": top_k if graph != "correlation" else None}
    return partition_filters(
        weights,
        num_groups,
        method,
        percentile=percentile,
        resolution=resolution,
        seed=seed,
        normalized=normalized,
        discard_largest=discard_largest,
        underfull=underfull,
        settings=settings,
        source={"layer": layer, "images": len(images), **(source or {})},
    )


__all__ = [
    "GRAPH_KINDS",
    "PARTITION_METHODS",
    "Partition",
    "filter_graph",
    "partition_filters",
    "partition_teacher",
    "pooled_activations",
    "threshold_graph",
]

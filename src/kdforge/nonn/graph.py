"""The filter graph of NoNN: how strongly the teacher's final-layer filters fire together.

Bhardwaj et al. (NoNN, CODES+ISSS 2019) build a graph whose nodes are the filters of the
teacher's final convolution stage. For every training image:

1. each filter's feature map is averaged over space, negatives are clipped and the vector is
   divided by its largest entry, so ``a_f`` lies in [0, 1];
2. only the ``top_k`` most active filters of that image are kept;
3. every pair (f, g) of kept filters gets an edge weight added:

   * ``hebbian`` (the paper's "activation Hebbian" rule): ``a_f a_g / (|a_f - a_g| + 1)``,
     large when both fire strongly *together*;
   * ``noncoactivation`` (what the NoNN framework, ``SLDGroup/NoNN_framework``, actually runs):
     ``a_f a_g |a_f - a_g|``.

The summed matrix is divided by its largest entry. ``correlation`` is the alternative of the
later paper (Jeong, Park, Yang, Electronics 2021): the Pearson correlation of the filters' pooled
activations over the images, negatives clipped to zero (a graph needs non-negative weights).

Thresholding (NoNN keeps only edges above the 99th percentile of the non-zero weights) belongs to
the Louvain partitioner, not to the graph: spectral partitioning uses the dense matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from kdforge.core.errors import ConfigError
from kdforge.models.taps import FeatureTap

GraphKind = Literal["hebbian", "noncoactivation", "correlation"]
GRAPH_KINDS: tuple[str, ...] = ("hebbian", "noncoactivation", "correlation")


@torch.no_grad()
def pooled_activations(
    model: nn.Module,
    images: Tensor,
    layer: str,
    *,
    normalize: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 256,
) -> Tensor:
    """Spatial mean of every filter of ``layer`` for each image: float32 ``N x C``.

    ``images`` is a uint8 or float tensor ``N x C x H x W``; ``normalize`` turns a batch of it
    into what the model expects (e.g. ``Augmentation.normalize``).
    """
    was_training = model.training
    model.eval()
    rows = []
    with FeatureTap(model, layer, detach=True) as tap:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            batch = normalize(batch) if normalize is not None else batch.float()
            model(batch)
            feature = tap.features[layer]
            if feature.dim() < 2:
                raise ConfigError(f"layer '{layer}' gives a {feature.dim()}-d output; name a conv stage")
            rows.append(feature.float().flatten(2).mean(2) if feature.dim() > 2 else feature.float())
    model.train(was_training)
    return torch.cat(rows)


def _check(activations: Tensor | np.ndarray) -> Tensor:
    acts = torch.as_tensor(np.asarray(activations) if not isinstance(activations, Tensor) else activations)
    if acts.dim() != 2 or acts.shape[1] < 2:
        raise ConfigError(f"activations must be images x filters with at least 2 filters, got {tuple(acts.shape)}")
    return acts.double()


def scaled_activations(activations: Tensor | np.ndarray) -> Tensor:
    """Step 1: clip negatives, divide each image's vector by its max (all-zero rows stay zero)."""
    acts = _check(activations).clamp_min(0)
    peak = acts.max(1, keepdim=True).values
    return torch.where(peak > 0, acts / peak.clamp_min(1e-300), torch.zeros_like(acts))


def top_k_mask(scaled: Tensor, top_k: int | None) -> Tensor:
    """Step 2: True for each image's ``top_k`` largest entries (ties broken by filter index);
    zero activations are never kept."""
    n_filters = scaled.shape[1]
    k = n_filters if top_k is None else min(int(top_k), n_filters)
    if k < 1:
        raise ConfigError(f"top_k must be at least 1, got {top_k}")
    mask = torch.zeros_like(scaled, dtype=torch.bool)
    # stable sort: equal activations keep the lower filter index first
    order = torch.sort(scaled, dim=1, descending=True, stable=True).indices[:, :k]
    mask.scatter_(1, order, True)
    return mask & (scaled > 0)


def coactivation_graph(
    activations: Tensor | np.ndarray,
    kind: Literal["hebbian", "noncoactivation"] = "hebbian",
    top_k: int | None = 50,
    chunk: int = 256,
) -> np.ndarray:
    """NoNN's filter graph (steps 1-3 and the max normalisation of step 4): ``C x C``, zero
    diagonal, symmetric, entries in [0, 1]."""
    if kind not in ("hebbian", "noncoactivation"):
        raise ConfigError(f"coactivation graph kind must be 'hebbian' or 'noncoactivation', got {kind!r}")
    scaled = scaled_activations(activations)
    kept = scaled * top_k_mask(scaled, top_k)
    n = scaled.shape[1]
    total = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, len(kept), chunk):
        a = kept[start : start + chunk]
        product = a[:, :, None] * a[:, None, :]  # zero unless both filters are kept
        gap = (a[:, :, None] - a[:, None, :]).abs()
        total += (product / (gap + 1.0) if kind == "hebbian" else product * gap).sum(0)
    total.fill_diagonal_(0.0)
    peak = float(total.max())
    return (total / peak if peak > 0 else total).numpy()


def correlation_graph(activations: Tensor | np.ndarray) -> np.ndarray:
    """Pearson correlation of the filters' pooled activations over images, negatives clipped to 0,
    zero diagonal. A filter that never varies has no edges."""
    acts = _check(activations)
    centred = acts - acts.mean(0, keepdim=True)
    norms = centred.norm(dim=0)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    corr = (centred.T @ centred) / (safe[:, None] * safe[None, :])
    corr = torch.where((norms[:, None] > 0) & (norms[None, :] > 0), corr, torch.zeros_like(corr))
    corr = corr.clamp(0.0, 1.0)
    corr.fill_diagonal_(0.0)
    return corr.numpy()


def filter_graph(activations: Tensor | np.ndarray, kind: str = "hebbian", top_k: int | None = 50) -> np.ndarray:
    """The graph of ``kind`` (``hebbian``, ``noncoactivation`` or ``correlation``)."""
    if kind == "correlation":
        return correlation_graph(activations)
    if kind in ("hebbian", "noncoactivation"):
        return coactivation_graph(activations, kind, top_k)  # type: ignore[arg-type]
    raise ConfigError(f"unknown filter graph '{kind}'; choose one of {', '.join(GRAPH_KINDS)}")


def threshold_graph(weights: np.ndarray, percentile: float | None = 99.0) -> np.ndarray:
    """NoNN step 4's sparsification: zero every weight below the ``percentile``-th percentile of
    the non-zero weights (``None`` or 0 keeps everything)."""
    w = np.array(weights, dtype=np.float64, copy=True)
    if not percentile:
        return w
    if not 0 <= percentile <= 100:
        raise ConfigError(f"percentile must be in [0, 100], got {percentile}")
    upper = w[np.triu_indices_from(w, k=1)]
    nonzero = upper[upper > 0]
    if nonzero.size == 0:
        return w
    cut = np.percentile(nonzero, percentile)
    w[w < cut] = 0.0
    return w


__all__ = [
    "GRAPH_KINDS",
    "coactivation_graph",
    "correlation_graph",
    "filter_graph",
    "pooled_activations",
    "scaled_activations",
    "threshold_graph",
    "top_k_mask",
]

"""The shared pruning core: proximal operators, magnitude masks and sparsity bookkeeping.

Everything here is a pure tensor operation (no side effect on its input) except
``prunable_layers`` and ``sparsity_of``, which only read a model.

Proximal operators (Parikh & Boyd, "Proximal Algorithms", 2014, sections 6.5.1-6.5.4): a proximal
gradient step for ``min f(W) + R(W)`` is a gradient step on the smooth ``f`` followed by
``W <- prox_{eta R}(W)`` with ``eta`` the step size.

* ``R(W) = rho ||W||_1``: ``prox`` is soft-thresholding with ``lam = eta * rho`` -> ``soft_threshold``;
* ``R(W) = rho sum_g w_g ||W_g||_2`` over groups ``g`` (output filters): ``prox`` is group
  soft-thresholding with ``lam = eta * rho * w_g`` -> ``group_soft_threshold``;
* ``R`` the indicator of ``{W : at most k non-zeros}``: ``prox`` is the Euclidean projection, which
  keeps the k largest magnitudes -> ``project_to_sparsity`` (``magnitude_mask`` gives the mask).

``sparsity`` always means the *fraction removed*: 0.75 keeps a quarter of the weights (or filters).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "group_soft_threshold",
    "magnitude_mask",
    "project_to_sparsity",
    "prunable_layers",
    "soft_threshold",
    "sparsity_of",
]


def soft_threshold(w: Tensor, lam: float | Tensor) -> Tensor:
    """``sign(w) * max(|w| - lam, 0)`` elementwise (the prox of ``lam * ||.||_1``); ``lam >= 0``.

    ``lam`` may be a tensor broadcastable to ``w`` (one threshold per entry or per filter).
    """
    if not isinstance(lam, Tensor) and lam < 0:
        raise ValueError(f"soft_threshold: lam must be >= 0, got {lam}")
    return torch.sign(w) * torch.clamp(w.abs() - lam, min=0)


def _slice_norms(w: Tensor, dim: int, norm: int) -> Tensor:
    """The L1 or L2 norm of every slice of ``w`` along ``dim`` (shape: ``w.shape[dim]``)."""
    if norm not in (1, 2):
        raise ValueError(f"norm must be 1 or 2, got {norm}")
    flat = w.movedim(dim, 0).reshape(w.shape[dim], -1)
    return flat.abs().sum(1) if norm == 1 else flat.pow(2).sum(1).sqrt()


def _along(values: Tensor, w: Tensor, dim: int) -> Tensor:
    """``values`` (one per slice along ``dim``) shaped to broadcast against ``w``."""
    shape = [1] * w.dim()
    shape[dim] = w.shape[dim]
    return values.view(shape)


def group_soft_threshold(w: Tensor, lam: float | Tensor, dim: int = 0) -> Tensor:
    """Each slice ``g`` of ``w`` along ``dim`` scaled by ``max(1 - lam / ||g||_2, 0)``.

    This is the prox of ``lam * sum_g ||g||_2`` (group lasso); with ``dim=0`` on a conv or linear
    weight the groups are the output filters (rows), so whole filters reach exactly zero. A slice
    that is already zero stays zero. ``lam`` may be a tensor with one threshold per slice.
    """
    if w.dim() == 0:
        raise ValueError("group_soft_threshold needs a tensor with at least one dimension")
    dim = dim % w.dim()
    norms = _slice_norms(w, dim, 2)
    lam_t = torch.as_tensor(lam, dtype=w.dtype, device=w.device)
    if bool((lam_t < 0).any()):
        raise ValueError(f"group_soft_threshold: lam must be >= 0, got {lam}")
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    scale = torch.where(norms > 0, torch.clamp(1 - lam_t / safe, min=0), torch.zeros_like(norms))
    return w * _along(scale, w, dim)


def _count_removed(sparsity: float, n: int) -> int:
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return int(round(float(sparsity) * n))


def _lowest(scores: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` smallest ``scores``; ties go to the lower position (stable sort)."""
    order = torch.sort(scores, stable=True).indices
    return order[:k]


def magnitude_mask(w: Tensor, sparsity: float, structured: bool = False, norm: int = 1) -> Tensor:
    """Boolean keep-mask of ``w``'s shape that removes exactly ``round(sparsity * n)`` items.

    Unstructured (``structured=False``): ``n = w.numel()`` entries, the smallest ``|w|`` removed.
    Structured: ``n = w.shape[0]`` output filters, those with the smallest L1 (``norm=1``) or L2
    (``norm=2``) norm removed whole (their mask rows are all False).

    ``round`` is Python's (halves to even: 0.5 of 5 items removes 2). Ties are broken
    deterministically: among equal magnitudes the item with the lower flat index (or the lower
    filter index) is removed first.
    """
    if structured:
        if w.dim() == 0:
            raise ValueError("structured magnitude_mask needs a tensor with an output dimension")
        scores = _slice_norms(w.detach(), 0, norm)
        removed = _lowest(scores, _count_removed(sparsity, scores.numel()))
        keep_rows = torch.ones(scores.numel(), dtype=torch.bool, device=w.device)
        keep_rows[removed] = False
        return _along(keep_rows, w, 0).expand_as(w).clone()
    if norm not in (1, 2):
        raise ValueError(f"norm must be 1 or 2, got {norm}")
    scores = w.detach().abs().reshape(-1)
    removed = _lowest(scores, _count_removed(sparsity, scores.numel()))
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=w.device)
    keep[removed] = False
    return keep.view(w.shape)


def project_to_sparsity(w: Tensor, sparsity: float, structured: bool = False, norm: int = 1) -> Tensor:
    """``w * magnitude_mask(w, sparsity, structured, norm)``: the closest tensor (in L2) with the
    requested number of entries (or filters) removed."""
    return w * magnitude_mask(w, sparsity, structured, norm)


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``nn.Conv2d`` and ``nn.Linear`` in ``model``, in module order.

    Only their ``weight`` is pruned; biases and normalisation layers are left dense.
    """
    return [(name, module) for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]


def sparsity_of(model: nn.Module) -> dict:
    """Fraction of exact zeros in the prunable weights::

    {"overall": zeros / total, "zeros": int, "total": int,
     "layers": {name: fraction of zeros in that layer's weight}}
    """
    layers: dict[str, float] = {}
    zeros = total = 0
    for name, module in prunable_layers(model):
        weight = module.weight.detach()
        layer_zeros = int((weight == 0).sum())
        layers[name] = layer_zeros / max(weight.numel(), 1)
        zeros += layer_zeros
        total += weight.numel()
    return {"overall": zeros / max(total, 1), "zeros": zeros, "total": total, "layers": layers}

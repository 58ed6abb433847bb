"""Small pieces that several method files share, so that no method imports another one's helpers.

* ``attention_map``: AT's attention of a feature map (``at``, ``ffsd``);
* ``fsp_matrix``: FSP's Gram matrix between two feature maps (``fsp``, ``crosslayer``);
* ``warmup_factor``: DKD's linear warm-up by (fractional) epochs (``dkd``, ``review_kd``);
* ``batch_accuracy``: the fraction of a batch classified correctly, a training metric
  (``adv_ce``, ``ard``, ``fast_ard``, ``robust_prune``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.methods.base import Step
from kdforge.methods.features import pool_to_common_size


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """``a(F)``: the L2-normalised, flattened channel mean of ``|F|^p`` (B x HW)."""
    attention = feature.float().abs().pow(p).mean(1)
    return F.normalize(attention.flatten(1), dim=1)


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """``G = F1 F2^T / (h w)`` per sample (B x C1 x C2), pooling the larger map to the smaller size."""
    first, second = pool_to_common_size(first, second)
    batch, c1, h, w = first.shape
    a = first.float().reshape(batch, c1, h * w)
    b = second.float().reshape(batch, second.shape[1], h * w)
    return torch.bmm(a, b.transpose(1, 2)) / (h * w)


def warmup_factor(step: Step, warmup_epochs: float) -> float:
    """``min(e / warmup_epochs, 1)`` with e the (fractional) number of epochs done after this step."""
    if warmup_epochs <= 0:
        return 1.0
    steps_per_epoch = step.total_steps / max(step.epochs, 1)
    within = min(max((step.global_step + 1) / steps_per_epoch - step.epoch, 0.0), 1.0)
    return min((step.epoch + within) / warmup_epochs, 1.0)


def batch_accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Fraction of the batch whose arg-max logit is the target (no gradient)."""
    return (logits.detach().argmax(-1) == targets).float().mean()


__all__ = ["attention_map", "batch_accuracy", "fsp_matrix", "warmup_factor"]

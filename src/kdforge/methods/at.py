"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

The student mimics the teacher's spatial *attention maps*: for a feature map F (B x C x H x W)

    A(F) = mean_c |F_c|^p                    (B x H x W)
    a(F) = vec(A(F)) / ||vec(A(F))||_2        (one unit vector per sample)

    L = ce_weight * CE(z_s, y) + weight * sum_j mean_{b, hw} (a(F_s^j) - a(F_t^j))^2

summed over the paired layers j. Channel counts may differ; when the spatial sizes differ the
larger *feature map* is adaptive-average-pooled to the smaller size first (as RepDistiller does).

Defaults follow RepDistiller's CIFAR benchmark (``distiller_zoo/AT.py``, ``-a 0 -b 1000``):
p = 2, weight = 1000 on the outputs of the three residual stages, CE weight 1. The paper writes
``beta/2 * sum_j ||a_s - a_t||_2`` with beta = 1000 (a norm, not a mean of squares); the mean of
squares is what the published CIFAR-100 numbers used.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Output, Step
from kdforge.methods.common import attention_map
from kdforge.methods.features import FeatureDistiller, FeatureParams, full_precision, pool_to_common_size


class ATParams(FeatureParams):
    weight: float = Field(1000.0, ge=0)
    p: float = Field(2.0, gt=0)
    student_layers: list[str] = Field(default_factory=lambda: ["stage1", "stage2", "stage3"], min_length=1)


def at_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """``mean((a(F_s) - a(F_t))^2)`` after pooling the larger map to the smaller size."""
    student, teacher = pool_to_common_size(student, teacher)
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


@METHODS.register("at")
class AttentionTransfer(FeatureDistiller):
    """Attention transfer (Zagoruyko & Komodakis 2017): CE + 1000 * sum_j mean((a_s - a_t)^2), p=2."""

    name = "at"
    Params = ATParams
    tasks = ("classification", "regression")

    def forward(self, batch: Batch, step: Step) -> Output:
        p: ATParams = self.params  # type: ignore[assignment]
        logits, student_feats, teacher_feats = self.run(batch)
        with full_precision(logits):
            at = torch.stack([at_loss(s, t, p.p) for s, t in zip(student_feats, teacher_feats)]).sum()
        return Output(logits, {**self.ce_losses(logits, batch), "at": p.weight * at})

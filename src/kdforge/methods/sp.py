"""Similarity-preserving KD (Tung & Mori, ICCV 2019).

Inputs that the teacher finds similar should be similar to the student too. For the features F
of a layer, flattened per sample to B x D:

    G = row_normalise(F F^T)                      (B x B, each row scaled to unit L2 norm)
    L_SP = ||G_s - G_t||_F^2 / B^2

    L = ce_weight * CE(z_s, y) + weight * sum_j L_SP(F_s^j, F_t^j)

Only B x B matrices are compared, so the student and the teacher may have any widths and
spatial sizes. Defaults follow RepDistiller's CIFAR benchmark (``distiller_zoo/SP.py``,
``-a 0 -b 3000``): the output of the last stage (``last_stage``: ``stage3`` for CIFAR ResNets,
``stage4`` for VGG), weight 3000, CE weight 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Output, Step
from kdforge.methods.features import LAST_STAGE, FeatureDistiller, FeatureParams, full_precision


class SPParams(FeatureParams):
    weight: float = Field(3000.0, ge=0)
    student_layers: list[str] = Field(default_factory=lambda: [LAST_STAGE], min_length=1)


def similarity_matrix(feature: Tensor) -> Tensor:
    """``row_normalise(F F^T)`` for features flattened per sample (B x B)."""
    flat = feature.float().flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``||G_s - G_t||_F^2 / B^2``."""
    batch = student.shape[0]
    return (similarity_matrix(student) - similarity_matrix(teacher)).pow(2).sum() / batch**2


@METHODS.register("sp")
class SimilarityPreserving(FeatureDistiller):
    """Similarity-preserving KD (Tung & Mori 2019): CE + 3000 * ||G_s - G_t||_F^2 / B^2, last stage."""

    name = "sp"
    Params = SPParams
    tasks = ("classification", "regression", "retrieval")  # relations between samples: any tapped embedding
    #: ||G_s - G_t||_F^2 / B^2 of row-normalised B x B Gram matrices scales as 1/B
    batch_size_dependent = True

    def forward(self, batch: Batch, step: Step) -> Output:
        p: SPParams = self.params  # type: ignore[assignment]
        logits, student_feats, teacher_feats = self.run(batch)
        with full_precision(logits):
            sp = torch.stack([sp_loss(s, t) for s, t in zip(student_feats, teacher_feats)]).sum()
        return Output(logits, {**self.ce_losses(logits, batch), "sp": p.weight * sp})

"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018).

The student matches the teacher's *conditional probability distribution* over the batch: how
likely sample j is to be picked as a neighbour of sample i. With cosine-similarity kernels on the
penultimate features f (B x D):

    K_ij = (1 + cos(f_i, f_j)) / 2                (in [0, 1])
    P_ij = K_ij / sum_j K_ij                      (row i: distribution over neighbours)

    L_PKT = mean_{i, j} P^t_ij * log((P^t_ij + eps) / (P^s_ij + eps))

    L = ce_weight * CE(z_s, y) + weight * L_PKT

The KL is *averaged over all B x B entries* (so it is the batch-mean KL divided by B), the
self-similarity diagonal included, as in the authors' code and RepDistiller
(``distiller_zoo/PKT.py``); the weight 30000 of RepDistiller's CIFAR benchmark (``-a 0 -b 30000``)
is calibrated for that convention. Default layer: ``pool`` (the classifier input); widths may
differ between student and teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Output, Step
from kdforge.methods.features import FeatureDistiller, FeatureParams, full_precision


class PKTParams(FeatureParams):
    weight: float = Field(30000.0, ge=0)
    eps: float = Field(1e-7, gt=0)
    student_layers: list[str] = Field(default_factory=lambda: ["pool"], min_length=1)


def neighbour_probabilities(feature: Tensor, eps: float = 1e-7) -> Tensor:
    """``P_ij``: row-normalised cosine kernel ``(1 + cos) / 2`` of the flattened features."""
    unit = F.normalize(feature.float().flatten(1), dim=1, eps=eps)
    kernel = (unit @ unit.t() + 1.0) / 2.0
    return kernel / kernel.sum(1, keepdim=True)


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = 1e-7) -> Tensor:
    """``mean_ij P^t_ij log((P^t_ij + eps) / (P^s_ij + eps))``."""
    p_s = neighbour_probabilities(student, eps)
    p_t = neighbour_probabilities(teacher, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@METHODS.register("pkt")
class ProbabilisticKT(FeatureDistiller):
    """Probabilistic KT (Passalis & Tefas 2018): CE + 30000 * KL of cosine-kernel neighbour probs."""

    name = "pkt"
    Params = PKTParams
    tasks = ("classification", "regression", "retrieval")  # relations between samples: any tapped embedding
    #: the neighbour probabilities are normalised over the B samples of the batch, so the KL scales as 1/B
    batch_size_dependent = True

    def forward(self, batch: Batch, step: Step) -> Output:
        p: PKTParams = self.params  # type: ignore[assignment]
        logits, student_feats, teacher_feats = self.run(batch)
        with full_precision(logits):
            pkt = torch.stack([pkt_loss(s, t, p.eps) for s, t in zip(student_feats, teacher_feats)]).sum()
        return Output(logits, {**self.ce_losses(logits, batch), "pkt": p.weight * pkt})

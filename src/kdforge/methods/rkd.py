"""Relational knowledge distillation (Park, Kim, Lu & Cho, CVPR 2019).

The student reproduces the *relations* between the teacher's embeddings of a batch rather than
the embeddings themselves, so the widths may differ. For embeddings t_i (flattened per sample):

* distance-wise: ``psi_D(i, j) = ||t_i - t_j||_2 / mu``, with ``mu`` the mean of the non-zero
  pairwise distances of the batch (each network normalised by its own ``mu``);
* angle-wise: ``psi_A(i, j, k) = <e_ji, e_ki>`` with ``e_ji = (t_j - t_i) / ||t_j - t_i||``, the
  cosine of the angle at vertex i (a zero vector where two points coincide).

    L_D = mean_{i,j} Huber(psi_D^s - psi_D^t)         (B^2 terms, diagonal included)
    L_A = mean_{i,j,k} Huber(psi_A^s - psi_A^t)       (B^3 terms, degenerate triplets included)

    L = ce_weight * CE(z_s, y) + weight * (distance_weight * L_D + angle_weight * L_A)

with Huber = smooth-L1 (delta 1). Defaults: the paper's 25 / 50 on the penultimate embeddings
(``pool``), and RepDistiller's CIFAR benchmark ``CE + 1 * L_RKD`` (``distiller_zoo/RKD.py``,
``-a 0 -b 1``); the means over all B^2 / B^3 entries are that code's convention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Output, Step
from kdforge.methods.features import FeatureDistiller, FeatureParams, full_precision


class RKDParams(FeatureParams):
    weight: float = Field(1.0, ge=0)
    distance_weight: float = Field(25.0, ge=0)
    angle_weight: float = Field(50.0, ge=0)
    student_layers: list[str] = Field(default_factory=lambda: ["pool"], min_length=1)


def _differences(embedding: Tensor) -> Tensor:
    """``diff[i, j] = e_j - e_i`` (B x B x D)."""
    flat = embedding.float().flatten(1)
    return flat.unsqueeze(0) - flat.unsqueeze(1)


def normalised_distances(embedding: Tensor, eps: float = 1e-12) -> Tensor:
    """Pairwise distances divided by their mean over the non-zero ones (zero diagonal)."""
    diff = _differences(embedding)
    off_diagonal = 1.0 - torch.eye(diff.shape[0], device=diff.device)
    # clamp before the square root so that coinciding points have a finite gradient
    dist = diff.pow(2).sum(2).clamp_min(eps).sqrt() * off_diagonal
    positive = dist > 0
    if positive.any():
        dist = dist / dist[positive].mean()
    return dist


def angles(embedding: Tensor) -> Tensor:
    """``<e_ji, e_ki>`` for every vertex i and pair (j, k): a B x B x B tensor."""
    unit = F.normalize(_differences(embedding), dim=2)
    return unit @ unit.transpose(1, 2)


def rkd_losses(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """``(L_D, L_A)``: smooth-L1 between normalised distances and between angles."""
    with torch.no_grad():
        t_dist, t_angle = normalised_distances(teacher), angles(teacher)
    distance = F.smooth_l1_loss(normalised_distances(student), t_dist)
    angle = F.smooth_l1_loss(angles(student), t_angle)
    return distance, angle


@METHODS.register("rkd")
class RelationalKD(FeatureDistiller):
    """Relational KD (Park et al. 2019): CE + 25 * distance + 50 * angle smooth-L1 on pooled embeddings."""

    name = "rkd"
    Params = RKDParams
    #: retrieval: tap the embedding (``student_layers: [embedding]``) and keep its relations
    tasks = ("classification", "regression", "retrieval")

    def forward(self, batch: Batch, step: Step) -> Output:
        p: RKDParams = self.params  # type: ignore[assignment]
        logits, student_feats, teacher_feats = self.run(batch)
        with full_precision(logits):
            terms = [rkd_losses(s, t) for s, t in zip(student_feats, teacher_feats)]
        distance = torch.stack([d for d, _ in terms]).sum()
        angle = torch.stack([a for _, a in terms]).sum()
        losses = {
            **self.ce_losses(logits, batch),
            "rkd_distance": p.weight * p.distance_weight * distance,
            "rkd_angle": p.weight * p.angle_weight * angle,
        }
        return Output(logits, losses)

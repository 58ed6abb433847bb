"""Metric learning for retrieval: identity cross-entropy plus a triplet and/or contrastive loss on
the embedding. The student alone (no teacher) of the retrieval benchmarks.

* **Batch-hard triplet** (Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person
  Re-Identification", arXiv 1703.07737, 2017): for every anchor a of the batch, its farthest
  positive and nearest negative::

      L_tri = mean_a max(0, margin + max_{p: y_p = y_a, p != a} d(a, p) - min_{n: y_n != y_a} d(a, n))

  Anchors without a positive or a negative in the batch are left out (a P x K sampler,
  ``data.sampler: {name: pk, k: 4}``, gives every anchor both).
* **Contrastive** (Hadsell, Chopra & LeCun, CVPR 2006), over the B(B-1)/2 pairs::

      L_con = mean_{i<j} [ y_ij d_ij^2 + (1 - y_ij) max(0, margin - d_ij)^2 ] / 2

    L = ce_weight * CE(z, y) + triplet_weight * L_tri + contrastive_weight * L_con

``d`` is the Euclidean distance between embeddings, L2-normalised first when ``normalize`` (the
default; then the margins are on the unit sphere). The embedding is the tapped ``layer``: by
default the ``embedding`` feature point where the network has one (``embed_cnn``), else ``pool``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Distiller, MethodParams, Output, Step
from kdforge.models.taps import FeatureTap


def pairwise_distances(embedding: Tensor, eps: float = 1e-12) -> Tensor:
    """B x B Euclidean distances, with a finite gradient where two points coincide."""
    flat = embedding.float().flatten(1)
    squared = (flat.unsqueeze(1) - flat.unsqueeze(0)).pow(2).sum(2)
    return squared.clamp_min(eps).sqrt() * (1.0 - torch.eye(len(flat), device=flat.device))


def batch_hard_triplet(embedding: Tensor, labels: Tensor, margin: float) -> Tensor:
    """The batch-hard triplet loss (mean over the anchors that have a positive and a negative)."""
    distances = pairwise_distances(embedding)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & ~eye
    negative = ~same
    usable = positive.any(1) & negative.any(1)
    if not usable.any():
        return embedding.sum() * 0.0
    hardest_positive = distances.masked_fill(~positive, float("-inf")).max(1).values
    hardest_negative = distances.masked_fill(~negative, float("inf")).min(1).values
    losses = F.relu(margin + hardest_positive - hardest_negative)
    return losses[usable].mean()


def contrastive_pairs(embedding: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Hadsell et al.'s contrastive loss averaged over every pair i < j of the batch."""
    distances = pairwise_distances(embedding)
    same = (labels.unsqueeze(0) == labels.unsqueeze(1)).float()
    upper = torch.triu(torch.ones_like(distances, dtype=torch.bool), diagonal=1)
    terms = same * distances.pow(2) + (1.0 - same) * F.relu(margin - distances).pow(2)
    return terms[upper].mean() / 2.0


class MetricParams(MethodParams):
    ce_weight: float = Field(1.0, ge=0)
    triplet_weight: float = Field(1.0, ge=0)
    margin: float = Field(0.3, gt=0)
    contrastive_weight: float = Field(0.0, ge=0)
    contrastive_margin: float = Field(1.0, gt=0)
    normalize: bool = True
    layer: str | None = None


@METHODS.register("metric")  # type: ignore[arg-type]  # (the registry is typed for factories)
class MetricLearning(Distiller):
    """Identity CE + batch-hard triplet (+ contrastive) on the tapped embedding; no teacher."""

    name = "metric"
    Params = MetricParams
    teachers_required = (0, 0)
    tasks = ("retrieval", "classification")

    def __init__(self, student: nn.Module, teachers=(), params=None) -> None:
        super().__init__(student, teachers, params)
        p: MetricParams = self.params  # type: ignore[assignment]
        if not (p.ce_weight or p.triplet_weight or p.contrastive_weight):
            raise ValueError("method 'metric': every weight is 0, so nothing is trained; set one above 0")
        points = getattr(student, "feature_points", None) or {}
        self.layer = p.layer or ("embedding" if "embedding" in points else "pool")
        self.tap = FeatureTap(student, [self.layer])

    def forward(self, batch: Batch, step: Step) -> Output:
        p: MetricParams = self.params  # type: ignore[assignment]
        logits, features = self.tap(batch.image)
        embedding = features[self.layer].flatten(1).float()
        self.tap.clear()
        if p.normalize:
            embedding = F.normalize(embedding, dim=1)
        labels = batch.targets
        losses: dict[str, Tensor] = {}
        if p.ce_weight:
            losses["ce"] = p.ce_weight * self.supervised_loss(logits, labels)
        if p.triplet_weight:
            losses["triplet"] = p.triplet_weight * batch_hard_triplet(embedding, labels, p.margin)
        if p.contrastive_weight:
            losses["contrastive"] = p.contrastive_weight * contrastive_pairs(embedding, labels, p.contrastive_margin)
        return Output(logits, losses)

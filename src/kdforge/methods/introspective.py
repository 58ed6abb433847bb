"""Introspective learning from online self-explanations (Gu, Wu & Tresp, ACCV 2020, arXiv 2009.09140).

**RECONSTRUCTED** from the paper's abstract (the full text was not read, and no public code is
known). The abstract says a model can be trained on soft targets built from its *own* online
explanations (no teacher, no peers), because what matters in a teacher's soft output is the
non-zero mass on other classes and the class similarity it encodes. The construction below (Grad-CAM explanations, cosine class similarity,
a softmax target) is our reading of that sentence, not the paper's algorithm; every choice is a
parameter.

At every step, with ``F`` the student's feature map at ``layer`` (default ``stage3``, the last
conv stage) and ``z`` its logits, for the label ``y`` and the top-``top_k`` predicted classes:

    w_k^c = mean_{u,v} dz_c / dF_k(u, v)          (one autograd.grad per class slot, no 2nd order)
    E_c   = ReLU(sum_k w_k^c F_k)                  (Grad-CAM; constants, no gradient flows back)
    s_c   = cos(vec E_c, vec E_y)   (s_y = 1)      classes outside the top-K: ``floor``
    q     = softmax(s / similarity_temperature)    [optionally (1 - eps) onehot(y) + eps q_{not y}]
    L     = (1 - alpha) CE(z, y) + alpha tau'^2 KL(q || softmax(z / tau'))     (tau' = temperature)

``floor`` is ``exclude`` (the default: those classes get probability 0, so the target lives on the
label and the top-K), ``min`` (each gets the sample's smallest computed similarity) or a number
(e.g. -1; Grad-CAM maps are non-negative, so every computed cosine is in [0, 1]).

The K + 1 gradients are taken by K + 1 calls of ``torch.autograd.grad`` of ``sum_b z[b, c_b]``
(slot j picks class ``c_b`` per sample) on the retained graph. Measured on resnet8 (batch 64, 1
thread) this costs +4 % over plain training at ``stage3`` and +39 % at ``stage2``; one batched call
(``is_grads_batched``, vmap over the backward) was no faster (+6 % / +63 %) and supports fewer ops,
so the loop is used. Summing over the batch gives per-sample gradients exactly when no layer after
``layer`` mixes samples; a train-mode BatchNorm after the tap (e.g. ``layer: stage2``) adds its
small batch-statistics cross terms, which is accepted here.

Defaults (the paper's values are unknown): the midpoints of the grid we chose to sweep when
reconstructing it (similarity temperature 0.5 of {0.1, 0.5, 1}, alpha 0.5 of {0.3, 0.5, 0.9});
tau' = 1 (no value is suggested; the target is not a logit vector);
``label_mix`` 0.1, because without it the target's label mass is about 0.28 and accuracy drops
(measured; see the docs page).
"""  # noqa: E501

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdforge.core.errors import ConfigError
from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Distiller, MethodParams, Output, Step
from kdforge.methods.losses import soft_kl
from kdforge.models import FeatureTap


class IntrospectiveParams(MethodParams):
    #: feature map that is explained (a module name or feature point with a B x C x H x W output)
    layer: str = "stage3"
    #: predicted classes explained besides the label
    top_k: int = Field(5, ge=1)
    #: tau: temperature of softmax(s / tau) over the explanation similarities
    similarity_temperature: float = Field(0.5, gt=0.0)
    #: tau': temperature of the student side of the KL (the term is scaled by tau'^2)
    temperature: float = Field(1.0, gt=0.0)
    #: weight of the self-explanation term; CE gets 1 - alpha
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    #: similarity of classes outside the label and the top-K: exclude (probability 0), min, or a number
    floor: Literal["exclude", "min"] | float = "exclude"
    #: eps of (1 - eps) onehot(y) + eps q_{not y}; None keeps q as it is. Default 0.1: unmixed, q
    #: gives the label only ~0.28 (the top-K explanations are all alike) and cost 6 points on
    #: cifar10-lite (61.02 vs 66.51 with 0.1, seed 0; docs/methods/introspective.md)
    label_mix: float | None = Field(0.1, ge=0.0, le=1.0)
    reduction: Literal["batchmean", "elementmean"] = "batchmean"


def gradcam_similarities(logits: Tensor, features: Tensor, classes: Tensor) -> Tensor:
    """Cosine similarity of the Grad-CAM map of each class in ``classes`` (B x J) to that of
    ``classes[:, 0]``, as a B x J tensor of constants.

    ``features`` must be part of the graph of ``logits`` (the graph is retained for the loss).
    """
    grads = []
    for slot in range(classes.shape[1]):
        selected = logits.gather(1, classes[:, slot : slot + 1]).sum()
        (grad,) = torch.autograd.grad(selected, features, retain_graph=True)
        grads.append(grad.float().flatten(2).mean(-1))  # w^c: spatial mean of dz_c/dF, B x C
    feats = features.detach().float()
    weights = torch.stack(grads, 1)  # B x J x C
    maps = F.relu(torch.einsum("bjc,bc...->bj...", weights, feats)).flatten(2)  # B x J x HW
    return F.cosine_similarity(maps, maps[:, :1], dim=-1, eps=1e-12)


@METHODS.register("introspective")
class Introspective(Distiller):
    """Introspective learning (Gu, Wu & Tresp 2020; RECONSTRUCTED): targets from own Grad-CAM similarities."""

    name = "introspective"
    Params = IntrospectiveParams
    teachers_required = (0, 0)

    def __init__(self, student, teachers=(), params=None) -> None:
        super().__init__(student, teachers, params)
        self.tap = FeatureTap(self.student, [self.params.layer])

    def soft_targets(self, logits: Tensor, features: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(q, similarities of the explained slots, explained classes) for one batch."""
        p: IntrospectiveParams = self.params  # type: ignore[assignment]
        batch, num_classes = logits.shape
        k = min(p.top_k, num_classes)
        classes = torch.cat([targets[:, None], logits.detach().topk(k, dim=-1).indices], dim=1)
        sims = gradcam_similarities(logits, features, classes)
        sims[:, 0] = 1.0  # s_y = 1 by definition (also when the label's map is all zero)
        if p.floor == "exclude":
            base = torch.full((batch, num_classes), float("-inf"), device=logits.device)
        elif p.floor == "min":
            base = sims.min(dim=1, keepdim=True).values.expand(batch, num_classes).clone()
        else:
            base = torch.full((batch, num_classes), float(p.floor), device=logits.device)
        s = base.scatter(1, classes, sims)
        q = F.softmax(s / p.similarity_temperature, dim=-1)
        if p.label_mix is not None:
            onehot = F.one_hot(targets, num_classes).to(q.dtype)
            others = q * (1 - onehot)
            total = others.sum(-1, keepdim=True)
            # no other class explained (top-1 = y, K = 1): all the mass stays on the label
            others = torch.where(total > 0, others / total.clamp_min(1e-12), onehot)
            q = (1 - p.label_mix) * onehot + p.label_mix * others
        return q, sims, classes

    def forward(self, batch: Batch, step: Step) -> Output:
        p: IntrospectiveParams = self.params  # type: ignore[assignment]
        logits = self.student(batch.image)
        features = self.tap.features.get(p.layer)
        if not isinstance(features, Tensor) or features.dim() < 3:
            raise ConfigError(
                f"introspective: layer '{p.layer}' must output a B x C x H x W feature map; "
                "choose a conv stage such as stage3"
            )
        if not features.requires_grad:
            raise RuntimeError("introspective explains the student with autograd: call it with gradients enabled")
        q, sims, classes = self.soft_targets(logits, features, batch.targets)
        losses: dict[str, Tensor] = {}
        if p.alpha:
            kl = soft_kl(logits, q, p.temperature, reduction=p.reduction)
            losses["introspective"] = p.alpha * kl
        if p.alpha < 1.0:
            losses["ce"] = (1.0 - p.alpha) * F.cross_entropy(logits, batch.targets)
        not_label = (classes[:, 1:] != batch.targets[:, None]).float()
        similarity = (sims[:, 1:] * not_label).sum() / not_label.sum().clamp_min(1.0)
        label_mass = q.gather(1, batch.targets[:, None]).mean()
        return Output(logits, losses, {"explanation_similarity": similarity, "target_label_prob": label_mass})

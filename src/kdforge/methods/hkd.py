"""Holistic Knowledge Distillation with graph neural networks (Zhou et al., ICCV 2021).

Individual knowledge (each sample's embedding) and relational knowledge (its neighbourhood in the
batch) are fused into a *holistic* embedding by a one-hop graph convolution over a kNN graph of
the batch, and both kinds are distilled with InfoNCE against memory banks, in both directions.

Per network (student s, teacher t), on penultimate features f and logits z:

* individual embedding ``e = n(W f + b)`` (128-d; both heads trained, teacher backbone frozen);
* kNN graph of the batch: distance ``1 - cos(softmax(z_i), softmax(z_j))`` on the network's own
  (detached) logits; node i receives messages from its k nearest samples. As in the reference
  code (``distiller_zoo/GNN.py``: the diagonal is set to -1 before the ascending top-k) the node
  itself is one of its k neighbours (``knn_include_self: false`` takes k *other* samples);
* holistic embedding ``g = n(Lin([e, A_norm e]))``, a TAGConv layer with one hop: ``A[i, j] = 1``
  for j in kNN(i), ``A_norm = D^-1/2 A D^-1/2`` with D the in-degrees (each node has k, so
  ``A_norm e`` is the mean over the neighbourhood), Lin: 256 -> 128 with bias; one GNN per network.

Two memory banks ``M^s, M^t`` (N x 128) hold the individual embeddings, ``m_i <- n(0.9 m_i + 0.1 e_i)``
after the step. With K negative indices per sample (from other classes by default) and tau = 0.07:

    InfoNCE(a, p, negatives) = CE([<a, p>, <a, m_j1>, ..., <a, m_jK>] / tau, 0)

    L_ind = InfoNCE(e_s, M^t_i, M^s_neg) + InfoNCE(e_t, M^s_i, M^t_neg)
    L_hol = InfoNCE(g_s, n(0.75 M^t_i + 0.25 g_t), M^s_neg) + InfoNCE(g_t, n(0.75 M^s_i + 0.25 g_s), M^t_neg)
    L = ce_weight * CE + kd_weight * T^2 KL_T(z_t || z_s) + beta * (L_ind + L_hol)

Positives and smoothed positives are constants (no gradient); the banks are read before the
update. In the reference code each anchor's negatives come from its *own* network's bank (above;
``negative_bank: other`` takes them from the other network's bank, as CRD does). ``L_hol`` is
skipped when the batch is smaller than the graph needs (B < k, or k + 1 without self).

Defaults (``wyc-ruiker/HKD``, ``scripts/run_cifar_distill.sh``): CE 1, beta 3, KD 0 (HKD) or 1
(HKD+KD, T = 4), k = 8, K = 16384 from other classes (clamped to N - 1), tau = 0.07.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Output, Step
from kdforge.methods.contrastive import ContrastiveDistiller, ContrastiveParams, info_nce, l2_normalise
from kdforge.methods.features import full_precision


class HKDParams(ContrastiveParams):
    beta: float = Field(3.0, ge=0)
    momentum: float = Field(0.9, ge=0, le=1)
    negatives: Literal["other_indices", "other_classes"] = "other_classes"
    negative_bank: Literal["own", "other"] = "own"
    knn: int = Field(8, ge=1)
    knn_include_self: bool = True
    holistic_bank_weight: float = Field(0.75, ge=0, le=1)


def knn_adjacency(logits: Tensor, k: int, include_self: bool = True, eps: float = 1e-7) -> Tensor:
    """B x B matrix with ``A[i, j] = 1`` when j is one of the k nearest samples of i.

    Distance: ``1 - cos(softmax(z_i), softmax(z_j))`` on detached logits. With ``include_self``
    the node itself is taken first (its distance is set to -1, as the reference does); otherwise
    it is excluded.
    """
    probs = F.softmax(logits.detach().float(), dim=-1)
    norms = probs.norm(dim=1, keepdim=True)
    dist = 1.0 - (probs @ probs.t()) / (norms @ norms.t()).clamp_min(eps)
    dist.fill_diagonal_(-1.0 if include_self else float("inf"))
    neighbours = dist.topk(k, dim=1, largest=False).indices
    return torch.zeros_like(dist).scatter_(1, neighbours, 1.0)


def normalised_adjacency(adjacency: Tensor) -> Tensor:
    """``D^-1/2 A D^-1/2`` with D the in-degrees (row sums of A), clamped to at least 1 (TAGConv)."""
    norm = adjacency.sum(1).clamp_min(1.0).pow(-0.5)
    return norm.unsqueeze(1) * adjacency * norm.unsqueeze(0)


class OneHopGraphConv(nn.Module):
    """TAGConv with one hop, then L2 normalisation: ``n(Lin([h, A_norm h]))``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(2 * dim_in, dim_out)

    def forward(self, h: Tensor, adjacency: Tensor) -> Tensor:
        aggregated = normalised_adjacency(adjacency).to(h.dtype) @ h
        return l2_normalise(self.linear(torch.cat([h, aggregated], dim=1)))


@METHODS.register("hkd")
class HolisticKD(ContrastiveDistiller):
    """HKD (Zhou et al. 2021): CE + 3 * InfoNCE of individual and kNN-graph embeddings vs memory banks."""

    name = "hkd"
    Params = HKDParams

    def __init__(
        self, student, teachers=(), params=None, input_shape=None, num_samples=None, train_labels=None
    ) -> None:
        super().__init__(student, teachers, params, input_shape, num_samples, train_labels)
        dim = self.params.feature_dim  # type: ignore[attr-defined]
        self.gnn_student = OneHopGraphConv(dim, dim)
        self.gnn_teacher = OneHopGraphConv(dim, dim)

    def graph_runs(self, batch_size: int) -> bool:
        p: HKDParams = self.params  # type: ignore[assignment]
        return batch_size >= p.knn + (0 if p.knn_include_self else 1)

    def forward(self, batch: Batch, step: Step) -> Output:
        p: HKDParams = self.params  # type: ignore[assignment]
        logits, student_feat, teacher_logits, teacher_feat = self.run_pair(batch)
        index = batch.index.long()
        tau = p.nce_temperature
        with full_precision(logits):
            e_s, e_t = self.embed(student_feat, teacher_feat)
            if self.training:
                self.record_labels(batch)
            negatives = self.negatives(batch)
            own = p.negative_bank == "own"
            bank_for_s = self.memory_student if own else self.memory_teacher  # negatives of student anchors
            bank_for_t = self.memory_teacher if own else self.memory_student
            # individual: the positive is the other network's bank row of the same sample
            individual = info_nce(
                e_s, self.memory_teacher.rows(index), bank_for_s.scores(e_s, negatives), tau
            ) + info_nce(e_t, self.memory_student.rows(index), bank_for_t.scores(e_t, negatives), tau)
            losses = {"hkd_individual": p.beta * individual}
            if self.graph_runs(len(batch)):
                g_s = self.gnn_student(e_s, knn_adjacency(logits, p.knn, p.knn_include_self))
                g_t = self.gnn_teacher(e_t, knn_adjacency(teacher_logits, p.knn, p.knn_include_self))
                w = p.holistic_bank_weight
                # holistic: the positive is n(w * other bank row + (1 - w) * other holistic embedding)
                holistic = info_nce(
                    g_s, self.memory_teacher.blend(index, g_t, w), bank_for_s.scores(g_s, negatives), tau
                ) + info_nce(g_t, self.memory_student.blend(index, g_s, w), bank_for_t.scores(g_t, negatives), tau)
                losses["hkd_holistic"] = p.beta * holistic
            else:  # too few samples for the kNN graph (the reference skips the term too)
                losses["hkd_holistic"] = individual.new_zeros(())
        self.update_banks(index, e_s, e_t)
        return Output(logits, {**self.classification_losses(logits, teacher_logits, batch), **losses})

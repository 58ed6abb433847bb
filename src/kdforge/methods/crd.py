"""Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020).

The student's penultimate representation is trained to be *recognisable* by the teacher's: a
binary noise-contrastive estimator tells the (teacher, student) embedding pair of the same sample
apart from pairs of different samples, which maximises a lower bound on their mutual information.

Embeddings ``g_s = n(W_s f_s)``, ``g_t = n(W_t f_t)`` (128-d, n = L2 normalisation; both heads
trained, the teacher's backbone frozen). Two memory banks ``M^s, M^t`` (N x 128) hold one
embedding per training sample. For an anchor ``g`` of sample i, the rows of the *other* network's
bank at ``i`` (positive) and at K negative indices ``j_1..j_K`` give

    P(j) = exp(<g, m_j> / tau) / Z          P_n = 1 / N  (uniform noise)

    L(g) = -log(P(i) / (P(i) + K P_n + eps)) - sum_k log(K P_n / (P(j_k) + K P_n + eps))

summed over the batch and divided by B, with eps = 1e-7 and Z = N * mean(exp(<g, m>/tau)) over
the B x (K+1) scores of the first training batch, then fixed (one Z per anchor side, stored in
the ``log_z`` buffer). Symmetric: ``L_CRD = L(g_s vs M^t) + L(g_t vs M^s)``. After the step both
banks move toward the batch: ``m_i <- n(0.5 m_i + 0.5 g_i)``.

    L = ce_weight * CE(z_s, y) + kd_weight * T^2 KL_T(z_t || z_s) + beta * L_CRD

Defaults: RepDistiller (``crd/criterion.py``, ``crd/memory.py``, ``train_student.py``): 128-d,
K = 16384 (clamped to N - 1), tau = 0.07, momentum 0.5, ``-a 0 -b 0.8`` (CE 1, KD 0, beta 0.8);
"CRD+KD" is ``kd_weight`` > 0 (RepDistiller ``-a 1``, T = 4). Negatives: drawn from samples of
*other classes*, as the reference's data loader does (``negatives: other_classes``, the default);
``negatives: other_indices`` draws uniformly over every other index (about 1/C same-class
negatives; needed when targets are not class labels). ``batch.extras["contrast_index"]`` (B x K)
fixes them.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Output, Step
from kdforge.methods.contrastive import ContrastiveDistiller, ContrastiveParams, gather_rows
from kdforge.methods.features import full_precision


class CRDParams(ContrastiveParams):
    beta: float = Field(0.8, ge=0)
    momentum: float = Field(0.5, ge=0, le=1)
    eps: float = Field(1e-7, ge=0)
    negatives: Literal["other_indices", "other_classes"] = "other_classes"


def estimate_log_z(scores: Tensor, temperature: float, num_samples: int) -> Tensor:
    """``log(N * mean(exp(scores / tau)))``, computed without overflow and without gradient."""
    logits = scores.detach().flatten() / temperature
    return torch.logsumexp(logits, 0) - math.log(logits.numel()) + math.log(num_samples)


def crd_nce_loss(
    scores: Tensor, log_z: Tensor | float, num_samples: int, temperature: float, eps: float = 1e-7
) -> Tensor:
    """The NCE loss of one anchor side.

    ``scores`` is B x (K+1): inner products of each anchor with its positive (column 0) and its K
    negatives. ``P = exp(scores / tau) / Z``; returns
    ``-(sum_b log(P_b0 / (P_b0 + K/N + eps)) + sum_bk log((K/N) / (P_bk + K/N + eps))) / B``,
    evaluated in log space (same value, no overflow for small tau).
    """
    batch, k = scores.shape[0], scores.shape[1] - 1
    log_p = scores / temperature - log_z
    noise = k / num_samples  # K * P_n
    log_noise_eps = math.log(noise + eps)
    log_d1 = -F.softplus(log_noise_eps - log_p[:, 0])  # log(P / (P + K P_n + eps))
    log_d0 = math.log(noise) - torch.logaddexp(log_p[:, 1:], torch.full_like(log_p[:, 1:], log_noise_eps))
    return -(log_d1.sum() + log_d0.sum()) / batch


@METHODS.register("crd")
class ContrastiveRepresentationDistillation(ContrastiveDistiller):
    """CRD (Tian et al. 2020): CE + 0.8 * NCE between 128-d embeddings and memory banks (K=16384, tau=0.07)."""

    name = "crd"
    Params = CRDParams
    #: retrieval: tap the embedding (``student_layers: [embedding]``); negatives from other identities
    tasks = ("classification", "retrieval")
    cross_modal = True  # the teacher reads its own input of paired data

    def __init__(
        self, student, teachers=(), params=None, input_shape=None, num_samples=None, train_labels=None
    ) -> None:
        super().__init__(student, teachers, params, input_shape, num_samples, train_labels)
        # log Z of the student-anchor side (vs the teacher bank) and of the teacher-anchor side;
        # NaN until the first training batch sets them
        self.register_buffer("log_z", torch.full((2,), float("nan")))

    @property
    def z(self) -> Tensor:
        """The NCE normalisers (student anchor, teacher anchor); NaN before the first batch."""
        return self.log_z.exp()

    def _log_z(self, side: int, scores: Tensor) -> Tensor:
        p: CRDParams = self.params  # type: ignore[assignment]
        if torch.isnan(self.log_z[side]):
            # over the scores of every rank's first batch, so that all ranks share one normaliser
            (every_rank,) = gather_rows(scores)
            estimate = estimate_log_z(every_rank, p.nce_temperature, self.num_samples)
            if not self.training:  # an evaluation call leaves the run's normaliser unset
                return estimate
            self.log_z[side] = estimate
        return self.log_z[side].clone()

    def forward(self, batch: Batch, step: Step) -> Output:
        p: CRDParams = self.params  # type: ignore[assignment]
        logits, student_feat, teacher_logits, teacher_feat = self.run_pair(batch)
        index = batch.index.long()
        with full_precision(logits):
            student_embed, teacher_embed = self.embed(student_feat, teacher_feat)
            if self.training:
                self.record_labels(batch)
            candidates = torch.cat([index.unsqueeze(1), self.negatives(batch)], dim=1)  # positive first
            student_scores = self.memory_teacher.scores(student_embed, candidates)
            teacher_scores = self.memory_student.scores(teacher_embed, candidates)
            student_side = crd_nce_loss(
                student_scores, self._log_z(0, student_scores), self.num_samples, p.nce_temperature, p.eps
            )
            teacher_side = crd_nce_loss(
                teacher_scores, self._log_z(1, teacher_scores), self.num_samples, p.nce_temperature, p.eps
            )
        self.update_banks(index, student_embed, teacher_embed)
        losses = {
            **self.classification_losses(logits, teacher_logits, batch),
            "crd": p.beta * (student_side + teacher_side),
        }
        metrics = {"crd_student_anchor": student_side.detach(), "crd_teacher_anchor": teacher_side.detach()}
        return Output(logits, losses, metrics)

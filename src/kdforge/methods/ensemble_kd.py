"""Distillation from an offline ensemble of several pre-trained teachers.

The teachers' outputs are combined into one soft target and the student is trained with the KD
loss of ``kd`` (same temperature, weights, schedules and selective options)::

    target = sum_k w_k(x) * softmax(z_k / T)          (aggregate: probs)
    target = softmax(sum_k w_k(x) * z_k / T)          (aggregate: logits)

Weights ``w_k`` (summing to 1):

* ``mean``: uniform, 1/K;
* ``fixed``: ``teacher_weights`` given in the recipe (normalised), e.g. by validation accuracy;
* ``learned``: a trainable logit per teacher, softmax-normalised and trained by the same loss.
  Note that the KD loss alone pulls the weights toward the teachers the student already matches
  best; ``weight_entropy`` adds an entropy bonus that keeps them from collapsing;
* ``confidence``: per sample, a softmax over teachers of their negative prediction entropy
  divided by ``confidence_temperature`` (confident teachers weigh more on that sample).

The offline ensemble of Chou, Chiu & Liao's cross-layer KD (stage 2) is ``aggregate: logits`` with
``mean`` weights.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Output, Step
from kdforge.methods.kd import KDParams, SoftTargetDistiller


class EnsembleKDParams(KDParams):
    aggregate: Literal["probs", "logits"] = "probs"
    weighting: Literal["mean", "fixed", "learned", "confidence"] = "mean"
    teacher_weights: list[float] | None = None
    confidence_temperature: float = Field(1.0, gt=0.0)
    weight_entropy: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _weights_given(self) -> EnsembleKDParams:
        if self.weighting == "fixed" and not self.teacher_weights:
            raise ValueError("weighting 'fixed' needs 'teacher_weights', one number per teacher")
        if self.teacher_weights and any(w < 0 for w in self.teacher_weights):
            raise ValueError("'teacher_weights' must be non-negative")
        return self


@METHODS.register("ensemble_kd")
class EnsembleKD(SoftTargetDistiller):
    """KD from K >= 1 pre-trained teachers aggregated by mean, fixed, learned or confidence weights."""

    name = "ensemble_kd"
    Params = EnsembleKDParams
    teachers_required = (1, None)
    replays_teacher_logits = True

    def __init__(self, student, teachers=(), params=None) -> None:
        super().__init__(student, teachers, params)
        p: EnsembleKDParams = self.params  # type: ignore[assignment]
        k = len(self.teachers)
        if p.teacher_weights is not None and len(p.teacher_weights) != k:
            raise ValueError(f"'teacher_weights' has {len(p.teacher_weights)} entries for {k} teachers")
        if p.weighting == "fixed" and sum(p.teacher_weights or []) <= 0:
            raise ValueError("'teacher_weights' must not all be zero")
        if p.weighting == "learned":
            self.teacher_weight_logits = nn.Parameter(torch.zeros(k))

    def teacher_weights(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Weights of shape K x B (or K x 1) that sum to one over teachers."""
        p: EnsembleKDParams = self.params  # type: ignore[assignment]
        k = teacher_logits.shape[0]
        device = teacher_logits.device
        if p.weighting == "fixed":
            w = torch.tensor(p.teacher_weights, dtype=torch.float32, device=device)
            return (w / w.sum()).unsqueeze(1)
        if p.weighting == "learned":
            return F.softmax(self.teacher_weight_logits, dim=0).unsqueeze(1)
        if p.weighting == "confidence":
            probs = F.softmax(teacher_logits, dim=-1)
            entropy = -(torch.xlogy(probs, probs)).sum(-1)  # K x B
            return F.softmax(-entropy / p.confidence_temperature, dim=0)
        return torch.full((k, 1), 1.0 / k, device=device)

    def target_probs(self, batch: Batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        p: EnsembleKDParams = self.params  # type: ignore[assignment]
        logits = torch.stack(self.teacher_logits(batch))  # K x B x C
        weights = self.teacher_weights(logits).unsqueeze(-1)  # K x B x 1
        if p.aggregate == "logits":
            mixed = (weights * logits).sum(0)
            soft = F.softmax(mixed / temperature, dim=-1)
            plain = F.softmax(mixed, dim=-1)
        else:
            soft = (weights * F.softmax(logits / temperature, dim=-1)).sum(0)
            plain = (weights * F.softmax(logits, dim=-1)).sum(0)
        return soft, plain

    def forward(self, batch: Batch, step: Step) -> Output:
        out = super().forward(batch, step)
        p: EnsembleKDParams = self.params  # type: ignore[assignment]
        if p.weighting == "learned":
            w = F.softmax(self.teacher_weight_logits, dim=0)
            for i, value in enumerate(w.detach()):
                out.metrics[f"teacher_weight_{i}"] = value
            if p.weight_entropy:
                out.losses["weight_entropy"] = p.weight_entropy * (torch.xlogy(w, w)).sum()
        return out

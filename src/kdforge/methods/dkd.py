"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, CVPR 2022).

Classical KD splits into a target-class and a non-target-class part. With ``p = softmax(z / T)``
and y the label:

* binary probabilities ``b = [p_y, 1 - p_y]``; ``TCKD = KL(b_t || b_s)``;
* non-target distribution ``q_c = p_c / (1 - p_y)`` for c != y; ``NCKD = KL(q_t || q_s)``;
* classical KD = ``TCKD + (1 - p^t_y) * NCKD``; DKD frees the two weights:

    L = ce_weight * CE(z_s, y) + w(e) * T^2 * (alpha * TCKD + beta * NCKD)

KLs are averaged over the batch. ``w(e) = min(e / warmup_epochs, 1)`` is a linear warm-up where
e counts the epochs done *after* the current step, fractionally within an epoch when the step
count is known (mdistiller uses the 1-based epoch number, constant within an epoch: the same
value at every epoch's end). ``warmup_epochs: 0`` disables it.

Defaults (mdistiller ``configs/cifar100/dkd``): T = 4, alpha = 1, beta = 8, CE weight 1, warm-up
20 epochs of 240. The paper lowers beta to 2 for resnet56->resnet20 and resnet110->resnet32 and to
6 for vgg13->vgg8 and WRN-40-2 teachers. On short runs scale the warm-up with the run
(20/240 of 15 epochs is 1.25).

Everything is computed in log space from the logits: ``log(1 - p_y)`` is a logsumexp over the
non-target logits and the non-target distribution is a softmax over the C - 1 non-target logits
only. The reference code instead takes ``log`` of probabilities and masks the target logit by
subtracting 1000, which gives inf/NaN once ``p_y`` rounds to 1; this version is finite for any
finite logits, including two classes (where NCKD is 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Distiller, MethodParams, Output, Step
from kdforge.methods.common import warmup_factor


class DKDParams(MethodParams):
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(1.0, ge=0)
    beta: float = Field(8.0, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    warmup_epochs: float = Field(20.0, ge=0)


def _log_binary_and_nontarget(logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``log b`` (B x 2) and ``log q`` (B x C-1) for logits scaled by 1/T."""
    z = logits.float() / temperature
    batch, classes = z.shape
    if classes < 2:
        raise ValueError("dkd needs at least two classes")
    is_target = F.one_hot(targets.long(), classes).bool()
    target_logit = z[is_target]  # B
    others = z[~is_target].view(batch, classes - 1)
    log_total = torch.logsumexp(z, dim=1)
    log_b = torch.stack([target_logit - log_total, torch.logsumexp(others, dim=1) - log_total], dim=1)
    return log_b, F.log_softmax(others, dim=1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` per row from log-probabilities (0 * log 0 = 0 since log_p is finite)."""
    return (log_p.exp() * (log_p - log_q)).sum(1)


def dkd_terms(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Per-sample ``(TCKD, NCKD)`` at temperature T, without the T^2 factor."""
    log_b_s, log_q_s = _log_binary_and_nontarget(student_logits, targets, temperature)
    log_b_t, log_q_t = _log_binary_and_nontarget(teacher_logits, targets, temperature)
    return _kl(log_b_t, log_b_s), _kl(log_q_t, log_q_s)


@METHODS.register("dkd")
class DecoupledKD(Distiller):
    """Decoupled KD (Zhao et al. 2022): CE + warmup * T^2 (alpha TCKD + beta NCKD); T=4, alpha=1, beta=8."""

    name = "dkd"
    Params = DKDParams
    teachers_required = (1, 1)
    replays_teacher_logits = True

    def forward(self, batch: Batch, step: Step) -> Output:
        p: DKDParams = self.params  # type: ignore[assignment]
        logits = self.student(batch.image)
        (teacher_logits,) = self.teacher_logits(batch)
        tckd, nckd = dkd_terms(logits, teacher_logits, batch.targets, p.temperature)
        scale = warmup_factor(step, p.warmup_epochs) * p.temperature**2
        losses = {
            "tckd": scale * p.alpha * tckd.mean(),
            "nckd": scale * p.beta * nckd.mean(),
        }
        if p.ce_weight:
            losses["ce"] = p.ce_weight * F.cross_entropy(logits, batch.targets)
        return Output(logits, losses, {"dkd_warmup": scale / p.temperature**2})

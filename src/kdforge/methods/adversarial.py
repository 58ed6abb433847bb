"""Adversarial training and adversarially robust distillation: ``adv_ce``, ``ard``, ``fast_ard``.

All attacks run in **pixel units**: the batches are normalized (``(x - mean) / std``), so each
method takes the dataset's ``normalization`` (offered by ``build_distiller``), maps the batch back to
``[0, 1]`` pixels, attacks there with ``kdforge.robust`` and feeds ``(x_adv - mean) / std`` to the
networks. ``eps`` and ``step_size`` accept fractions such as ``"8/255"``.

* ``adv_ce`` -- Madry et al. (ICLR 2018) PGD adversarial training,
  ``L = CE(S(x_adv), y)``, ``x_adv = PGD(x; CE(S(.), y))``; or TRADES (Zhang et al., ICML 2019) with
  ``trades: true``: ``L = CE(S(x), y) + beta * KL(S(x) || S(x_adv))``, the attack maximizing that KL.
* ``ard`` -- Goldblum, Fowl, Feizi, Goldstein (AAAI 2020, arXiv 1905.09747), as in the authors'
  ``goldblum/AdversariallyRobustDistillation`` ``main.py``: the attack maximizes the
  *student's* CE; the target is the teacher on the *clean* input:
  ``L = alpha * T^2 * KL_T(T(x) || S(x_adv)) + (1 - alpha) * CE(S(x), y)``; alpha 1, T 30,
  PGD-10 of 2/255 in an 8/255 ball, run in the student's current (training) mode. The KL is averaged
  over batch x classes by default (``reduction: elementmean``) as ``nn.KLDivLoss()`` does in the
  reference, because its alpha/T/lr were tuned with it; ``batchmean`` is the option.
* ``fast_ard`` -- ARD with "free" adversarial training (Shafahi et al., NeurIPS 2019), reconstructed
  (the ARD paper's exact Fast-ARD procedure was not checked, and its code has none): the
  trainer replays every batch ``replays`` times (``Distiller.batch_replays``), one optimizer step per
  replay; the perturbation ``delta`` persists across replays and batches and after each backward
  pass moves by ``step_size * sign(grad_delta)`` (clipped to the ball), the gradient coming free from
  the same backward pass (of the ARD loss; ``delta_loss: ce`` uses the student's CE instead at the
  cost of one extra input-gradient pass). Divide the epochs by ``replays`` for natural-training cost.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Distiller, MethodParams, Output, Step
from kdforge.methods.common import batch_accuracy
from kdforge.methods.losses import soft_kl
from kdforge.robust.attacks import ascent_direction, parse_fraction, pgd, project_ball

Normalization = tuple[Sequence[float], Sequence[float]]


class AttackParams(MethodParams):
    """The training attack: PGD in pixel units (eps, step_size as numbers or "a/b" fractions)."""

    eps: float = Field(8 / 255, ge=0)
    step_size: float = Field(2 / 255, ge=0)
    steps: int = Field(10, ge=0)
    norm: Literal["linf", "l2"] = "linf"
    random_start: bool = True
    #: the student's mode while the attack runs: "train" (ARD/Madry reference code: BN in training
    #: mode), "eval", or "auto" (eval for TRADES, train otherwise)
    attack_mode: Literal["auto", "train", "eval"] = "auto"
    #: warm-up: eps (and the step size with it) rises linearly from 0 over this fraction of the run
    #: (by step); 0 = the full eps from the start (the references). Helps small CPU budgets on MNIST.
    eps_ramp: float = Field(0.0, ge=0, le=1)

    @field_validator("eps", "step_size", mode="before")
    @classmethod
    def _fraction(cls, value: object) -> object:
        return parse_fraction(value) if isinstance(value, str) else value  # type: ignore[arg-type]


class PixelSpaceDistiller(Distiller):
    """Base of the adversarial methods: pixel <-> normalized conversion and the training attack."""

    def __init__(self, student, teachers=(), params=None, normalization: Normalization | None = None):
        super().__init__(student, teachers, params)
        mean, std = normalization if normalization is not None else ((0.0,), (1.0,))
        self.register_buffer(
            "pixel_mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    def to_pixels(self, image: Tensor) -> Tensor:
        """A normalized batch back in [0, 1] pixels."""
        return (image * self.pixel_std.to(image) + self.pixel_mean.to(image)).clamp(0.0, 1.0)

    def from_pixels(self, x: Tensor) -> Tensor:
        return (x - self.pixel_mean.to(x)) / self.pixel_std.to(x)

    def pixel_student(self, x: Tensor) -> Tensor:
        return self.student(self.from_pixels(x))

    def current_eps(self, step: Step | None) -> float:
        """eps at this point of training (the ``eps_ramp`` warm-up)."""
        p: AttackParams = self.params  # type: ignore[assignment]
        if step is None or p.eps_ramp <= 0:
            return p.eps
        return p.eps * min(step.progress / p.eps_ramp, 1.0)

    def attack(
        self,
        x: Tensor,
        y: Tensor,
        loss_fn=None,
        delta_init: Tensor | None = None,
        eval_mode: bool = False,
        step: Step | None = None,
    ) -> Tensor:
        """PGD on the student from pixel inputs ``x``; returns pixel inputs (detached)."""
        p: AttackParams = self.params  # type: ignore[assignment]
        eps = self.current_eps(step)
        if eps == 0 or p.steps == 0:
            return x.detach()
        step_size = p.step_size * eps / p.eps  # scaled with a ramped eps
        with student_mode(self.student, training=False) if eval_mode else nullcontext():
            return pgd(
                self.pixel_student,
                x,
                y,
                eps,
                steps=p.steps,
                step_size=step_size,
                norm=p.norm,
                random_start=p.random_start,
                loss_fn=loss_fn,
                delta_init=delta_init,
            )


@contextmanager
def student_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Put ``module`` in train or eval mode for a block, then restore every submodule's own flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# ----------------------------------------------------------------------------- adv_ce
class AdvCEParams(AttackParams):
    steps: int = Field(7, ge=0)  # Madry et al. CIFAR-10: 7 steps of 2/255 in 8/255
    trades: bool = False
    beta: float = Field(6.0, ge=0)  # TRADES' 1/lambda for CIFAR-10
    #: Madry: 0 (adversarial examples only); 0.5 mixes clean CE (Goodfellow et al. 2015). Ignored by TRADES.
    clean_weight: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _trades_attack(self) -> AdvCEParams:
        """With ``trades: true``, steps and step size not given default to TRADES' CIFAR-10 attack
        (10 steps of 0.007, ``TRADES/train_trades_cifar10.py``), not Madry's 7 of 2/255."""
        if self.trades:
            if "steps" not in self.model_fields_set:
                self.steps = 10
            if "step_size" not in self.model_fields_set:
                self.step_size = 0.007
        return self


@METHODS.register("adv_ce")
class AdversarialCE(PixelSpaceDistiller):
    """Madry PGD adversarial training (or TRADES with trades: true) for robust teachers."""

    name = "adv_ce"
    Params = AdvCEParams
    teachers_required = (0, 0)

    def forward(self, batch: Batch, step: Step) -> Output:
        p: AdvCEParams = self.params  # type: ignore[assignment]
        x, y = self.to_pixels(batch.image), batch.targets
        if p.trades:
            return self._trades(batch, x, y, step)
        x_adv = self.attack(x, y, eval_mode=p.attack_mode == "eval", step=step)
        logits = self.pixel_student(x_adv)
        losses = {"adv_ce": (1.0 - p.clean_weight) * F.cross_entropy(logits, y)}
        if p.clean_weight:
            losses["ce"] = p.clean_weight * F.cross_entropy(self.student(batch.image), y)
        return Output(logits, losses, {"adv_top1": batch_accuracy(logits, y)})

    def _trades(self, batch: Batch, x: Tensor, y: Tensor, step: Step) -> Output:
        p: AdvCEParams = self.params  # type: ignore[assignment]
        with torch.no_grad(), student_mode(self.student, training=p.attack_mode == "train"):
            clean_probs = F.softmax(self.student(batch.image), dim=-1)

        def kl_to_clean(logits: Tensor, probs: Tensor) -> Tensor:
            return (torch.xlogy(probs, probs) - probs * F.log_softmax(logits, dim=-1)).sum(-1)

        # TRADES reference: start at x + 0.001 * N(0, 1), attack in eval mode
        start = 0.001 * torch.randn_like(x) if p.random_start else torch.zeros_like(x)
        x_adv = self.attack(
            x, clean_probs, loss_fn=kl_to_clean, delta_init=start, eval_mode=p.attack_mode != "train", step=step
        )
        clean_logits = self.student(batch.image)
        adv_logits = self.pixel_student(x_adv)
        # the robust term keeps gradients through both sides, as in the reference
        robust = soft_kl(adv_logits, F.softmax(clean_logits, dim=-1), 1.0, reduction="batchmean")
        losses = {"ce": F.cross_entropy(clean_logits, y), "trades_kl": p.beta * robust}
        return Output(clean_logits, losses, {"adv_top1": batch_accuracy(adv_logits, y)})


# ----------------------------------------------------------------------------- ard
class ARDParams(AttackParams):
    alpha: float = Field(1.0, ge=0, le=1)
    temperature: float = Field(30.0, gt=0)
    #: elementmean = nn.KLDivLoss() default of the reference code (KL / C); batchmean = sum over classes
    reduction: Literal["elementmean", "batchmean"] = "elementmean"
    #: at alpha 1 the CE term is zero, but the reference still runs the student on the clean batch in
    #: training mode, so BatchNorm's running statistics see clean inputs as well as adversarial ones;
    #: true does the same (a no-grad forward, no gradient change); false skips it (cheaper, BN
    #: statistics from adversarial inputs only)
    clean_bn_pass: bool = True


class _ARDLoss:
    def ard_losses(self, adv_logits: Tensor, teacher_logits: Tensor, batch: Batch) -> dict[str, Tensor]:
        p: ARDParams = self.params  # type: ignore[attr-defined]
        T = p.temperature
        kl = soft_kl(adv_logits, F.softmax(teacher_logits / T, dim=-1), T, reduction=p.reduction)
        losses = {"kd": p.alpha * kl}
        if p.alpha < 1.0:
            losses["ce"] = (1.0 - p.alpha) * F.cross_entropy(self.student(batch.image), batch.targets)  # type: ignore[attr-defined]
        elif p.clean_bn_pass and self.training:  # type: ignore[attr-defined]
            with torch.no_grad():
                self.student(batch.image)  # type: ignore[attr-defined]
        return losses


@METHODS.register("ard")
class ARD(_ARDLoss, PixelSpaceDistiller):
    """ARD: alpha T^2 KL(teacher(x) || student(PGD_CE(x))) + (1 - alpha) CE; alpha 1, T 30, PGD-10."""

    name = "ard"
    Params = ARDParams
    teachers_required = (1, 1)
    replays_teacher_logits = True  # the teacher sees clean inputs only

    def forward(self, batch: Batch, step: Step) -> Output:
        p: ARDParams = self.params  # type: ignore[assignment]
        x, y = self.to_pixels(batch.image), batch.targets
        x_adv = self.attack(x, y, eval_mode=p.attack_mode == "eval", step=step)  # maximizes the student's CE
        (teacher_logits,) = self.teacher_logits(batch)  # clean inputs
        adv_logits = self.pixel_student(x_adv)
        return Output(
            adv_logits, self.ard_losses(adv_logits, teacher_logits, batch), {"adv_top1": batch_accuracy(adv_logits, y)}
        )


# ----------------------------------------------------------------------------- fast_ard
class FastARDParams(ARDParams):
    #: m: optimizer steps per batch (Shafahi et al. use m = 8 on CIFAR-10; ARD's value not verified)
    replays: int = Field(4, ge=1)
    #: signed step of the persistent perturbation; None = eps (free adversarial training)
    step_size: float | None = Field(None, ge=0)  # type: ignore[assignment]
    #: the loss whose input gradient moves delta: "train" (the ARD loss: free) or "ce" (student CE)
    delta_loss: Literal["train", "ce"] = "train"
    #: off by default here: the batch is replayed m times and a clean pass per replay costs a forward
    clean_bn_pass: bool = False


@METHODS.register("fast_ard")
class FastARD(_ARDLoss, PixelSpaceDistiller):
    """Fast-ARD: ARD with free adversarial training (batch replayed m times, persistent delta)."""

    name = "fast_ard"
    Params = FastARDParams
    teachers_required = (1, 1)
    replays_teacher_logits = True

    def __init__(self, student, teachers=(), params=None, normalization: Normalization | None = None):
        super().__init__(student, teachers, params, normalization)
        self.batch_replays = self.params.replays  # type: ignore[attr-defined]
        self.noise: Tensor | None = None  # the persistent perturbation (pixel units), largest batch seen
        self._leaf: Tensor | None = None  # the rows used by the last forward (their .grad after backward)
        self._ce_grad: Tensor | None = None
        self._teacher_cache: tuple[Batch, Tensor] | None = None
        self._eps_now = self.params.eps  # type: ignore[attr-defined]

    def _advance_noise(self) -> None:
        """Apply the pending signed step from the last backward pass to the persistent noise."""
        leaf, ce_grad = self._leaf, self._ce_grad
        self._leaf = self._ce_grad = None
        if leaf is None or self.noise is None:
            return
        grad = ce_grad if ce_grad is not None else leaf.grad
        if grad is None:  # forward without backward (e.g. a probe): nothing to apply
            return
        p: FastARDParams = self.params  # type: ignore[assignment]
        eps = self._eps_now
        size = eps if p.step_size is None else p.step_size * eps / max(p.eps, 1e-12)
        moved = leaf.detach() + size * ascent_direction(grad, p.norm)
        # the ball only; the [0, 1] box is applied when the input is formed (Shafahi et al.'s update)
        self.noise[: leaf.shape[0]] = project_ball(moved, eps, p.norm)

    def after_optimizer_step(self, step: Step) -> None:
        self._advance_noise()

    def _teacher(self, batch: Batch) -> Tensor:
        if self._teacher_cache is not None and self._teacher_cache[0] is batch:
            return self._teacher_cache[1]  # a replay of the same batch: the teacher's answer is the same
        (logits,) = self.teacher_logits(batch)
        self._teacher_cache = (batch, logits)
        return logits

    def forward(self, batch: Batch, step: Step) -> Output:
        p: FastARDParams = self.params  # type: ignore[assignment]
        self._advance_noise()  # in case the trainer did not call after_optimizer_step
        self._eps_now = self.current_eps(step)
        x, y = self.to_pixels(batch.image), batch.targets
        rows = x.shape[0]
        if self.noise is None or self.noise.shape[1:] != x.shape[1:] or self.noise.shape[0] < rows:
            fresh = torch.zeros_like(x)
            if self.noise is not None and self.noise.shape[1:] == x.shape[1:]:
                fresh[: self.noise.shape[0]] = self.noise.to(x)
            self.noise = fresh
        leaf = self.noise[:rows].detach().clone().requires_grad_(self.training)
        x_adv = (x + leaf).clamp(0.0, 1.0)
        adv_logits = self.pixel_student(x_adv)
        if self.training:
            self._leaf = leaf
            if p.delta_loss == "ce":
                (self._ce_grad,) = torch.autograd.grad(F.cross_entropy(adv_logits, y), leaf, retain_graph=True)
        losses = self.ard_losses(adv_logits, self._teacher(batch), batch)
        return Output(adv_logits, losses, {"adv_top1": batch_accuracy(adv_logits, y)})

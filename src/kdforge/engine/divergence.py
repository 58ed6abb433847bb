"""Divergence: when a run's loss stops being a number, or explodes, stop it and say why.

Two rules, checked on every training step (``LossWatch``):

* the loss is NaN or infinite;
* the loss is more than ``EXPLOSION_FACTOR`` (10^4) times its reference, where the reference is
  the smallest of the run's first ``REFERENCE_STEPS`` (20) step losses (the first is the untrained
  network's), floored at 1.0 (so a loss that starts near zero, e.g. under a ramp-up, is not
  flagged for growing to ordinary values). The rule applies from the second step on. Gradient clipping hides an
  exploding learning rate from the first rule (the loss stays finite while it grows by many
  orders of magnitude); this rule catches it.

The weights are also checked before anything is saved at an epoch's end, so a model file never
holds NaN or infinity: the run stops with the files of its last finite epoch.

``likely_cause`` names the culprit from what was seen: teachers whose outputs on the batch are
not finite (their checkpoint), a temperature or loss weight far above the method's default
(that hyperparameter), otherwise the learning rate.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kdforge.core.errors import KDForgeError
from kdforge.core.validation import finite_numbers
from kdforge.methods.base import is_temperature_field, is_weight_field

#: a step loss above this many times the reference stops the run
EXPLOSION_FACTOR = 1e4
#: the reference is the smallest of this many first step losses
REFERENCE_STEPS = 20
#: the explosion rule needs at least this many reference losses
MIN_REFERENCE = 1
#: a temperature or weight this many times its default is named as the likely cause
SUSPICIOUS_RATIO = 10.0


class RunDiverged(KDForgeError):
    """The loss or the weights became non-finite, or the loss exploded; the run is marked failed."""


class LossWatch:
    """The explosion rule's state: the first step losses (saved with the training state)."""

    def __init__(self, reference: list[float] | None = None) -> None:
        self.reference: list[float] = list(reference or [])

    def threshold(self) -> float | None:
        if len(self.reference) < MIN_REFERENCE:
            return None
        return EXPLOSION_FACTOR * max(min(self.reference), 1.0)

    def check(self, loss: float) -> str | None:
        """None when the step loss is fine, else what is wrong with it."""
        if not math.isfinite(loss):
            return f"the loss became {loss}"
        limit = self.threshold()
        if limit is not None and loss > limit:
            return (
                f"the loss exploded to {loss:.3g}, over {EXPLOSION_FACTOR:.0e} times its early value "
                f"({min(self.reference):.3g})"
            )
        if len(self.reference) < REFERENCE_STEPS:
            self.reference.append(loss)
        return None


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """Names of the floating parameters and buffers of ``module`` holding NaN or infinity."""
    return [
        name
        for name, value in module.state_dict().items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


@torch.no_grad()
def _teacher_culprit(distiller: nn.Module, batch: Any, teacher_files: list[str | None]) -> str | None:
    stored = getattr(batch, "extras", {}).get("teacher_logits") if batch is not None else None
    if isinstance(stored, torch.Tensor) and not bool(torch.isfinite(stored.float()).all()):
        return "the stored teacher outputs (teacher bank) are not finite: rebuild the bank with `kdforge teacher-bank`"
    teachers = list(getattr(distiller, "teachers", []) or [])
    if batch is None or not teachers:
        return None
    try:
        image = batch.image
    except (AttributeError, KeyError):
        return None
    for i, teacher in enumerate(teachers):
        try:
            output = teacher(image)
        except Exception:  # noqa: BLE001 - a diagnosis must not raise; methods feed some teachers other inputs
            continue
        logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor) and not bool(torch.isfinite(logits.float()).all()):
            source = teacher_files[i] if i < len(teacher_files) and teacher_files[i] else f"teachers[{i}]"
            return f"teacher {i}'s outputs are not finite on this batch: check the teacher checkpoint '{source}'"
    return None


def _hyperparameter_culprit(params: Any) -> str | None:
    """The temperature or loss weight furthest above its default, when it is far above."""
    if params is None:
        return None
    worst: tuple[float, str] | None = None
    for name, field in type(params).model_fields.items():
        if not (is_temperature_field(name) or is_weight_field(name)):
            continue
        values = finite_numbers(getattr(params, name, None))
        defaults = finite_numbers(field.get_default(call_default_factory=True))
        if not values:
            continue
        value, default = max(values), max(defaults or [0.0])
        ratio = value / default if default > 0 else (value / 100.0 if value > 1000.0 else 0.0)
        if ratio >= SUSPICIOUS_RATIO and (worst is None or ratio > worst[0]):
            shown = f"{value:g} (default {default:g})"
            worst = (ratio, f"method.{name} = {shown} is very large: lower it")
    return worst[1] if worst else None


def likely_cause(trainer: Any, batch: Any = None) -> str:
    """The likely culprit of a divergence, from what was seen (see the module docstring)."""
    distiller = trainer.distiller
    files = [t.checkpoint for t in trainer.config.teachers]
    found = _teacher_culprit(distiller, batch, files) or _hyperparameter_culprit(getattr(distiller, "params", None))
    if found:
        return found
    optimizer = trainer.config.train.optimizer
    clip = trainer.config.train.grad_clip
    fix = f"lower train.optimizer.lr (now {optimizer.lr:g})"
    return f"the learning rate: {fix}" + ("" if clip else " or set train.grad_clip")

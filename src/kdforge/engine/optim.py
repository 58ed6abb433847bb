"""Optimizers and learning-rate schedules.

The learning rate is a pure function of the global step (``lr_factor``), set on every step; an
interrupted run therefore resumes with no scheduler state to restore.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from kdforge.config import OptimizerConfig, SchedulerConfig
from kdforge.methods.base import OptimizerGroup


def build_optimizer(group: OptimizerGroup, settings: OptimizerConfig) -> torch.optim.Optimizer:
    """One optimizer for a group; the group may override fields of the run's settings."""
    values: dict[str, Any] = settings.model_dump()
    values.update(group.optimizer or {})
    opt = OptimizerConfig(**values)  # validates the override too
    # no weight decay on biases and normalisation parameters (vectors), as is usual for CNNs
    decay = [p for p in group.parameters if p.ndim > 1]
    no_decay = [p for p in group.parameters if p.ndim <= 1]
    param_groups = [
        {"params": decay, "weight_decay": opt.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    param_groups = [g for g in param_groups if g["params"]]
    if opt.name == "sgd":
        return torch.optim.SGD(
            param_groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov and opt.momentum > 0
        )
    if opt.name == "adamw":
        return torch.optim.AdamW(param_groups, lr=opt.lr, betas=opt.betas)
    return torch.optim.Adam(param_groups, lr=opt.lr, betas=opt.betas)


def lr_function(settings: SchedulerConfig, base_lr: float, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate at a global step (0-based)."""
    total = max(epochs * steps_per_epoch, 1)
    warmup = int(round(settings.warmup_epochs * steps_per_epoch))
    milestones = sorted(int(round(m * steps_per_epoch)) for m in settings.milestones)

    def lr(step: int) -> float:
        if settings.name == "onecycle":
            return base_lr * _one_cycle(step, total, settings.pct_start)
        if warmup and step < warmup:
            return base_lr * (step + 1) / warmup
        if settings.name == "multistep":
            return base_lr * settings.gamma ** sum(step >= m for m in milestones)
        if settings.name == "cosine":
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return settings.min_lr + (base_lr - settings.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return base_lr

    return lr


def _one_cycle(step: int, total: int, pct_start: float) -> float:
    """Leslie Smith's one-cycle policy (cosine up from max/25, cosine down to max/1e4)."""
    peak = max(int(total * pct_start), 1)
    start, end = 1.0 / 25.0, 1.0 / 1e4
    if step < peak:
        return start + (1.0 - start) * 0.5 * (1.0 - math.cos(math.pi * step / peak))
    progress = (step - peak) / max(total - peak, 1)
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

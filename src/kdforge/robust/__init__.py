"""Adversarial robustness: attacks in pixel units (FGSM, PGD) and clean + robust evaluation.

See docs/robustness.md. The adversarial training and distillation methods live in
``kdforge.methods.adversarial`` (``adv_ce``, ``ard``, ``fast_ard``) and
``kdforge.methods.robust_prune``.
"""

from kdforge.robust.attacks import (
    PixelModel,
    ascent_direction,
    fgsm,
    parse_fraction,
    pgd,
    project,
    project_ball,
    random_in_ball,
)
from kdforge.robust.evaluate import attack_batch, robust_evaluate

__all__ = [
    "PixelModel",
    "ascent_direction",
    "attack_batch",
    "fgsm",
    "parse_fraction",
    "pgd",
    "project",
    "project_ball",
    "random_in_ball",
    "robust_evaluate",
]

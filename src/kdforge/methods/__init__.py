"""Distillation methods: one file per method, each registered in ``METHODS`` by name."""

from kdforge.methods import (  # noqa: F401  (registration)
    adversarial,
    at,
    ce,
    crd,
    crosslayer,
    dkd,
    ensemble_kd,
    ffsd,
    fitnet,
    fsp,
    growing_ta,
    hkd,
    introspective,
    kd,
    nonn,
    okddip,
    online,
    pkt,
    review_kd,
    rkd,
    robust_prune,
    sp,
    takd,
)
from kdforge.methods.base import METHODS, Distiller, MethodParams, OptimizerGroup, Output, Step
from kdforge.methods.losses import kd_loss, soft_kl

__all__ = [
    "METHODS",
    "Distiller",
    "MethodParams",
    "OptimizerGroup",
    "Output",
    "Step",
    "kd_loss",
    "soft_kl",
]

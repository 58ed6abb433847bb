"""Distillation methods: one file per method, each registered in ``METHODS`` by name."""

from kdforge.methods import at, ce, crd, dkd, ensemble_kd, fitnet, hkd, kd, pkt, rkd, sp  # noqa: F401  (registration)
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

"""Distillation methods: one file per method, each registered in ``METHODS`` by name.

Every module of the package is imported (and so registered) automatically; see kdforge.core.plugins."""

from kdforge.core.plugins import import_submodules

# every module of this package registers its methods when imported: a new method file needs no
# edit here (installed plugins register through the "kdforge.methods" entry-point group)
import_submodules(__name__, __path__)

from kdforge.methods.base import METHODS, Distiller, MethodParams, OptimizerGroup, Output, Step  # noqa: E402
from kdforge.methods.losses import kd_loss, soft_kl  # noqa: E402

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

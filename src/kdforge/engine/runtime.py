"""The runtime of a single-process, full-precision CPU run, without importing Lightning.

The trainer drives devices, DDP and mixed precision through Lightning Fabric. Importing Fabric
imports ``torch._dynamo`` and ``torch.distributed.fsdp`` among others: about 4 s of CPU per
process on our 2-core machine, every ``kdforge train`` start, for a run that needs none of it. When
a run is one process on the CPU in float32 (no GPU, no ``devices > 1``, no cluster launcher in the
environment), :class:`LocalRuntime` stands in for Fabric with the few calls the trainer makes;
they do what Fabric does for one process at 32-true (same seeding, same gradient clipping, no
autocast, collectives that return their input). Everything else gets Fabric.

``KDFORGE_FABRIC=1`` in the environment makes every run use Fabric.
"""

from __future__ import annotations

import os
import random
import sys
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

import torch

#: any of these means a launcher (torchrun, SLURM, MPI) may expect this process to join a group
LAUNCHER_VARIABLES = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "TORCHELASTIC_RUN_ID",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "NODE_RANK",
    "LT_NUM_NODES",
    "LSB_JOBID",
)


def local_runtime_applies(accelerator: str, devices: int, strategy: str, precision: str) -> bool:
    """Whether a run with these settings (precision already resolved) is one plain CPU process."""
    if os.environ.get("KDFORGE_FABRIC") == "1" or any(name in os.environ for name in LAUNCHER_VARIABLES):
        return False
    if devices != 1 or strategy != "auto" or precision != "32-true":
        return False
    if accelerator == "cpu":
        return True
    mps = getattr(torch.backends, "mps", None)
    return accelerator == "auto" and not torch.cuda.is_available() and not (mps is not None and mps.is_available())


class LocalRuntime:
    """Fabric's interface as the trainer uses it, for one CPU process at 32-true."""

    world_size = 1
    global_rank = 0
    local_rank = 0
    node_rank = 0
    is_global_zero = True

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.strategy = SimpleNamespace(precision=SimpleNamespace(precision="32-true"), name="local")
        # Lightning's rank-0-only switch is process-wide: a Fabric built earlier in this process for
        # another rank would mute this run's loggers (they are Lightning's classes)
        module = sys.modules.get("lightning_utilities.core.rank_zero")
        if module is not None:
            module.rank_zero_only.rank = 0  # type: ignore[attr-defined]

    def launch(self) -> None:
        """Nothing to start: this process is the only one."""

    def barrier(self) -> None:
        """Nothing to wait for."""

    def seed_everything(self, seed: int, verbose: bool = False) -> int:
        """As Fabric's: Python's, NumPy's and torch's generators, and the variables it sets."""
        os.environ["PL_GLOBAL_SEED"] = str(seed)
        random.seed(seed)
        try:
            import numpy as np

            np.random.seed(seed)
        except ImportError:  # pragma: no cover - numpy comes with torch's extras here
            pass
        torch.manual_seed(seed)
        os.environ["PL_SEED_WORKERS"] = "1"
        return seed

    def print(self, *args: Any, **kwargs: Any) -> None:
        print(*args, **kwargs)

    def setup(self, module: torch.nn.Module, *optimizers: torch.optim.Optimizer) -> list[Any]:
        return [module.to(self.device), *optimizers]

    def autocast(self) -> Any:
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_gradients(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> Any:
        """As Fabric's: the norm of every gradient the optimizer steps, an error if it is not finite."""
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm=max_norm, norm_type=2.0, error_if_nonfinite=True)

    def all_reduce(self, data: Any, reduce_op: str = "mean") -> Any:
        return data

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj


__all__ = ["LocalRuntime", "local_runtime_applies"]

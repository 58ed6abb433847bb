"""A one-process float32 CPU run trains with the local stand-in for Lightning Fabric
(engine/runtime.py); the result is the same as with Fabric, bit for bit."""

from __future__ import annotations

import pytest
import torch

from kdforge.config import build_config
from kdforge.engine.runtime import LocalRuntime, local_runtime_applies
from kdforge.engine.trainer import Trainer


def _recipe(**train):
    return build_config(
        {
            "name": "runtime",
            "data": {"name": "digits", "augment": True, "train_subset": 200},
            "student": {"name": "mlp", "kwargs": {"hidden": [32]}},
            "method": {"name": "ce"},
            "train": {"epochs": 2, "batch_size": 40, "progress": "none", "grad_clip": 0.5, **train},
        }
    )


def test_plain_cpu_runs_only(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "SLURM_NTASKS", "KDFORGE_FABRIC"):
        monkeypatch.delenv(name, raising=False)
    assert local_runtime_applies("cpu", 1, "auto", "32-true")
    assert not local_runtime_applies("cpu", 2, "ddp", "32-true")
    assert not local_runtime_applies("cpu", 1, "auto", "bf16-mixed")
    assert not local_runtime_applies("cpu", 1, "ddp_spawn", "32-true")
    monkeypatch.setenv("SLURM_NTASKS", "4")  # a launcher may expect this process in a group
    assert not local_runtime_applies("cpu", 1, "auto", "32-true")
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("KDFORGE_FABRIC", "1")
    assert not local_runtime_applies("cpu", 1, "auto", "32-true")


def _final_weights(tmp_path, monkeypatch, fabric: bool):
    monkeypatch.setenv("KDFORGE_FABRIC", "1" if fabric else "0")
    trainer = Trainer(_recipe(accelerator="cpu"), tmp_path)
    summary = trainer.fit()
    return trainer, summary, {k: v.clone() for k, v in trainer.distiller.student.state_dict().items()}


def test_local_runtime_trains_exactly_as_fabric(tmp_path, monkeypatch):
    local, local_summary, local_weights = _final_weights(tmp_path / "local", monkeypatch, fabric=False)
    fabric, fabric_summary, fabric_weights = _final_weights(tmp_path / "fabric", monkeypatch, fabric=True)
    assert isinstance(local.fabric, LocalRuntime)
    assert not isinstance(fabric.fabric, LocalRuntime) and type(fabric.fabric).__name__ == "Fabric"
    assert local_summary["precision"] == fabric_summary["precision"] == "32-true"
    assert local_summary["final"]["test"] == fabric_summary["final"]["test"]
    for name, value in local_weights.items():
        assert torch.equal(value, fabric_weights[name]), name


def test_clipping_refuses_a_non_finite_gradient_like_fabric():
    runtime = LocalRuntime()
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.tensor([[float("inf"), 1.0]])).sum().backward()
    with pytest.raises(RuntimeError, match="non-finite"):
        runtime.clip_gradients(layer, optimizer, max_norm=1.0)

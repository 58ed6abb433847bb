"""On an accelerator the trainer reads step losses in groups (no device sync per step); the
divergence rules and the numbers must not change. Forced here on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from kdforge.config import build_config
from kdforge.core.checkpoint import read_model_file
from kdforge.engine.divergence import RunDiverged
from kdforge.engine.trainer import Trainer


class DeferredTrainer(Trainer):
    """Reads the losses every 7 steps, as on a GPU (every 25)."""

    def setup(self) -> None:
        super().setup()
        self.loss_sync_every = 7


def _config(**train):
    return build_config(
        {
            "name": "sync",
            "data": {"name": "digits", "augment": False, "train_subset": 300},
            "student": {"name": "mlp", "kwargs": {"hidden": [32]}},
            "train": {"epochs": 2, "batch_size": 20, "progress": "none", "scheduler": {"name": "constant"}, **train},
        }
    )


def test_grouped_loss_reads_train_the_same(tmp_path):
    Trainer(_config(), tmp_path / "step").fit()
    DeferredTrainer(_config(), tmp_path / "grouped").fit()
    a = read_model_file(tmp_path / "step/checkpoints/model_last.pt")["state_dict"]
    b = read_model_file(tmp_path / "grouped/checkpoints/model_last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [(tmp_path / name / "metrics.jsonl").read_text().splitlines() for name in ("step", "grouped")]
    train = [[json.loads(line)["train"]["loss"] for line in run] for run in lines]
    assert train[0] == train[1]


def test_grouped_reads_still_stop_a_divergence_at_the_step_it_happened(tmp_path):
    bad = {"optimizer": {"name": "sgd", "lr": 1e4}, "grad_clip": 1.0}
    messages = []
    for cls, out in ((Trainer, "step"), (DeferredTrainer, "grouped")):
        with pytest.raises(RunDiverged) as caught:
            cls(_config(**bad), tmp_path / out).fit()
        messages.append(str(caught.value))
        assert json.loads((tmp_path / out / "summary.json").read_text())["status"] == "failed"
    where = [m.split(":")[0] for m in messages]  # "run diverged at epoch E, step S"
    assert where[0] == where[1], messages

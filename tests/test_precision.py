"""train.precision on the CPU: bf16-mixed trains under bfloat16 autocast with finite losses; auto
and 16-mixed resolve as documented (docs/gpus-and-clusters.md). GPU runs are not part of CI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdforge.config import build_config
from kdforge.core.errors import ConfigError
from kdforge.engine.trainer import Trainer, resolve_precision


def recipe(precision, **train):
    return build_config(
        {
            "data": {"name": "digits", "augment": False, "train_subset": 50},
            "student": {"name": "resnet8"},
            "teachers": [],
            "method": {"name": "ce"},
            "train": {
                "epochs": 2,
                "batch_size": 25,
                "accelerator": "cpu",
                "precision": precision,
                "scheduler": {"name": "constant"},
                "progress": "none",
                "eval_every": 2,
                **train,
            },
        }
    )


def test_cpu_bf16_mixed_trains_under_bfloat16_autocast_with_finite_losses(tmp_path):
    dtypes = []

    def forward_dtype(trainer, epoch, record):
        with trainer.fabric.autocast():
            dtypes.append(trainer.distiller.student(torch.zeros(2, 1, 8, 8)).dtype)

    summary = Trainer(recipe("bf16-mixed"), tmp_path, callbacks=[forward_dtype]).fit()
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # the convolutions really ran in bfloat16
    assert summary["precision"] == "bf16-mixed"
    losses = [line["train"]["loss"] for line in map(json.loads, open(tmp_path / "metrics.jsonl"))]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(summary["final"]["test"]["loss"]) and summary["final"]["test"]["top1"] > 10.0
    weights = torch.load(tmp_path / "checkpoints" / "model_last.pt", weights_only=True)["state_dict"]
    assert all(v.dtype != torch.bfloat16 for v in weights.values())  # mixed: the weights stay float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU resolution")
def test_auto_and_16_mixed_on_the_cpu():
    assert resolve_precision("auto", "auto") == "32-true"
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    with pytest.raises(ConfigError, match="use bf16-mixed"):
        resolve_precision("16-mixed", "cpu")
    with pytest.raises(ConfigError, match="16-mixed"):
        Trainer(recipe("16-mixed"), "unused")

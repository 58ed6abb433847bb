"""train.teacher_precision: bf16 runs frozen teachers' forwards in bfloat16 autocast and hands
float32 logits and features to the losses."""

from __future__ import annotations

import pytest
import torch

from kdforge.config import build_config
from kdforge.engine.trainer import Trainer
from kdforge.models import FeatureTap, create
from kdforge.models.precision import run_in_bfloat16


def _teacher():
    torch.manual_seed(0)
    return create("resnet8", num_classes=10).eval().requires_grad_(False)


def test_bfloat16_forward_returns_float32_close_to_the_float32_one():
    reference, teacher = _teacher(), _teacher()
    run_in_bfloat16(teacher, "cpu")
    x = torch.randn(4, 3, 32, 32)
    tap = FeatureTap(teacher, ["stage2"], detach=True)
    with torch.inference_mode():
        expected = reference(x)
        logits, features = tap(x)
    assert logits.dtype == torch.float32 and features["stage2"].dtype == torch.float32
    assert not torch.equal(logits, expected)  # it did run in bfloat16
    scale = expected.abs().max()
    assert (logits - expected).abs().max() < 0.05 * scale
    assert type(teacher).__name__ == type(reference).__name__  # names and state dict unchanged
    assert teacher.state_dict().keys() == reference.state_dict().keys()


def test_autocast_is_left_even_when_the_forward_fails():
    teacher = run_in_bfloat16(_teacher(), "cpu")
    with pytest.raises(RuntimeError):
        teacher(torch.randn(2, 5, 32, 32))  # wrong channel count
    assert not torch.is_autocast_enabled("cpu")


def test_a_kd_run_with_a_bfloat16_teacher_records_it(tmp_path):
    def recipe(name, student, **extra):
        return build_config(
            {
                "name": name,
                "data": {"name": "digits", "augment": False, "train_subset": 200},
                "student": student,
                "train": {"epochs": 1, "batch_size": 50, "progress": "none"},
                **extra,
            }
        )

    Trainer(recipe("teacher", {"name": "resnet8"}), tmp_path / "teacher").fit()
    config = recipe(
        "kd",
        {"name": "resnet8"},
        teachers=[{"checkpoint": str(tmp_path / "teacher/checkpoints/model_last.pt")}],
        method={"name": "at", "student_layers": ["stage1"], "teacher_layers": ["stage1"]},
    )
    config.train.teacher_precision = "bf16"
    summary = Trainer(config, tmp_path / "kd").fit()
    assert summary["teacher_precision"] == {"precision": "bf16", "teachers": 1}
    assert summary["status"] == "finished"

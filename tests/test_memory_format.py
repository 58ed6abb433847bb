"""train.channels_last: auto (by network), probe (timed), true/false; recorded in summary.json."""

from __future__ import annotations

import json

import pytest
import torch

from kdforge.config import build_config
from kdforge.engine.probe import probe_channels_last
from kdforge.engine.trainer import Trainer
from kdforge.models import create


def _recipe(student: dict, channels_last, teachers=()) -> object:
    data = {
        "name": "layout",
        "data": {"name": "digits", "augment": False, "train_subset": 100},
        "student": student,
        "teachers": list(teachers),
        "method": {"name": "kd"} if teachers else {"name": "ce"},
        "train": {"epochs": 1, "batch_size": 50, "progress": "none", "channels_last": channels_last},
    }
    return build_config(data)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    Trainer(_recipe({"name": "resnet8"}, False), out).fit()
    return str(out / "checkpoints/model_last.pt")


def test_auto_gives_channels_last_to_conv_networks_only(tmp_path, teacher_file):
    trainer = Trainer(_recipe({"name": "mlp"}, "auto", [{"checkpoint": teacher_file}]), tmp_path / "mlp")
    summary = trainer.fit()
    assert summary["memory_format"]["student"] is False  # an MLP has no convolution
    assert summary["memory_format"]["teachers"] == [True]
    teacher = trainer.distiller.teachers[0]
    convs = [m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)

    summary = Trainer(_recipe({"name": "resnet8"}, "auto"), tmp_path / "cnn").fit()
    assert summary["memory_format"]["student"] is True
    saved = json.loads((tmp_path / "cnn" / "summary.json").read_text())
    assert saved["memory_format"]["student"] is True


def test_false_forces_contiguous(tmp_path, teacher_file):
    trainer = Trainer(_recipe({"name": "resnet8"}, False, [{"checkpoint": teacher_file}]), tmp_path)
    summary = trainer.fit()
    assert summary["memory_format"] == {
        "student": False,
        "teachers": [False],
        "reason": "train.channels_last: false",
    }
    conv = next(m for m in trainer.distiller.student.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()


def test_probe_times_both_layouts_and_resume_keeps_the_choice(tmp_path, teacher_file):
    config = _recipe({"name": "resnet8"}, "probe", [{"checkpoint": teacher_file}])
    summary = Trainer(config, tmp_path).fit()
    timings = summary["memory_format"]["ms"]
    assert set(timings) == {"student_step", "teacher0_forward"}
    assert all(v["contiguous"] > 0 and v["channels_last"] > 0 for v in timings.values())
    # a resumed run reads the first session's choice instead of probing again
    path = tmp_path / "summary.json"
    saved = json.loads(path.read_text())
    saved["memory_format"] = {"student": not saved["memory_format"]["student"], "teachers": [False], "reason": "x"}
    path.write_text(json.dumps(saved))
    resumed = Trainer(config, tmp_path, resume=True)
    resumed.setup()
    assert resumed.memory_format == saved["memory_format"]


def test_probe_skips_non_image_inputs_and_keeps_teacher_values():
    mlp = create("mlp", num_classes=10, in_channels=1, input_size=(8, 8))
    decision = probe_channels_last(mlp, [], torch.randn(4, 64), torch.zeros(4, dtype=torch.long))
    assert decision["student"] is False and "not 4-D" in decision["reason"]
    teacher = create("resnet8").eval().requires_grad_(False)
    images = torch.randn(8, 3, 16, 16)
    with torch.inference_mode():
        before = teacher(images)
    decision = probe_channels_last(create("resnet8"), [teacher], images, torch.zeros(8, dtype=torch.long), repeats=1)
    with torch.inference_mode():
        after = teacher(images)
    assert torch.allclose(before, after, atol=1e-5)
    assert isinstance(decision["teachers"][0], bool)

"""Dense prediction: the segmentation task (dice, IoU), seg_mnist / seg3d_mnist, U-Nets, pixel-wise
KD, a growing U-Net assistant, and a segmentation run end to end through ``kdforge train``."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import batch_of
from test_data import write_mnist_files

from kdforge.cli import main
from kdforge.config import build_config
from kdforge.core.errors import ConfigError, DataError
from kdforge.data import load_dataset
from kdforge.data.sources.segmnist import compose_2d, sweep_digit
from kdforge.data.tasks import TASKS, task_for
from kdforge.data.types import DatasetInfo
from kdforge.engine.trainer import Trainer
from kdforge.methods import METHODS
from kdforge.methods.base import Step
from kdforge.methods.growing_ta import ChannelGrower
from kdforge.models import count_parameters, create

SEG_INFO = DatasetInfo("seg", 3, 1, (2, 3), (0.5,), (0.5,), ["bg", "a", "b"], task="segmentation")


def _one_hot_logits(classes: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(classes, k).movedim(-1, 1).float() * 10.0


def test_dice_and_iou_match_hand_counted_confusion():
    target = torch.tensor([[[0, 0, 1], [1, 2, 2]]])
    predicted = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
    evaluator = task_for(SEG_INFO).evaluator()
    evaluator.update(_one_hot_logits(predicted, 3), target)
    result = evaluator.finish()
    # class 0: TP 1, FP 1 (target 2 -> 0), FN 1 (-> 1); class 1: TP 2, FP 1, FN 0; class 2: TP 1, FP 0, FN 1
    assert result["dice_c0"] == pytest.approx(100 * 2 / 4)
    assert result["dice_c1"] == pytest.approx(100 * 4 / 5)
    assert result["dice_c2"] == pytest.approx(100 * 2 / 3)
    assert result["iou_c1"] == pytest.approx(100 * 2 / 3)
    assert result["dice"] == pytest.approx(100 * (4 / 5 + 2 / 3) / 2)  # foreground classes only
    assert result["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert result["pixel_acc"] == pytest.approx(100 * 4 / 6)


def test_confusion_counts_sum_over_batches_and_ranks():
    target = torch.tensor([[[0, 1, 2]], [[2, 2, 1]]])
    predicted = torch.tensor([[[0, 1, 1]], [[2, 2, 2]]])
    whole = task_for(SEG_INFO).evaluator()
    whole.update(_one_hot_logits(predicted, 3), target)
    halves = [task_for(SEG_INFO).evaluator() for _ in range(2)]
    for rank, evaluator in enumerate(halves):
        evaluator.update(_one_hot_logits(predicted[rank : rank + 1], 3), target[rank : rank + 1])
    other = halves[1]
    summed = halves[0].finish(
        reduce=lambda packed: packed + torch.cat([other.confusion.double().reshape(-1), other.loss])
    )
    assert summed == pytest.approx(whole.finish())
    assert task_for(SEG_INFO).is_better(80.0, 70.0)  # dice: higher is better


def test_segmentation_loss_is_per_pixel_ce_and_ignores_the_ignore_index():
    task = TASKS.get("segmentation")(SEG_INFO)
    logits = torch.randn(2, 3, 2, 3)
    target = torch.randint(0, 3, (2, 2, 3))
    expected = F.cross_entropy(logits.movedim(1, -1).reshape(-1, 3), target.reshape(-1))
    assert float(task.supervised_loss(logits, target)) == pytest.approx(float(expected), rel=1e-5)
    ignored = target.clone()
    ignored[0] = 255
    part = F.cross_entropy(logits[1:].movedim(1, -1).reshape(-1, 3), target[1:].reshape(-1))
    assert float(task.supervised_loss(logits, ignored, ignore_index=255)) == pytest.approx(float(part), rel=1e-5)
    perfect = _one_hot_logits(target, 3) * 10
    assert float(task.supervised_loss(perfect, target, dice_weight=1.0)) < 1e-3  # CE and Dice both ~0
    with pytest.raises(DataError, match="N x classes"):
        task.supervised_loss(torch.zeros(2, 3), target)


def test_seg_mnist_labels_sit_on_the_digit_strokes():
    digit = torch.zeros(1, 28, 28, dtype=torch.uint8)
    digit[0, 5:20, 10:13] = 200  # a vertical stroke
    digit[0, 5:20, 13] = 60  # faint ink below the threshold
    images, maps, first = compose_2d(digit, torch.tensor([7]), 6, 40, 1, 128, seed=3)
    for image, label in zip(images[:, 0], maps):
        assert int((label == 8).sum()) == 45  # digit 7 -> class 8, every stroke pixel
        assert torch.equal(label == 8, image >= 128)
        assert int((image == 60).sum()) == 15 and set(label.unique().tolist()) == {0, 8}
    assert first.tolist() == [7] * 6
    corners = {tuple((m == 8).nonzero()[0].tolist()) for m in maps}
    assert len(corners) > 1  # positions vary


def test_seg_mnist_layout_is_fixed_by_its_own_seed(tmp_path):
    write_mnist_files(tmp_path / "MNIST" / "raw", train=40, test=20)
    options = {"canvas": 32, "train_size": 12, "test_size": 6}
    first = load_dataset("seg_mnist", tmp_path, **options)
    again = load_dataset("seg_mnist", tmp_path, seed=9, **options)  # the run's seed does not move digits
    other = load_dataset("seg_mnist", tmp_path, layout_seed=1, **options)
    assert first.info.task == "segmentation" and first.info.num_classes == 11
    assert first.train.images.shape == (12, 1, 32, 32) and first.train.targets.shape == (12, 32, 32)
    assert first.train.targets.dtype == torch.int64
    assert torch.equal(first.train.images, again.train.images) and torch.equal(first.test.targets, again.test.targets)
    assert not torch.equal(first.train.targets, other.train.targets)
    labelled = first.train.targets > 0
    assert bool((first.train.images[:, 0][labelled] >= 128).all())
    with pytest.raises(ConfigError, match="canvas"):
        load_dataset("seg_mnist", tmp_path, canvas=20)


def test_seg3d_mnist_volumes_sweep_a_digit_through_depth(tmp_path):
    write_mnist_files(tmp_path / "MNIST" / "raw", train=30, test=10)
    data = load_dataset(
        "seg3d_mnist",
        tmp_path,
        depth=8,
        canvas=24,
        digit_size=16,
        min_extent=4,
        max_extent=6,
        train_size=4,
        test_size=2,
    )
    assert data.train.images.shape == (4, 1, 8, 24, 24) and data.train.targets.shape == (4, 8, 24, 24)
    assert data.info.sample_shape == (1, 8, 24, 24)
    labelled = data.train.targets > 0
    assert bool((data.train.images[:, 0][labelled] >= 128).all())
    depth_profile = labelled.flatten(2).any(-1)  # which slices of each volume hold an object
    assert bool(depth_profile.any(1).all()) and not bool(depth_profile.all())
    digit = torch.zeros(28, 28, dtype=torch.uint8)
    digit[4:24, 4:24] = 255
    solid = sweep_digit(digit, 20, 7, twist_degrees=0.0)
    areas = (solid >= 128).flatten(1).sum(1)
    assert areas[3] == areas.max() and areas[0] < areas[3]  # an ellipsoid profile: widest in the middle


@pytest.mark.parametrize(
    ("name", "base", "params", "shape"),
    [
        ("unet2d", 14, 345111, (2, 1, 32, 32)),
        ("unet2d", 4, 28531, (2, 1, 32, 32)),
        ("unet2d", 2, 7263, (2, 1, 16, 24)),
        ("unet3d", 2, 20979, (1, 1, 8, 16, 16)),
    ],
)
def test_unet_outputs_per_location_logits_with_known_sizes(name, base, params, shape):
    model = create(name, num_classes=11, in_channels=1, base=base)
    assert count_parameters(model) == params
    out = model(torch.zeros(shape))
    assert out.shape == (shape[0], 11, *shape[2:])
    assert {"enc1", "bottleneck", "dec3", "logits", "stage7"} <= set(model.feature_points)


def test_unet_refuses_inputs_it_cannot_pool_in_one_line():
    with pytest.raises(ConfigError, match="divisible by 8"):
        create("unet2d", num_classes=3, in_channels=1, base=2)(torch.zeros(1, 1, 20, 20))
    with pytest.raises(ConfigError, match="unet3d"):
        create("unet2d", num_classes=3, in_channels=1, base=2)(torch.zeros(1, 1, 8, 8, 8))


class _Fixed(torch.nn.Module):
    """A 'network' that returns fixed logits whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, x):
        return self.logits


def test_pixel_kd_is_the_kl_at_every_location_averaged_over_locations():
    student = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # 1 x 2 classes x 1 x 2 pixels
    teacher = torch.tensor([[[[3.0, 0.0]], [[0.0, 0.0]]]])
    T = 2.0

    def kl(t, s):  # two classes, by hand
        pt = [math.exp(v / T) / sum(math.exp(u / T) for u in t) for v in t]
        ps = [math.exp(v / T) / sum(math.exp(u / T) for u in s) for v in s]
        return sum(a * math.log(a / b) for a, b in zip(pt, ps))

    expected = T**2 * (kl([3.0, 0.0], [1.0, 0.0]) + kl([0.0, 0.0], [0.0, 2.0])) / 2
    method = METHODS.get("kd")(
        _Fixed(student), [_Fixed(teacher)], {"temperature": T, "kd_weight": 1.0, "ce_weight": 0.0}
    )
    method.use_task(task_for(SEG_INFO))
    batch = batch_of(torch.zeros(1, 1, 1, 2), y=torch.zeros(1, 1, 2, dtype=torch.int64))
    out = method(batch, Step(0, 1, 0, 1))
    assert float(out.losses["kd"].detach()) == pytest.approx(expected, rel=1e-5)
    assert out.logits.shape == (1, 2, 1, 2)


def test_growing_a_unet_assistant_keeps_its_function():
    model = create("unet2d", num_classes=5, in_channels=1, base=8, depth=2)
    grower = ChannelGrower(model)
    grower.set_fraction(0.25)
    x = torch.randn(2, 1, 16, 16)
    model.train()
    for _ in range(2):  # move BN statistics away from their start
        model(x)
    model.eval()
    before = model(x)
    grower.grow(0.25, 0.75, noise=0.01, generator=torch.Generator().manual_seed(0))
    after = model(x)
    assert torch.allclose(before, after, atol=1e-5)
    assert grower.active_fraction() == pytest.approx(0.75)
    model.train()
    assert torch.isfinite(model(x)).all()


def _seg_recipe(root, method="ce", **extra):
    return {
        "name": "seg",
        "data": {
            "name": "seg_mnist",
            "root": str(root),
            "augment": False,
            "options": {"canvas": 32, "max_digits": 2, "train_size": 16, "test_size": 8},
        },
        "student": {"name": "unet2d", "kwargs": {"base": 2, "depth": 2}},
        "method": {"name": method},
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "progress": "none",
            "scheduler": {"name": "constant"},
            "optimizer": {"name": "adam", "lr": 0.01},
        },
        **extra,
    }


def test_kdforge_train_runs_segmentation_growing_ta_end_to_end(tmp_path, capsys):
    write_mnist_files(tmp_path / "MNIST" / "raw", train=40, test=20)
    recipe = _seg_recipe(
        tmp_path,
        "growing_ta",
        teachers=[{"name": "unet2d", "kwargs": {"base": 4, "depth": 2}}],
    )
    recipe["method"].update({"grow_epochs": [1], "dice_weight": 1.0})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"dice", "miou", "pixel_acc", "loss"} <= set(records[-1]["test"])
    assert 0.0 <= records[-1]["test"]["dice"] <= 100.0 and "assistant" in records[-1]["members"]
    assert records[0]["train"]["ta_active_fraction"] == pytest.approx(0.5)  # student base 2 / TA base 4
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == "segmentation" and summary["best"]["metric"] == "dice"
    model_file = tmp_path / "run" / "checkpoints" / "model_last.pt"
    assert main(["eval", str(model_file), "--json"]) == 0  # kdforge eval scores through the task
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["dice"] == pytest.approx(records[-1]["test"]["dice"], abs=1e-6)
    assert main(["eval", str(model_file)]) == 0
    assert "dice" in capsys.readouterr().out


def test_classification_only_methods_and_crops_are_refused_on_segmentation(tmp_path):
    write_mnist_files(tmp_path / "MNIST" / "raw", train=40, test=20)
    config = build_config(_seg_recipe(tmp_path, "dkd", teachers=[{"name": "unet2d", "kwargs": {"base": 2}}]))
    with pytest.raises(ConfigError, match="does not support the segmentation task") as caught:
        Trainer(config, tmp_path / "run").fit()
    assert "\n" not in str(caught.value) and "kd" in str(caught.value)
    recipe = _seg_recipe(tmp_path)
    recipe["data"]["augment"] = {"crop_padding": 2}
    with pytest.raises(ConfigError, match="per-pixel labels") as caught:
        Trainer(build_config(recipe), tmp_path / "run2").fit()
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="dice_weight applies to segmentation only"):
        Trainer(
            build_config(
                {
                    **_seg_recipe(tmp_path),
                    "data": {"name": "mnist", "root": str(tmp_path)},
                    "student": {"name": "lenet"},
                    "method": {"name": "ce", "dice_weight": 1.0},
                }
            ),
            tmp_path / "run3",
        ).fit()


def test_fitnet_hints_a_unet_decoder_stage_on_segmentation():
    student = create("unet2d", num_classes=3, in_channels=1, base=2, depth=2)
    teacher = create("unet2d", num_classes=3, in_channels=1, base=4, depth=2)
    method = METHODS.get("fitnet")(student, [teacher], {"student_layers": ["dec2"]}, input_shape=(1, 16, 16))
    method.use_task(task_for(SEG_INFO))
    assert method.regressors[0].kind == "conv1x1"  # same resolution: 2 -> 4 channels
    batch = batch_of(torch.randn(2, 1, 16, 16), y=torch.randint(0, 3, (2, 16, 16)))
    out = method(batch, Step(0, 1, 0, 1))
    assert set(out.losses) == {"ce", "hint"} and all(torch.isfinite(v) for v in out.losses.values())
    out.loss.backward()
    assert student.dec2.conv1.weight.grad is not None


def test_a_volumetric_kd_run_trains_and_scores_voxels(tmp_path):
    write_mnist_files(tmp_path / "MNIST" / "raw", train=30, test=10)
    options = {"depth": 8, "canvas": 16, "digit_size": 12, "min_extent": 2, "max_extent": 4}
    recipe = _seg_recipe(tmp_path, "kd", teachers=[{"name": "unet3d", "kwargs": {"base": 2, "depth": 2}}])
    recipe["data"] = {
        "name": "seg3d_mnist",
        "root": str(tmp_path),
        "augment": True,  # normalisation only for segmentation data
        "options": {**options, "train_size": 8, "test_size": 4},
    }
    recipe["student"] = {"name": "unet3d", "kwargs": {"base": 1, "depth": 2}}
    recipe["train"]["epochs"] = 1
    summary = Trainer(build_config(recipe), tmp_path / "run").fit()
    test = summary["final"]["test"]
    assert summary["task"] == "segmentation" and {"dice", "miou", "pixel_acc"} <= set(test)
    assert 0.0 <= test["pixel_acc"] <= 100.0 and math.isfinite(test["loss"])


@pytest.mark.parametrize("name", ["seg_mnist_gtan", "seg3d_mnist_gtan"])
def test_segmentation_recipes_resolve_with_the_documented_sizes(name):
    from pathlib import Path

    from kdforge.config import read_yaml
    from kdforge.engine.pipeline import _substitute, stage_recipes

    path = Path(__file__).resolve().parents[1] / "configs" / "recipes" / f"{name}.yaml"
    stages = stage_recipes(read_yaml(path), path.parent)
    dirs, methods = {}, []
    for stage, recipe in stages.items():
        config = build_config(_substitute(recipe, dirs, stage))
        dirs[stage] = Path("/runs") / stage
        methods.append(config.method.name)
        dims = 3 if name.startswith("seg3d") else 2
        assert config.student.name == f"unet{dims}d"
    assert methods == ["ce", "ce", "kd", "takd", "takd", "growing_ta"]
    teacher = create("unet2d", num_classes=11, in_channels=1, base=14)
    student = create("unet2d", num_classes=11, in_channels=1, base=4, depth=2)
    assert 0.015 < count_parameters(student) / count_parameters(teacher) < 0.025  # the 2% student

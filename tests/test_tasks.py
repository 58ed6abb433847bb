"""Tasks beyond classification: the TASKS registry, regression metrics, targets apart from labels,
the rotated-MNIST regression source and a regression run end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_data import write_mnist_files

from kdforge.config import build_config
from kdforge.core.errors import ConfigError, DataError
from kdforge.data import load_dataset
from kdforge.data.sources.rotated import rotate_images
from kdforge.data.tasks import TASKS, task_for
from kdforge.data.types import DatasetInfo, TensorData
from kdforge.engine.trainer import Trainer


def test_registry_names_the_tasks():
    assert {"classification", "regression"} <= set(TASKS.names())
    assert task_for(None).name == "classification"


def test_classification_evaluator_counts_top1_top5_and_mean_ce():
    task = task_for(None)
    evaluator = task.evaluator()
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    evaluator.update(logits, torch.tensor([0, 1]))
    result = evaluator.finish()
    expected_ce = float(torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])))
    assert result["top1"] == pytest.approx(50.0)
    assert result["top5"] == pytest.approx(100.0)  # k = min(5, classes) = 3: every label is in the top 3
    assert result["loss"] == pytest.approx(expected_ce)


def test_regression_metrics_are_reported_in_target_units():
    info = DatasetInfo("angles", 1, 1, (4, 4), (0.5,), (0.5,), ["angle"], task="regression", target_scale=90.0)
    task = task_for(info)
    evaluator = task.evaluator()
    evaluator.update(torch.tensor([[0.5], [0.2]]), torch.tensor([0.4, 0.4]))  # errors 0.1 and -0.2 (x 90 degrees)
    evaluator.update(torch.tensor([[1.0]]), torch.tensor([1.0]))
    result = evaluator.finish()
    assert result["mae"] == pytest.approx(90.0 * 0.3 / 3)
    assert result["rmse"] == pytest.approx(90.0 * math.sqrt((0.01 + 0.04) / 3))
    assert result["loss"] == pytest.approx((0.01 + 0.04) / 3)
    assert task.is_better(1.0, 2.0) and not task.is_better(2.0, 1.0)  # lower error wins


def test_regression_loss_refuses_an_output_of_the_wrong_width():
    task = TASKS.get("regression")(None)
    assert float(task.supervised_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0]))) == pytest.approx(2.5)
    with pytest.raises(DataError, match="as many outputs"):
        task.supervised_loss(torch.zeros(2, 10), torch.zeros(2))


def test_targets_travel_with_select_and_default_to_labels():
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    plain = TensorData(images, torch.tensor([0, 1, 0, 1]))
    assert plain.targets is plain.labels
    data = TensorData(images, torch.tensor([0, 1, 0, 1]), targets=torch.tensor([0.1, 0.2, 0.3, 0.4]))
    picked = data.select(torch.tensor([3, 1]))
    assert picked.targets.tolist() == pytest.approx([0.4, 0.2])
    assert picked.labels.tolist() == [1, 1]
    with pytest.raises(DataError, match="targets have shape"):
        TensorData(images, torch.tensor([0, 1, 0, 1]), targets=torch.zeros(3))


def test_rotation_is_counter_clockwise_about_the_centre():
    image = torch.zeros(1, 1, 5, 5, dtype=torch.uint8)
    image[0, 0, 0, 2] = 255  # top middle
    turned = rotate_images(image, torch.tensor([90.0]))[0, 0]
    assert turned[2, 0] == 255 and int(turned.sum()) == 255  # -> middle left
    assert torch.equal(rotate_images(image, torch.tensor([0.0])), image)


def test_rotated_mnist_is_a_fixed_regression_benchmark(tmp_path):
    write_mnist_files(tmp_path / "MNIST" / "raw", train=40, test=20)
    first = load_dataset("rotated_mnist", tmp_path)
    again = load_dataset("rotated_mnist", tmp_path, seed=5)  # the run's seed does not move the angles
    assert first.info.task == "regression" and first.info.num_classes == 1 and first.info.target_scale == 90.0
    assert torch.equal(first.train.targets, again.train.targets)
    assert first.train.targets.dtype == torch.float32
    assert 0.0 <= float(first.train.targets.min()) and float(first.train.targets.max()) < 1.0
    assert first.train.labels.tolist() == (torch.arange(40) % 10).tolist()  # the digit stays the stratum
    other = load_dataset("rotated_mnist", tmp_path, angle_seed=1)
    assert not torch.equal(first.train.targets, other.train.targets)
    subset = load_dataset("rotated_mnist", tmp_path, train_subset=10)
    assert len(subset.train) == 10 and sorted(subset.train.labels.tolist()) == list(range(10))
    with pytest.raises(ConfigError, match="max_angle"):
        load_dataset("rotated_mnist", tmp_path, max_angle=400)


def _regression_recipe(root, method="ce", **extra):
    return {
        "name": "angles",
        "data": {"name": "rotated_mnist", "root": str(root), "augment": False},
        "student": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "method": {"name": method},
        "train": {"epochs": 2, "batch_size": 16, "progress": "none", "scheduler": {"name": "constant"}},
        **extra,
    }


def test_a_classification_method_on_regression_data_is_refused_in_one_line(tmp_path):
    write_mnist_files(tmp_path / "MNIST" / "raw", train=40, test=20)
    config = build_config(_regression_recipe(tmp_path, "dkd", teachers=[{"name": "mlp"}]))
    with pytest.raises(ConfigError, match="does not support the regression task") as caught:
        Trainer(config, tmp_path / "run").fit()
    assert "\n" not in str(caught.value) and "ce" in str(caught.value)


def test_regression_run_selects_the_lowest_error_and_records_mae(tmp_path):
    write_mnist_files(tmp_path / "MNIST" / "raw", train=48, test=16)
    summary = Trainer(build_config(_regression_recipe(tmp_path)), tmp_path / "run").fit()
    assert summary["task"] == "regression"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(records[0]["test"]) == {"mae", "rmse", "loss"}
    assert "loss_mse" in records[0]["train"]
    best = min(records, key=lambda r: r["test"]["mae"])
    assert summary["best"]["metric"] == "mae" and summary["best"]["epoch"] == best["epoch"]
    final = summary["final"]["test"]
    assert math.isfinite(final["mae"]) and final["rmse"] >= final["mae"] > 0.0  # RMSE bounds MAE from above

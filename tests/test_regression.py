"""Regression as a first-class task: regression KD (teacher targets, feature methods), regression
heads of the zoo, tabular regression sources (diabetes, csv, npz; vector targets), and MAE/RMSE in
`kdforge eval`, the report and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import batch_of
from torch import nn

from kdforge.config import build_config
from kdforge.core.errors import ConfigError
from kdforge.data import load_dataset
from kdforge.data.tasks import task_for
from kdforge.data.types import DatasetInfo
from kdforge.engine.trainer import Trainer
from kdforge.methods import METHODS
from kdforge.methods.base import Step
from kdforge.models import MODELS, create

STEP = Step(0, 1, 0, 1)


def regression_info(outputs: int = 1, scale: float = 90.0) -> DatasetInfo:
    return DatasetInfo(
        "angles", outputs, 1, (8, 8), (0.5,), (0.5,), [f"t{i}" for i in range(outputs)], task="regression",
        target_scale=scale, target_unit="°",
    )  # fmt: skip


class Linear(nn.Module):
    def __init__(self, weight: float) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1, bias=False)
        nn.init.constant_(self.fc.weight, weight)

    def forward(self, x):
        return self.fc(x.flatten(1))


# --------------------------------------------------------------------------- kd for regression
def test_kd_on_regression_is_mse_to_the_labels_plus_mse_to_the_teacher():
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])  # student 0.5 x, teacher 1.0 x
    y = torch.tensor([0.2, 1.5])
    kd = METHODS.get("kd")(Linear(0.5), [Linear(1.0)], {"kd_weight": 0.7, "ce_weight": "complement"})
    kd.use_task(task_for(regression_info()))
    out = kd(batch_of(x, y), STEP)
    student, teacher = torch.tensor([0.5, 1.0]), torch.tensor([1.0, 2.0])
    expected_kd = 0.7 * ((student - teacher) ** 2).mean()  # (0.25 + 1.0) / 2
    expected_mse = 0.3 * ((student - y) ** 2).mean()  # (0.09 + 0.25) / 2
    assert set(out.losses) == {"kd", "mse"}
    assert float(out.losses["kd"].detach()) == pytest.approx(float(expected_kd)) == pytest.approx(0.4375)
    assert float(out.losses["mse"].detach()) == pytest.approx(float(expected_mse)) == pytest.approx(0.051)
    assert out.logits.shape == (2, 1)


@pytest.mark.parametrize("param", [{"temperature": 2}, {"select": "correct"}, {"reduction": "elementmean"}])
def test_kd_refuses_probability_settings_on_regression_in_one_line(param):
    kd = METHODS.get("kd")(Linear(0.5), [Linear(1.0)], param)
    with pytest.raises(ValueError, match="class probabilities") as caught:
        kd.use_task(task_for(regression_info()))
    assert "\n" not in str(caught.value) and next(iter(param)) in str(caught.value)
    kd.use_task(task_for(None))  # the same settings are fine for classification


def test_classification_only_methods_are_refused_on_regression_with_the_alternatives():
    for name in ("dkd", "crd", "ensemble_kd"):
        with pytest.raises(ValueError, match="does not support the regression task") as caught:
            METHODS.get(name).check_task("regression", "dataset 'angles'")
        message = str(caught.value)
        assert "\n" not in message and all(m in message for m in ("kd", "fitnet", "ce"))


@pytest.mark.parametrize("name", ["fitnet", "at", "rkd", "sp", "pkt"])
def test_feature_methods_supervise_regression_with_mse(name):
    torch.manual_seed(0)
    student = create("resnet8", num_classes=1, in_channels=1, input_size=(8, 8))
    teacher = create("resnet14", num_classes=1, in_channels=1, input_size=(8, 8))
    method_cls = METHODS.get(name)
    extra = {"input_shape": (1, 8, 8)} if name == "fitnet" else {}
    method = method_cls(student, [teacher], {"ce_weight": 0.5}, **extra)
    method.use_task(task_for(regression_info()))
    x, y = torch.randn(6, 1, 8, 8), torch.rand(6)
    out = method(batch_of(x, y), STEP)
    assert "ce" not in out.losses and method.task.loss_name in out.losses
    expected = 0.5 * F.mse_loss(out.logits[:, 0].detach(), y)
    assert float(out.losses["mse"].detach()) == pytest.approx(float(expected), rel=1e-5)
    distill = [v for k, v in out.losses.items() if k != "mse"]
    assert distill and all(torch.isfinite(v) for v in distill)
    sum(out.losses.values()).backward()  # the student learns from both terms
    assert student.classifier.weight.grad is not None


# --------------------------------------------------------------------------- regression heads
@pytest.mark.parametrize("name", [n for n in MODELS.names() if n != "nonn"])
def test_every_zoo_network_with_one_output_is_a_regression_network(name):
    cell = [["sep_conv_3x3", 0], ["skip_connect", 1], ["dil_conv_3x3", 0], ["skip_connect", 2]]
    genotype = {"normal": cell, "normal_concat": [2, 3], "reduce": cell, "reduce_concat": [2, 3], "steps": 2}
    extra = {"genotype": genotype, "channels": 4, "layers": 3} if name == "darts_net" else {}  # built from a search
    model = create(name, num_classes=1, in_channels=1, input_size=(16, 16), **extra).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 1)
    bounded = create(name, num_classes=3, in_channels=1, input_size=(16, 16), output="sigmoid", **extra).eval()
    with torch.no_grad():
        y = bounded(torch.randn(2, 1, 16, 16) * 10)  # saturates in float32: closed interval
    assert y.shape == (2, 3) and bool(((y >= 0) & (y <= 1)).all())


def test_bounded_output_keeps_parameter_names_and_rebuilds_from_kwargs():
    torch.manual_seed(0)
    plain = create("lenet", num_classes=1, in_channels=1, input_size=(28, 28))
    torch.manual_seed(0)
    bounded = create("lenet", num_classes=1, in_channels=1, input_size=(28, 28), output="sigmoid")
    assert list(plain.state_dict()) == list(bounded.state_dict())
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(torch.sigmoid(plain(x)), bounded(x))
        assert bool(
            (create("mlp", num_classes=1, in_channels=1, input_size=(4, 4), output="relu")(x[:, :, :4, :4]) >= 0).all()
        )
    with pytest.raises(ConfigError, match="output must be one of"):
        create("lenet", num_classes=1, output="tanh")


# --------------------------------------------------------------------------- sources
def test_diabetes_is_a_bundled_regression_table():
    data = load_dataset("diabetes")
    info = data.info
    assert info.task == "regression" and info.num_classes == 1 and info.class_names == ["progression"]
    assert len(data.train) + len(data.test) == 442 and data.train.images.shape[1] == 10
    raw = data.train.targets * info.target_scale
    assert raw.dtype == torch.float32 and 25.0 <= float(raw.min()) and float(raw.max()) <= 346.0
    assert float((data.train.targets**2).mean()) == pytest.approx(1.0, rel=1e-4)  # "auto": unit RMS
    assert int(data.train.labels.max()) == 9  # deciles stratify subsets
    subset = load_dataset("diabetes", train_subset=50)
    assert len(subset.train) == 50 and sorted(subset.train.labels.unique().tolist()) == list(range(10))
    assert subset.train.targets.shape == (50,)


def _write_table(path, rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    a, b = x @ [1.0, -2.0, 0.5] + 10, x[:, 0] * 3 - 4
    lines = ["f1,f2,f3,a,b"] + [f"{r[0]:.5f},{r[1]:.5f},{r[2]:.5f},{p:.5f},{q:.5f}" for r, p, q in zip(x, a, b)]
    path.write_text("\n".join(lines) + "\n")
    return x, np.stack([a, b], 1)


def test_csv_regression_reads_vector_targets_and_trains_end_to_end(tmp_path):
    _, targets = _write_table(tmp_path / "table.csv", 120)
    options = {"path": str(tmp_path / "table.csv"), "task": "regression", "label": ["a", "b"], "target_unit": "u"}
    data = load_dataset("csv", **options)
    assert data.info.num_classes == 2 and data.info.class_names == ["a", "b"] and data.info.target_unit == "u"
    assert data.train.images.shape[1] == 3 and data.train.targets.shape == (90, 2)
    scale = data.info.target_scale
    restored = (data.train.targets * scale).numpy()
    picked = targets[data.train.indices.numpy()]
    assert np.allclose(restored, picked, atol=1e-3)
    recipe = {
        "data": {"name": "csv", "augment": False, "options": options},
        "student": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "train": {"epochs": 3, "batch_size": 30, "optimizer": {"name": "adam", "lr": 0.01}, "progress": "none"},
    }
    summary = Trainer(build_config(recipe), tmp_path / "run").fit()
    test = summary["final"]["test"]
    assert summary["task"] == "regression" and test["rmse"] >= test["mae"] > 0
    with pytest.raises(ConfigError, match="task must be one of"):
        load_dataset("csv", path=str(tmp_path / "table.csv"), task="ranking")


def test_npz_regression_and_one_scalar_csv_column(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 255, size=(20, 8, 8), dtype=np.uint8),
        "y_train": rng.uniform(0, 5, size=(20, 3)),
        "x_test": rng.integers(0, 255, size=(10, 8, 8), dtype=np.uint8),
        "y_test": rng.uniform(0, 5, size=(10, 3)),
        "target_names": np.array(["x", "y", "z"]),
    }
    np.savez(tmp_path / "set.npz", **arrays)
    data = load_dataset("npz", path=str(tmp_path / "set.npz"), task="regression", target_scale=5.0)
    assert data.info.task == "regression" and data.info.num_classes == 3 and data.info.target_scale == 5.0
    assert data.train.images.shape == (20, 1, 8, 8) and data.test.targets.shape == (10, 3)
    assert torch.allclose(data.test.targets * 5.0, torch.as_tensor(arrays["y_test"], dtype=torch.float32))
    _write_table(tmp_path / "t.csv", 40)
    scalar = load_dataset("csv", path=str(tmp_path / "t.csv"), task="regression", label="a", target_scale=1)
    assert scalar.train.targets.shape == (30,) and scalar.info.num_classes == 1 and scalar.info.target_scale == 1.0


# --------------------------------------------------------------------------- eval, report, export
def _diabetes_recipe(name: str, method: dict | None = None, teachers=(), seed: int = 0, **extra) -> dict:
    return {
        "name": name,
        "seed": seed,
        "data": {"name": "diabetes", "augment": False},
        "student": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "teachers": [{"checkpoint": t} for t in teachers],
        "method": method or {"name": "ce"},
        "train": {"epochs": 3, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.01}, "progress": "none"},
        **extra,
    }


@pytest.fixture(scope="module")
def diabetes_runs(tmp_path_factory):
    """A teacher, the student alone (2 seeds) and teacher-target KD through a teacher bank (2 seeds)."""
    root = tmp_path_factory.mktemp("diabetes")
    teacher = _diabetes_recipe("teacher")
    teacher["student"] = {"name": "mlp", "kwargs": {"hidden": [64]}}
    Trainer(build_config(teacher), root / "teacher").fit()
    checkpoint = str(root / "teacher" / "checkpoints" / "model_last.pt")
    bank = {"enabled": True, "directory": str(root / "bank")}
    for seed in (0, 1):
        Trainer(build_config(_diabetes_recipe(f"alone-s{seed}", seed=seed)), root / "runs" / f"alone{seed}").fit()
        kd = _diabetes_recipe(f"kd-s{seed}", {"name": "kd"}, [checkpoint], seed, teacher_bank=bank)
        Trainer(build_config(kd), root / "runs" / f"kd{seed}").fit()
    return root


def test_eval_prints_mae_and_rmse_of_a_regression_model_file(diabetes_runs, capsys):
    from kdforge.cli import main

    model_file = diabetes_runs / "teacher" / "checkpoints" / "model_last.pt"
    assert main(["eval", str(model_file)]) == 0
    line = capsys.readouterr().out.strip()
    assert "MAE" in line and "RMSE" in line and "top-1" not in line
    assert main(["eval", str(model_file), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((diabetes_runs / "teacher" / "summary.json").read_text())
    assert result["mae"] == pytest.approx(summary["final"]["test"]["mae"], rel=1e-5)
    assert main(["eval", str(model_file), "--attack", "fgsm"]) != 0
    assert "robust top-1 of a classifier" in capsys.readouterr().err


def test_report_of_regression_runs_shows_mae_and_the_delta_vs_the_student_alone(diabetes_runs):
    from kdforge.report.collect import collect
    from kdforge.report.table import RMSE_HEADER, final_header, group_runs, table_rows

    groups = group_runs(collect([diabetes_runs / "runs"]))
    assert {g.method for g in groups} == {"ce", "kd"} and all(g.primary == "mae" for g in groups)
    header = final_header(groups)
    assert header == "MAE final epoch"
    kd = next(g for g in groups if g.method == "kd")
    alone = next(g for g in groups if g.method == "ce")
    maes = [json.loads((r.path / "summary.json").read_text())["final"]["test"]["mae"] for r in kd.runs]
    assert kd.final.mean == pytest.approx(sum(maes) / 2) and kd.final.n == 2
    assert kd.delta == pytest.approx(kd.final.mean - alone.final.mean)
    rows = {r["method"]: r for r in table_rows(groups)}
    assert rows["kd"][header].startswith(f"{kd.final.mean:.2f} ± ") and rows["ce"]["Δ final vs student alone"] == "ref"
    assert rows["kd"][RMSE_HEADER] != "—" and "paper top-1 (%)" not in rows["kd"]  # no published MAE numbers
    from kdforge.report.writer import write_report

    out = diabetes_runs / "report"
    write_report([diabetes_runs / "runs"], out)
    text = (out / "report.md").read_text()
    assert "MAE final epoch" in text and "negative Δ is an improvement" in text


def test_export_writes_regression_metadata_and_checks_int8_in_target_units(diabetes_runs, tmp_path):
    pytest.importorskip("onnxruntime")
    from kdforge.commands.export import export_checkpoint

    model_file = diabetes_runs / "teacher" / "checkpoints" / "model_last.pt"
    result = export_checkpoint(model_file, out=tmp_path / "m.int8.onnx", int8=True, batches=2, batch_size=32)
    metadata = result["metadata"]
    assert metadata["kdforge.task"] == "regression"
    assert float(metadata["kdforge.target_scale"]) == pytest.approx(
        torch.load(model_file, weights_only=False)["dataset"]["target_scale"]
    )
    assert "int8_agreement" not in result and 0.0 <= result["int8_mae_vs_float"] < 50.0


def test_teacher_bank_top_k_is_refused_for_regression(tmp_path, diabetes_runs):
    checkpoint = str(diabetes_runs / "teacher" / "checkpoints" / "model_last.pt")
    bank = {"enabled": True, "directory": str(tmp_path / "bank"), "top_k": 1}
    recipe = _diabetes_recipe("kd", {"name": "kd"}, [checkpoint], teacher_bank=bank)
    with pytest.raises(ConfigError, match="top_k"):
        Trainer(build_config(recipe), tmp_path / "run").fit()


def test_kd_on_vector_targets_averages_over_components():
    student, teacher = nn.Linear(3, 2, bias=False), nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        teacher.weight.copy_(torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0]])  # student (1, 2), teacher (3, 6)
    y = torch.tensor([[0.0, 0.0]])
    kd = METHODS.get("kd")(student, [teacher], {"kd_weight": 1.0, "ce_weight": 1.0})
    kd.use_task(task_for(regression_info(outputs=2)))
    out = kd(batch_of(x, y), STEP)
    assert float(out.losses["kd"].detach()) == pytest.approx((4 + 16) / 2)
    assert float(out.losses["mse"].detach()) == pytest.approx((1 + 4) / 2)


def test_train_table_shows_an_mae_column_for_regression_runs(capsys, tmp_path):
    from kdforge.cli import _print_table

    regression = {"task": "regression", "method": "ce", "student": "mlp", "final": {"test": {"mae": 3.14159}}}
    classification = {"method": "ce", "student": "mlp", "final": {"test": {"top1": 91.5}}}
    _print_table({"r": regression}, tmp_path)
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert "MAE" in header and "top-1" not in header and "3.142" in row
    _print_table({"r": regression, "c": classification}, tmp_path)
    assert "top-1 (%) / MAE" in capsys.readouterr().out


REGRESSION_METHODS = sorted(n for n in METHODS.names() if "regression" in METHODS.get(n).tasks)


def test_the_regression_capable_methods_are_the_documented_ones():
    assert REGRESSION_METHODS == ["at", "ce", "fitnet", "kd", "pkt", "rkd", "sp"]


@pytest.mark.parametrize("name", REGRESSION_METHODS)
def test_every_regression_method_trains_a_step_through_the_recipe_path(name):
    """Built as `kdforge train` builds it on regression data; one step moves the student."""
    from kdforge.data.types import TensorData
    from kdforge.engine.build import build_distiller

    info = regression_info(outputs=2, scale=1.0)
    train = TensorData(torch.randint(0, 255, (16, 1, 8, 8), dtype=torch.uint8), torch.zeros(16, dtype=torch.long))
    minimum = METHODS.get(name).teachers_required[0]
    recipe = {
        "data": {"name": "digits"},
        "student": {"name": "resnet8"},
        "teachers": [{"name": "resnet14"}] * minimum,
        "method": {"name": name},
    }
    torch.manual_seed(0)
    distiller, _ = build_distiller(build_config(recipe), info, train)
    assert distiller.task.name == "regression"
    before = [p.detach().clone() for p in distiller.student.parameters()]
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    out = distiller.train()(batch_of(torch.randn(16, 1, 8, 8), torch.rand(16, 2)), STEP)
    assert out.logits.shape == (16, 2) and "ce" not in out.losses
    sum(out.losses.values()).backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, distiller.student.parameters()))

"""train.compile: auto decides from a deterministic estimate of the run's eager time; true/false
force it; a failed compilation leaves the student eager; the choice is in summary.json."""

from __future__ import annotations

import json

import pytest
import torch

from kdforge.config import build_config
from kdforge.engine import probe
from kdforge.engine.probe import compile_decision, estimated_step_seconds
from kdforge.engine.trainer import Trainer


def test_forced_settings_are_recorded_as_such():
    assert compile_decision(True, total_steps=1, device_type="cpu") == {
        "compiled": True,
        "reason": "train.compile: true",
    }
    assert compile_decision(False, total_steps=10**9, device_type="cuda")["compiled"] is False


def test_auto_compiles_long_runs_only():
    long = compile_decision("auto", total_steps=5000, device_type="cpu", step_seconds=lambda: 0.3)
    short = compile_decision("auto", total_steps=1000, device_type="cpu", step_seconds=lambda: 0.1)
    assert long["compiled"] is True and long["estimated_step_ms"] == pytest.approx(300.0)
    assert short["compiled"] is False and "less than twice" in short["reason"]
    assert compile_decision("auto", total_steps=10**6, device_type="mps", step_seconds=lambda: 1.0)["compiled"] is False


def test_auto_needs_a_cpp_compiler_on_a_cpu(monkeypatch):
    monkeypatch.setattr(probe.shutil, "which", lambda name: None)
    decision = compile_decision("auto", total_steps=10**6, device_type="cpu", step_seconds=lambda: 1.0)
    assert decision["compiled"] is False and "C++ compiler" in decision["reason"]


def test_step_estimate_scales_with_flops_and_batch():
    one = estimated_step_seconds(10**6, 32, "cpu")
    assert estimated_step_seconds(2 * 10**6, 32, "cpu") == pytest.approx(2 * one)
    assert estimated_step_seconds(10**6, 64, "cpu") == pytest.approx(2 * one)
    assert estimated_step_seconds(10**6, 32, "cuda") > probe.GPU_STEP_OVERHEAD_SECONDS  # launch cost floor


def _recipe(compile_setting, epochs=1):
    return build_config(
        {
            "name": "compile",
            "data": {"name": "digits", "augment": False, "train_subset": 100},
            "student": {"name": "mlp", "kwargs": {"hidden": [16]}},
            "method": {"name": "ce"},
            "train": {"epochs": epochs, "batch_size": 50, "progress": "none", "compile": compile_setting},
        }
    )


def test_auto_leaves_a_short_run_eager_and_says_why(tmp_path):
    summary = Trainer(_recipe("auto"), tmp_path).fit()
    choice = summary["compile"]
    assert choice["compiled"] is False and choice["reason"].startswith("auto:")
    assert choice["estimated_step_ms"] > 0
    assert json.loads((tmp_path / "summary.json").read_text())["compile"] == choice


def test_a_failed_compilation_keeps_the_student_eager(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise RuntimeError("no backend here")

    monkeypatch.setattr(torch.nn.Module, "compile", refuse)
    trainer = Trainer(_recipe(True), tmp_path)
    summary = trainer.fit()
    assert summary["status"] == "finished"
    assert (
        summary["compile"]["compiled"] is False
        and "compilation failed (RuntimeError: no backend here)" in (summary["compile"]["reason"])
    )


def test_resume_keeps_the_first_choice(tmp_path):
    config = _recipe("auto", epochs=2)
    Trainer(config, tmp_path).fit()
    path = tmp_path / "summary.json"
    saved = json.loads(path.read_text())
    saved["compile"] = {"compiled": False, "reason": "recorded earlier"}
    path.write_text(json.dumps(saved))
    resumed = Trainer(config, tmp_path, resume=True)
    resumed.setup()
    assert resumed.compilation == {"compiled": False, "reason": "recorded earlier"}


@pytest.mark.slow
def test_a_compiled_student_trains_like_the_eager_one(tmp_path):
    eager = Trainer(_recipe(False), tmp_path / "eager").fit()
    compiled = Trainer(_recipe(True), tmp_path / "compiled").fit()
    assert compiled["compile"]["compiled"] is True and compiled["compile"]["warmup_seconds"] > 0
    assert compiled["final"]["test"]["loss"] == pytest.approx(eager["final"]["test"]["loss"], rel=1e-3)


def test_a_tapped_student_is_not_compiled(tmp_path):
    config = build_config(
        {
            "name": "tapped",
            "data": {"name": "digits", "augment": False, "train_subset": 100},
            "student": {"name": "lenet"},
            "teachers": [{"name": "lenet"}],
            "method": {"name": "fitnet"},
            "train": {"epochs": 1, "batch_size": 50, "progress": "none", "compile": True},
        }
    )
    summary = Trainer(config, tmp_path).fit()
    assert summary["compile"]["compiled"] is False and "forward hooks" in summary["compile"]["reason"]
    assert summary["status"] == "finished"

"""The training engine end to end on the bundled digits: run directory, resume, checkpoints, errors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kdforge.config import build_config
from kdforge.core.checkpoint import read_model_file
from kdforge.core.errors import CheckpointError, ConfigError
from kdforge.engine.trainer import RunInterrupted, Trainer

ROOT = Path(__file__).resolve().parents[1]


def recipe(**overrides):
    data = {
        "name": "t",
        "data": {"name": "digits", "augment": False, "train_subset": 200},
        "student": {"name": "mlp", "kwargs": {"hidden": [32]}},
        "method": {"name": "ce"},
        "train": {
            "epochs": 4,
            "batch_size": 32,
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "scheduler": {"name": "cosine", "warmup_epochs": 1},
            "progress": "none",
        },
    }
    for key, value in overrides.items():
        data[key] = value
    return build_config(data)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    config = recipe(student={"name": "lenet"}, data={"name": "digits", "augment": False})
    Trainer(config, out).fit()
    return out


def test_run_directory_contents(tmp_path):
    summary = Trainer(recipe(), tmp_path).fit()
    assert summary["status"] == "finished" and summary["epochs_done"] == 4
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "curves.png",
        "checkpoints/state.pt",
        "checkpoints/model_last.pt",
        "checkpoints/model_best.pt",
    ):
        assert (tmp_path / name).is_file(), name
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2, 3]
    assert {"top1", "top5", "loss"} <= set(lines[-1]["test"])
    assert lines[-1]["train"]["images_per_second"] > 0
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert resolved["train"]["optimizer"]["momentum"] == 0.9  # defaults written out
    assert summary["selection_split"] == "test"
    assert summary["final"]["test"]["top1"] > 50  # an MLP learns digits in 4 epochs


def test_loss_decreases_and_checkpoints_load_with_weights_only(tmp_path):
    Trainer(recipe(), tmp_path).fit()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["train"]["loss"] < lines[0]["train"]["loss"]
    record = torch.load(tmp_path / "checkpoints/model_last.pt", weights_only=True)
    assert record["model"]["name"] == "mlp" and record["model"]["num_classes"] == 10


def test_resume_after_interrupt_gives_the_same_weights(tmp_path):
    straight = tmp_path / "straight"
    Trainer(recipe(), straight).fit()

    def interrupt_after_second_epoch(trainer, epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    broken = tmp_path / "broken"
    with pytest.raises(RunInterrupted):
        Trainer(recipe(), broken, callbacks=[interrupt_after_second_epoch]).fit()
    assert json.loads((broken / "summary.json").read_text())["status"] == "interrupted"
    # a line logged after the last saved state must not survive the resume
    with open(broken / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"epoch": 2, "train": {"loss": 0.0}}) + "\n")
    Trainer(recipe(), broken, resume=True).fit()

    a = read_model_file(straight / "checkpoints/model_last.pt")["state_dict"]
    b = read_model_file(broken / "checkpoints/model_last.pt")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    epochs = [json.loads(line)["epoch"] for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]


def test_same_seed_same_result_other_seed_differs(tmp_path):
    Trainer(recipe(), tmp_path / "a").fit()
    Trainer(recipe(), tmp_path / "b").fit()
    Trainer(recipe(seed=1), tmp_path / "c").fit()
    sd = lambda d: read_model_file(d / "checkpoints/model_last.pt")["state_dict"]  # noqa: E731
    a, b, c = sd(tmp_path / "a"), sd(tmp_path / "b"), sd(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_existing_run_is_not_overwritten_and_resume_checks_the_recipe(tmp_path):
    Trainer(recipe(), tmp_path).fit()
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(recipe(), tmp_path).fit()
    changed = recipe(train={**recipe().train.model_dump(), "epochs": 6})
    with pytest.raises(ConfigError, match="different recipe"):
        Trainer(changed, tmp_path, resume=True).fit()


def test_resume_may_change_how_often_it_evaluates_but_trains_the_same(tmp_path):
    straight = tmp_path / "straight"
    Trainer(recipe(), straight).fit()

    def interrupt_after_second_epoch(trainer, epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    broken = tmp_path / "broken"
    with pytest.raises(RunInterrupted):
        Trainer(recipe(), broken, callbacks=[interrupt_after_second_epoch]).fit()
    looser = recipe(train={**recipe().train.model_dump(), "eval_every": 2, "num_threads": 1})
    Trainer(looser, broken, resume=True).fit()
    assert yaml.safe_load((broken / "config.yaml").read_text())["train"]["eval_every"] == 2
    a = read_model_file(straight / "checkpoints/model_last.pt")["state_dict"]
    b = read_model_file(broken / "checkpoints/model_last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert ["test" in line for line in lines] == [True, True, False, True]  # epoch 2 not evaluated


def test_kd_with_teacher_checkpoint(tmp_path, teacher_dir):
    config = recipe(
        teachers=[{"checkpoint": str(teacher_dir / "checkpoints/model_last.pt")}],
        method={"name": "kd", "temperature": 2, "kd_weight": 0.7, "ce_weight": 0.3},
    )
    summary = Trainer(config, tmp_path).fit()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_kd", "loss_ce", "temperature"} <= set(lines[0]["train"])
    assert summary["final"]["test"]["top1"] > 50


def test_teacher_of_the_wrong_architecture_or_classes_is_a_clear_error(tmp_path, teacher_dir):
    ckpt = str(teacher_dir / "checkpoints/model_last.pt")
    wrong_name = recipe(teachers=[{"name": "resnet8", "checkpoint": ckpt}], method={"name": "kd"})
    with pytest.raises(CheckpointError, match="holds a 'lenet' but the recipe says 'resnet8'"):
        Trainer(wrong_name, tmp_path / "a").fit()
    wrong_kwargs = recipe(teachers=[{"checkpoint": ckpt, "kwargs": {"width": 3}}], method={"name": "kd"})
    with pytest.raises(CheckpointError, match="does not fit the model"):
        Trainer(wrong_kwargs, tmp_path / "b").fit()
    record = torch.load(ckpt, weights_only=True)
    record["model"]["num_classes"] = 100
    torch.save(record, tmp_path / "hundred.pt")
    wrong_classes = recipe(teachers=[{"checkpoint": str(tmp_path / "hundred.pt")}], method={"name": "kd"})
    with pytest.raises(CheckpointError, match="predicts 100 classes"):
        Trainer(wrong_classes, tmp_path / "c").fit()


def test_val_split_selects_the_best_epoch(tmp_path):
    config = recipe(data={"name": "digits", "augment": False, "val_fraction": 0.2})
    summary = Trainer(config, tmp_path).fit()
    assert summary["selection_split"] == "val" and summary["best"]["split"] == "val"
    assert "val" in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])


def run_cli(*args, cwd=None, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "kdforge", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def test_cli_train_eval_and_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe().to_dict()))
    result = run_cli("train", str(path), "--out", str(tmp_path / "run"), "--set", "train.epochs=2")
    assert result.returncode == 0, result.stderr
    assert "top-1" in result.stdout and "run directories" in result.stdout
    result = run_cli("eval", str(tmp_path / "run/checkpoints/model_last.pt"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["images"] == 500

    bad = run_cli("train", str(path), "--out", str(tmp_path / "bad"), "--set", "train.optimzer.lr=1")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "did you mean 'optimizer'" in bad.stderr
    assert "Traceback" not in bad.stderr
    listing = run_cli("list", "methods")
    assert listing.returncode == 0 and "ensemble_kd" in listing.stdout


def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    """Fabric DDP with gloo: 2 processes x batch 16 train the same MLP as 1 process x batch 32.

    The loader shards each epoch's permutation by stride, so step i of the two ranks together
    covers exactly the single process's batch i; gradients are averaged, so the weights agree.
    """
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe().to_dict()))
    single = run_cli("train", str(path), "--out", str(tmp_path / "one"), "--set", "train.epochs=2")
    assert single.returncode == 0, single.stderr[-2000:]
    result = run_cli(
        "train",
        str(path),
        "--out",
        str(tmp_path / "ddp"),
        "--set",
        "train.devices=2",
        "train.strategy=ddp",
        "train.epochs=2",
        "train.batch_size=16",
        timeout=900,  # two processes importing torch and Lightning on a busy 2-core machine
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "ddp/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "finished"
    a = read_model_file(tmp_path / "one/checkpoints/model_last.pt")["state_dict"]
    b = read_model_file(tmp_path / "ddp/checkpoints/model_last.pt")["state_dict"]
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    one = json.loads((tmp_path / "one/summary.json").read_text())
    assert summary["final"]["test"]["top1"] == pytest.approx(one["final"]["test"]["top1"], abs=0.5)


def test_channels_last_and_bf16_mixed_precision_run(tmp_path):
    config = recipe(
        student={"name": "resnet8"},
        data={"name": "digits", "augment": False, "train_subset": 64},
        train={**recipe().train.model_dump(), "epochs": 1, "channels_last": True, "precision": "bf16-mixed"},
    )
    summary = Trainer(config, tmp_path).fit()
    assert summary["status"] == "finished"
    assert 0.0 <= summary["final"]["test"]["top1"] <= 100.0


def test_pipeline_runs_stages_in_order_and_skips_finished_ones(tmp_path):
    from kdforge.engine.pipeline import run_pipeline

    teacher = recipe(student={"name": "lenet"}).to_dict()
    student = recipe(
        teachers=[{"checkpoint": "{teacher}/checkpoints/model_last.pt"}], method={"name": "kd", "temperature": 2}
    ).to_dict()
    calls = []

    def train(config, out, resume=False):
        calls.append(out.name)
        return Trainer(config, out, resume=resume).fit()

    pipeline = {"pipeline": {"teacher": teacher, "student": student}}
    summaries = run_pipeline(pipeline, tmp_path, tmp_path / "p", ["train.epochs=1"], train)
    assert calls == ["teacher", "student"] and summaries["student"]["method"] == "kd"
    run_pipeline(pipeline, tmp_path, tmp_path / "p", ["train.epochs=1"], train)
    assert calls == ["teacher", "student"]  # nothing re-run
    with pytest.raises(ConfigError, match="not an earlier stage"):
        run_pipeline({"pipeline": {"student": student}}, tmp_path, tmp_path / "q", [], train)


def test_demo_command_end_to_end(tmp_path):
    """`kdforge demo` as the README promises: three runs and a table (about 20 s on 2 idle cores)."""
    result = run_cli("demo", "--out", str(tmp_path / "demo"), timeout=1500)
    assert result.returncode == 0, result.stderr[-2000:]
    for stage in ("teacher", "student_alone", "student_kd"):
        assert json.loads((tmp_path / "demo" / stage / "summary.json").read_text())["status"] == "finished"
    assert "student_kd" in result.stdout and "top-1" in result.stdout


@pytest.mark.parametrize(
    "method",
    [
        {"name": "dkd", "warmup_epochs": 0.5},
        {"name": "at", "student_layers": ["stage1", "stage2"], "teacher_layers": ["stage1", "stage2"]},
        {"name": "fitnet"},
        {"name": "rkd"},
        {"name": "pkt"},
        {"name": "sp"},
        {"name": "crd", "num_negatives": 64},
        {"name": "hkd", "num_negatives": 64},
    ],
)
def test_every_method_trains_through_the_engine(tmp_path, teacher_dir, method):
    config = recipe(
        student={"name": "lenet", "kwargs": {"width": 0.5}},
        teachers=[{"checkpoint": str(teacher_dir / "checkpoints/model_last.pt")}],
        method=method,
        train={**recipe().train.model_dump(), "epochs": 1},
    )
    summary = Trainer(config, tmp_path).fit()
    assert summary["status"] == "finished" and summary["method"] == method["name"]
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record["train"]["loss"]) and len([k for k in record["train"] if k.startswith("loss_")]) >= 2
    if method["name"] == "fitnet":
        assert summary["extra_parameters"] > 0


def test_teacher_bank_run_matches_a_live_teacher_run(tmp_path, teacher_dir):
    """Replaying stored teacher logits (float16) trains the same student as running the teacher."""
    teachers = [{"checkpoint": str(teacher_dir / "checkpoints/model_last.pt")}]
    method = {"name": "kd", "temperature": 4}
    data = {"name": "digits", "augment": {"crop_padding": 1, "horizontal_flip": False}, "train_subset": 200}
    live = Trainer(recipe(teachers=teachers, method=method, data=data), tmp_path / "live").fit()
    banked_config = recipe(
        teachers=teachers, method=method, data=data, teacher_bank={"enabled": True, "directory": str(tmp_path / "bank")}
    )
    banked = Trainer(banked_config, tmp_path / "banked").fit()
    assert any((tmp_path / "bank").rglob("*.pt"))
    assert banked["final"]["test"]["top1"] == pytest.approx(live["final"]["test"]["top1"], abs=1.0)
    a = [json.loads(x)["train"]["loss"] for x in (tmp_path / "live/metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["train"]["loss"] for x in (tmp_path / "banked/metrics.jsonl").read_text().splitlines()]
    assert b == pytest.approx(a, rel=2e-2)
    # a second run with the same teacher and seed reuses the stored epochs
    files = sorted((tmp_path / "bank").rglob("*.pt"))
    Trainer(banked_config, tmp_path / "again").fit()
    assert sorted((tmp_path / "bank").rglob("*.pt")) == files


def _wait_for_epochs(path: Path, count: int, process, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {process.communicate()}")
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"no {count} epochs logged in {timeout} s")


def test_sigterm_saves_the_run_as_interrupted_and_it_resumes(tmp_path):
    """`kill` (or a scheduler's preemption) must not leave a run marked 'running' or lose it."""
    import signal

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(train={**recipe().to_dict()["train"], "epochs": 150}).to_dict()))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.Popen(
        [sys.executable, "-m", "kdforge", "train", str(path), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    _wait_for_epochs(out / "metrics.jsonl", 2, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "resume with --resume" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 2 <= summary["epochs_done"] < 150
    result = run_cli("train", str(path), "--out", str(out), "--resume")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_done"] == 150
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(150))

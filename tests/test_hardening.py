"""Bad input gets one clear line: run names, seeds, unsafe and non-finite checkpoints."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdforge.config import build_config
from kdforge.core.checkpoint import read_model_file
from kdforge.core.errors import CheckpointError, ConfigError

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.parametrize(
    "name, problem",
    [
        ("../../x", "plain label"),
        ("/etc/cron.d/x", "plain label"),
        ("a/b", "plain label"),
        ("..", "plain label"),
        (".", "plain label"),
        ("", "at least 1 character"),
        ("   ", "plain label"),
        ("x" * 300, "at most 120"),
        ("nul\x00byte", "plain label"),
        ("new\nline", "plain label"),
        ("back\\slash", "plain label"),
    ],
)
def test_unsafe_run_names_are_refused(name, problem):
    with pytest.raises(ConfigError, match=problem) as caught:
        build_config({"name": name, "data": {"name": "digits"}, "student": {"name": "mlp"}})
    assert "\n" not in str(caught.value).replace(repr(name), "")


@pytest.mark.parametrize("name", ["run", "kd (resnet20-resnet8)", "sp_w300", "teacher lenet4", "é-ü 1.5"])
def test_plain_run_names_are_accepted(name):
    assert build_config({"name": name, "data": {"name": "digits"}, "student": {"name": "mlp"}}).name == name


@pytest.mark.parametrize("key", ["seed", "data.seed"])
@pytest.mark.parametrize("value", [-1, 2**32, 2**70])
def test_seeds_are_bounded(key, value):
    with pytest.raises(ConfigError, match="seed"):
        build_config({"data": {"name": "digits"}, "student": {"name": "mlp"}}, [f"{key}={value}"])


def write_model(tmp_path, weights):
    from kdforge.core.checkpoint import model_record
    from kdforge.models import create

    model = create("mlp", num_classes=10, in_channels=1, input_size=(8, 8))
    if weights is not None:
        with torch.no_grad():
            next(model.parameters()).fill_(weights)
    path = tmp_path / "m.pt"
    torch.save(
        model_record(
            model, name="mlp", kwargs={}, num_classes=10, in_channels=1, input_size=(8, 8), dataset={"name": "digits"}
        ),
        path,
    )
    return path


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_when_loading(tmp_path, bad):
    with pytest.raises(CheckpointError, match="non-finite weights"):
        read_model_file(write_model(tmp_path, bad))
    state = tmp_path / "plain.pt"
    torch.save({"w": torch.tensor([1.0, bad])}, state)
    with pytest.raises(CheckpointError, match="non-finite"):
        read_model_file(state)


def test_finite_weights_load(tmp_path):
    assert read_model_file(write_model(tmp_path, 0.5))["model"]["name"] == "mlp"


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_an_unsafe_pickle_is_refused_in_one_line_without_running_code(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run(
        [sys.executable, "-m", "kdforge", "eval", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "refuses to unpickle" in lines[0] and "weights_only=False" not in lines[0]
    assert not (tmp_path / "pwned.txt").exists()


def test_eval_of_a_nan_checkpoint_fails_in_one_line(tmp_path):
    path = write_model(tmp_path, float("nan"))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run(
        [sys.executable, "-m", "kdforge", "eval", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "non-finite weights" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    from kdforge.engine.trainer import Trainer

    config = build_config(
        {"data": {"name": "digits"}, "student": {"name": "mlp"}, "train": {"epochs": 1, "accelerator": "cuda"}}
    )
    with pytest.raises(ConfigError, match="no CUDA GPU.*accelerator: auto"):
        Trainer(config, tmp_path / "run")
    assert build_config({"data": {"name": "digits"}, "student": {"name": "mlp"}}).train.accelerator == "auto"

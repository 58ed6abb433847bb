"""train.loggers with the real libraries, offline: CSV, TensorBoard, W&B (offline mode), MLflow (local store)."""

from __future__ import annotations

import csv
import json
import struct
import sys
from pathlib import Path

import pytest

from kdforge.config import build_config
from kdforge.core.errors import ConfigError
from kdforge.engine.trainer import RunInterrupted, Trainer


def recipe(epochs=3, **train):
    return build_config(
        {
            "name": "logged",
            "data": {"name": "digits", "augment": False, "train_subset": 100},
            "student": {"name": "mlp", "kwargs": {"hidden": [16]}},
            "method": {"name": "ce"},
            "train": {
                "epochs": epochs,
                "batch_size": 25,
                "scheduler": {"name": "constant"},
                "progress": "none",
                **train,
            },
        }
    )


def jsonl(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def csv_rows(run: Path) -> list[dict]:
    with open(run / "csv" / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def tensorboard_scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_csv_and_tensorboard_resume_without_repeating_an_epoch(tmp_path):
    def stop_after_second_epoch(trainer, epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    config = recipe(epochs=4, loggers=["csv", "tensorboard"])
    with pytest.raises(RunInterrupted):
        Trainer(config, tmp_path, callbacks=[stop_after_second_epoch]).fit()
    assert [int(r["step"]) for r in csv_rows(tmp_path)] == [0, 1]
    Trainer(config, tmp_path, resume=True).fit()

    records = jsonl(tmp_path)
    rows = csv_rows(tmp_path)
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]  # each epoch once after the resume
    for row, record in zip(rows, records):
        assert float(row["train/loss"]) == pytest.approx(record["train"]["loss"])
        assert float(row["test/top1"]) == pytest.approx(record["test"]["top1"])
    assert float(rows[0]["lr/main"]) == pytest.approx(records[0]["lr"]["main"])
    assert (tmp_path / "csv" / "hparams.yaml").read_text().count("mlp") >= 1

    scalars = tensorboard_scalars(tmp_path, "train/loss")
    assert [step for step, _ in scalars] == [0, 1, 2, 3]
    assert [v for _, v in scalars] == pytest.approx([r["train"]["loss"] for r in records], rel=1e-6)


def test_deprecated_tensorboard_flag_still_writes_events(tmp_path):
    Trainer(recipe(epochs=2, tensorboard=True), tmp_path).fit()
    top1 = tensorboard_scalars(tmp_path, "test/top1")
    assert [step for step, _ in top1] == [0, 1]
    assert [v for _, v in top1] == pytest.approx([r["test"]["top1"] for r in jsonl(tmp_path)], rel=1e-6)


def _wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (LevelDB log format: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        space = 32768 - pos % 32768
        if space < 7:  # block trailer
            pos += space
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full or last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_and_mlflow_local_store_receive_metrics_and_recipe(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = (tmp_path / "store").as_uri()
    run = tmp_path / "run"
    config = recipe(
        epochs=2,
        loggers=["wandb", "mlflow"],
        logger_options={"wandb": {"project": "kdforge-test"}, "mlflow": {"tracking_uri": store}},
    )
    Trainer(config, run).fit()
    records = jsonl(run)
    ids = json.loads((run / "loggers.json").read_text())

    # W&B: the offline run's file holds the recipe and one history row per epoch
    (run_file,) = (run / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb")
    history, config_keys = [], set()
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "config":
            config_keys |= {item.key for item in record.config.update}
    rows = [h for h in history if "train/loss" in h]
    assert [r["train/loss"] for r in rows] == pytest.approx([r["train"]["loss"] for r in records])
    assert [r["test/top1"] for r in rows] == pytest.approx([r["test"]["top1"] for r in records])
    assert {"train", "method", "student"} <= config_keys

    # MLflow: read back through the client from the local store
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    mlrun = client.get_run(ids["mlflow"])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.info.run_name == "logged"
    assert mlrun.data.params["train/epochs"] == "2"
    history = client.get_metric_history(ids["mlflow"], "test/top1")
    assert [m.step for m in history] == [r["epoch"] for r in records]
    assert [m.value for m in history] == pytest.approx([r["test"]["top1"] for r in records])


def test_mlflow_resume_continues_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def stop_after_first_epoch(trainer, epoch, record):
        if epoch == 0:
            raise KeyboardInterrupt

    config = recipe(epochs=3, loggers=["mlflow"])  # default store: mlruns/ in the run directory
    with pytest.raises(RunInterrupted):
        Trainer(config, tmp_path, callbacks=[stop_after_first_epoch]).fit()
    first = json.loads((tmp_path / "loggers.json").read_text())["mlflow"]
    Trainer(config, tmp_path, resume=True).fit()
    assert json.loads((tmp_path / "loggers.json").read_text())["mlflow"] == first

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    steps = [m.step for m in client.get_metric_history(first, "train/loss")]
    assert sorted(steps) == [0, 1, 2]
    assert client.get_run(first).info.status == "FINISHED"


def test_logger_settings_are_checked(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="train.loggers"):
        recipe(loggers=["csv", "neptune"])
    with pytest.raises(ConfigError, match="repeated"):
        recipe(loggers=["csv", "csv"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r'pip install "kdforge\[wandb\]"') as caught:
        Trainer(recipe(epochs=1, loggers=["wandb"]), tmp_path / "a").fit()
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="train.logger_options.csv"):
        Trainer(recipe(epochs=1, loggers=["csv"], logger_options={"csv": {"colour": "red"}}), tmp_path / "b").fit()


def test_a_stale_process_wide_rank_does_not_silence_the_loggers(tmp_path):
    """Lightning's rank-0-only switch is process-wide; a Fabric built earlier in this process for
    another rank (a simulated cluster, a notebook) must not leave this run's loggers mute."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    before = getattr(rank_zero_only, "rank", 0)
    rank_zero_only.rank = 3  # type: ignore[attr-defined]
    try:
        Trainer(recipe(epochs=2, loggers=["csv"]), tmp_path).fit()
    finally:
        rank_zero_only.rank = before  # type: ignore[attr-defined]
    assert len(csv_rows(tmp_path)) == 2

"""Experiment tracking: each epoch's metrics (the metrics.jsonl line) and the recipe, sent to
Lightning's loggers (CSV, TensorBoard, Weights & Biases, MLflow) on rank 0.

A recipe lists the trackers in ``train.loggers`` and may pass each one keyword arguments in
``train.logger_options``::

    train:
      loggers: [csv, tensorboard, wandb, mlflow]
      logger_options:
        wandb: {project: my-project, entity: my-team}
        mlflow: {tracking_uri: "http://mlflow.example.org:5000", experiment_name: kd}

By default every logger writes under the run directory (``csv/``, ``tensorboard/``, ``wandb/``,
``mlruns/``). The loggers are Lightning's classes (``lightning.pytorch.loggers``, which Lightning
Fabric accepts too); the options are their constructor arguments.

Resuming (``--resume``) continues the same tracker runs: the CSV file is rewritten from the saved
history (so no epoch appears twice), TensorBoard purges the events of epochs that are logged again,
and the W&B and MLflow run ids are kept in ``loggers.json`` in the run directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any

from kdforge.core.errors import ConfigError

#: logger -> (module it needs, pip extra that installs it)
REQUIREMENTS = {
    "csv": (None, None),
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
STATE_FILE = "loggers.json"


def flatten_metrics(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"train": {"loss": 1.0}, "lr": {"student": 0.1}}`` -> ``{"train/loss": 1.0, "lr/student": 0.1}``
    (numbers only; the epoch is the step, not a metric)."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name != "epoch":
            flat[name] = float(value)
    return flat


def check_installed(names: list[str]) -> None:
    """One line per missing package, naming the extra that installs it."""
    for name in names:
        module, extra = REQUIREMENTS[name]
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"train.loggers has '{name}', which needs the {module} package: pip install \"kdforge[{extra}]\""
            )


class ExperimentLoggers:
    """The run's trackers. Call :meth:`start` once (after the saved state is loaded), :meth:`log_epoch`
    after each epoch's state is saved, :meth:`close` at the end. Used on rank 0 only."""

    def __init__(
        self,
        names: list[str],
        options: dict[str, dict[str, Any]],
        out_dir: Path,
        run_name: str,
        hyperparameters: dict[str, Any],
    ) -> None:
        check_installed(names)
        self.names = names
        self.options = options
        self.out_dir = Path(out_dir)
        self.run_name = run_name
        self.hyperparameters = hyperparameters
        self.loggers: dict[str, Any] = {}

    def start(self, history: list[dict[str, Any]]) -> None:
        """Create the loggers, log the recipe; a resumed run's CSV is rewritten from ``history``."""
        saved = self._saved_ids()
        start_epoch = len(history)
        with warnings.catch_warnings():  # Lightning warns that a resumed run's CSV is rewritten: intended
            warnings.filterwarnings("ignore", message="Experiment logs directory")
            self._create(saved, start_epoch, history)
        ids = {name: str(self.loggers[name].version) for name in ("wandb", "mlflow") if name in self.loggers}
        if ids:
            (self.out_dir / STATE_FILE).write_text(json.dumps({**saved, **ids}, indent=2) + "\n")

    def _create(self, saved: dict[str, str], start_epoch: int, history: list[dict[str, Any]]) -> None:
        for name in self.names:
            options = dict(self.options.get(name) or {})
            try:
                logger = getattr(self, f"_{name}")(options, saved.get(name), start_epoch)
            except TypeError as exc:  # an option the logger class does not take
                raise ConfigError(f"bad value for 'train.logger_options.{name}': {exc}") from None
            self.loggers[name] = logger
        for logger in self.loggers.values():
            logger.log_hyperparams(self.hyperparameters)
        if "csv" in self.loggers and history:  # its file was recreated: the saved epochs first, once each
            csv = self.loggers["csv"]
            for record in history:
                csv.log_metrics(flatten_metrics(record), step=int(record["epoch"]))
            csv.save()

    def log_epoch(self, record: dict[str, Any]) -> None:
        metrics = flatten_metrics(record)
        for logger in self.loggers.values():
            logger.log_metrics(metrics, step=int(record["epoch"]))
            logger.save()

    def close(self, status: str) -> None:
        """``status`` is the run's: finished or interrupted."""
        for name, logger in self.loggers.items():
            if name == "mlflow":
                logger.finalize("success" if status == "finished" else "KILLED")
            elif name == "wandb":
                logger.finalize("success")
                logger.experiment.finish(exit_code=0 if status == "finished" else 1)
            else:
                logger.finalize("success")
        self.loggers = {}

    # ------------------------------------------------------------------ the loggers
    def _saved_ids(self) -> dict[str, str]:
        path = self.out_dir / STATE_FILE
        if not path.is_file():
            return {}
        try:
            return {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, AttributeError):
            return {}

    def _csv(self, options: dict[str, Any], saved: str | None, start_epoch: int):
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(**{"save_dir": str(self.out_dir), "name": "", "version": "csv", **options})

    def _tensorboard(self, options: dict[str, Any], saved: str | None, start_epoch: int):
        from lightning.pytorch.loggers import TensorBoardLogger

        defaults: dict[str, Any] = {
            "save_dir": str(self.out_dir),
            "name": "",
            "version": "tensorboard",
            "default_hp_metric": False,
        }
        if start_epoch:  # events of epochs at or after the resumed one are hidden (they are logged again)
            defaults["purge_step"] = start_epoch
        return TensorBoardLogger(**{**defaults, **options})

    def _wandb(self, options: dict[str, Any], saved: str | None, start_epoch: int):
        from lightning.pytorch.loggers import WandbLogger

        defaults: dict[str, Any] = {"save_dir": str(self.out_dir), "project": "kdforge", "name": self.run_name}
        if saved:
            defaults.update(id=saved, resume="allow")
        logger = WandbLogger(**{**defaults, **options})
        logger.experiment  # noqa: B018 - starts the W&B run now, so its id is known
        return logger

    def _mlflow(self, options: dict[str, Any], saved: str | None, start_epoch: int):
        from lightning.pytorch.loggers import MLFlowLogger

        uri = options.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (self.out_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps its local file store in maintenance mode behind this switch; a local
            # folder is what a run without a tracking server writes to
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        defaults: dict[str, Any] = {"experiment_name": "kdforge", "run_name": self.run_name, "tracking_uri": uri}
        if saved:
            defaults["run_id"] = saved
        logger = MLFlowLogger(**{**defaults, **options, "tracking_uri": uri})
        logger.experiment  # noqa: B018 - creates the MLflow run now, so its id is known
        return logger

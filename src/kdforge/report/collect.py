"""Find run directories and read each into a typed :class:`RunResult`.

A run directory is a folder holding ``summary.json`` (see ``kdforge.engine.trainer``). Every path
given to :func:`collect` is either such a folder or a folder searched recursively for them. Runs
whose status is not ``finished`` are not results: they are returned separately so the report can
list them instead of silently averaging half-trained networks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdforge.core.checkpoint import read_model_file
from kdforge.core.errors import KDForgeError

UNKNOWN = "?"

#: the primary metric of each task, as summary.json's "best" entry names it
PRIMARY = {"classification": "top1", "regression": "mae"}
#: metrics where a smaller value is the better one (errors)
LOWER_IS_BETTER = frozenset({"mae", "rmse"})

# Keys of the resolved recipe that do not change what is trained (where files live, how progress
# is shown). They are dropped before hashing so the same recipe run from two folders or machines
# still forms one group. Teacher checkpoint paths are replaced by what they point at.
# keys that do not change what a run learns (where it runs, how often it is evaluated and logged,
# which code was imported to find its method and model: those are named in the recipe itself)
_IGNORED_KEYS: dict[str, tuple[str, ...]] = {
    "": ("name", "seed", "imports"),
    "data": ("root", "download"),
    "train": (
        "progress",
        "tensorboard",
        "loggers",
        "logger_options",
        "accelerator",
        "num_threads",
        "eval_every",
        "eval_batch_size",
    ),
    "teacher_bank": ("directory",),
}


@dataclass(frozen=True)
class SkippedRun:
    """A run directory that is not part of the results, and why."""

    path: Path
    name: str
    reason: str  # "running (3/10 epochs)", "interrupted (...)", "unreadable summary.json: ..."

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


@dataclass
class RunResult:
    """One finished run, flattened to what a report needs."""

    path: Path
    name: str
    method: str
    dataset: str
    student: str
    teachers: tuple[str, ...]  # architectures, like student_arch ("?" where unknown)
    seed: int | None
    epochs: int | None
    final_epoch: int | None
    final_top1: float | None
    final_top5: float | None
    best_epoch: int | None
    best_top1: float | None  # test top-1 at the best epoch
    best_selection_top1: float | None  # top-1 on the selection split at the best epoch
    selection_split: str  # "test" or "val": the split the best epoch was chosen on
    student_parameters: int | None
    extra_parameters: int | None
    seconds_per_batch: float | None
    train_seconds: float | None
    wall_seconds: float | None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, test primary metric)
    record: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    # What identifies the setting, computed from the resolved recipe (see setting_of()).
    student_arch: str = ""  # zoo name plus constructor arguments, e.g. "mlp(hidden=[64])"
    config_hash: str = ""  # hash of the recipe without seed, name and local paths
    data_hash: str = ""  # hash of the data section alone (without root/download)
    train_hash: str = ""  # hash of the train section alone (without progress/tensorboard)
    train_subset: int | None = None
    batch_size: int | None = None
    reference_dataset: str = ""  # the dataset as a published table names it ("cifar100")
    # The task the run was scored on and its primary metric (kdforge.data.tasks): "top1" for
    # classification (higher is better), "mae" for regression (lower is better). ``final_score``,
    # ``best_score`` and ``best_selection_score`` hold that metric; the *_top1 fields stay None
    # for a regression run.
    task: str = "classification"
    primary: str = "top1"
    final_score: float | None = None
    best_score: float | None = None
    best_selection_score: float | None = None
    final_rmse: float | None = None  # regression only

    @property
    def lower_is_better(self) -> bool:
        return self.primary in LOWER_IS_BETTER

    @property
    def group_key(self) -> tuple[str, str, str, tuple[str, ...], str]:
        """Runs with equal keys differ only by seed: (dataset, method, student, teachers, hash)."""
        return (self.dataset, self.method, self.student_arch, self.teachers, self.config_hash)

    @property
    def device(self) -> str:
        return str(self.record.get("device") or UNKNOWN)


# --------------------------------------------------------------------------- finding runs
def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every run directory at or below ``paths`` (sorted, each once). Missing paths are an error."""
    found: dict[Path, None] = {}
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            raise KDForgeError(f"'{root}' does not exist; give run directories or folders holding them")
        if (root / "summary.json").is_file():
            found.setdefault(root.resolve(), None)
            continue
        if not root.is_dir():
            raise KDForgeError(f"'{root}' is not a folder; give run directories or folders holding them")
        for current, dirs, files in os.walk(root):
            if "summary.json" in files:
                found.setdefault(Path(current).resolve(), None)
                dirs[:] = []  # a run directory holds no other runs (only checkpoints/, tensorboard/)
                continue
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


def collect(paths: Iterable[str | os.PathLike]) -> list[RunResult]:
    """The finished runs at or below ``paths``; see :func:`collect_all` for the skipped ones too."""
    return collect_all(paths)[0]


def collect_all(paths: Iterable[str | os.PathLike]) -> tuple[list[RunResult], list[SkippedRun]]:
    """Finished runs, and the run directories left out (unfinished or unreadable), both sorted."""
    resolver = TeacherResolver()
    results: list[RunResult] = []
    skipped: list[SkippedRun] = []
    for run_dir in find_run_dirs(paths):
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            skipped.append(SkippedRun(run_dir, run_dir.name, f"unreadable summary.json: {exc}"))
            continue
        status = summary.get("status", UNKNOWN)
        name = str(summary.get("name") or run_dir.name)
        if status != "finished":
            done, total = summary.get("epochs_done"), summary.get("epochs")
            skipped.append(SkippedRun(run_dir, name, f"{status}, {done}/{total} epochs"))
            continue
        results.append(read_run(run_dir, summary, resolver))
    return results, skipped


# --------------------------------------------------------------------------- reading one run
def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN reads as missing


def _integer(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None


def _read_config(run_dir: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _read_curve(run_dir: Path, metric: str = "top1") -> list[tuple[int, float]]:
    """(epoch, test ``metric``) for every logged epoch that was evaluated; bad lines are skipped."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    curve = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        test = record.get("test") if isinstance(record, dict) else None
        epoch = _integer(record.get("epoch")) if isinstance(record, dict) else None
        value = _number(test.get(metric)) if isinstance(test, dict) else None
        if epoch is not None and value is not None:
            curve.append((epoch, value))
    return sorted(dict(curve).items())


def read_run(run_dir: Path, summary: dict[str, Any], resolver: TeacherResolver | None = None) -> RunResult:
    """A RunResult from a run directory's summary.json (already parsed), config.yaml and metrics."""
    resolver = resolver or TeacherResolver()
    config = _read_config(run_dir)
    final = summary.get("final") or {}
    final_test = final.get("test") or {}
    best = summary.get("best") or {}
    best_test = best.get("test") or {}
    split = str(best.get("split") or summary.get("selection_split") or "test")
    setting = setting_of(config, summary, run_dir, resolver)
    task = str(summary.get("task") or "classification")
    primary = str(best.get("metric") or PRIMARY.get(task, "top1"))
    return RunResult(
        path=run_dir,
        name=str(summary.get("name") or config.get("name") or run_dir.name),
        method=str(summary.get("method") or (config.get("method") or {}).get("name") or UNKNOWN),
        dataset=str(summary.get("dataset") or (config.get("data") or {}).get("name") or UNKNOWN),
        student=str(summary.get("student") or (config.get("student") or {}).get("name") or UNKNOWN),
        teachers=setting["teachers"],
        seed=_integer(summary.get("seed", config.get("seed"))),
        epochs=_integer(summary.get("epochs")),
        final_epoch=_integer(final.get("epoch")),
        final_top1=_number(final_test.get("top1")),
        final_top5=_number(final_test.get("top5")),
        best_epoch=_integer(best.get("epoch")),
        best_top1=_number(best_test.get("top1")),
        best_selection_top1=_number(best.get("top1")),
        selection_split=split,
        student_parameters=_integer(summary.get("student_parameters")),
        extra_parameters=_integer(summary.get("extra_parameters")),
        seconds_per_batch=_number(summary.get("seconds_per_batch")),
        train_seconds=_number(summary.get("train_seconds")),
        wall_seconds=_number(summary.get("wall_seconds")),
        curve=_read_curve(run_dir, primary),
        record=dict(summary.get("record") or {}),
        config=config,
        student_arch=setting["student_arch"],
        config_hash=setting["config_hash"],
        data_hash=setting["data_hash"],
        train_hash=setting["train_hash"],
        train_subset=setting["train_subset"],
        batch_size=setting["batch_size"],
        reference_dataset=setting["reference_dataset"],
        task=task,
        primary=primary,
        final_score=_number(final_test.get(primary)),
        best_score=_number(best_test.get(primary)),
        best_selection_score=_number(best.get(primary)),
        final_rmse=_number(final_test.get("rmse")),
    )


# --------------------------------------------------------------------------- settings
def short_hash(value: Any, length: int = 8) -> str:
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def architecture(name: str | None, kwargs: dict[str, Any] | None) -> str:
    """``resnet20`` or ``mlp(hidden=[64])``: a zoo name with its constructor arguments."""
    name = name or UNKNOWN
    if not kwargs:
        return name
    shown = ", ".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in sorted(kwargs.items()))
    return f"{name}({shown})"


def _without(section: Any, keys: tuple[str, ...]) -> Any:
    if not isinstance(section, dict):
        return section
    return {k: v for k, v in section.items() if k not in keys}


def setting_of(
    config: dict[str, Any], summary: dict[str, Any], run_dir: Path, resolver: TeacherResolver, depth: int = 0
) -> dict[str, Any]:
    """What identifies a run's setting apart from its seed, from its resolved recipe.

    Teachers given only as a checkpoint are named by the architecture stored in the checkpoint
    (or in the teacher run's summary), and identified by the teacher run's own setting when its
    run directory is found, so seed-varied teachers of a seed-varied pipeline still match.
    """
    if not config:  # no config.yaml: fall back on what summary.json says (coarser groups)
        teachers = tuple(str(t) or UNKNOWN for t in summary.get("teachers") or ())
        basis = {key: summary.get(key) for key in ("method", "dataset", "student", "epochs")}
        basis["teachers"] = teachers
        return {
            "teachers": teachers,
            "student_arch": str(summary.get("student") or UNKNOWN),
            "config_hash": short_hash({"summary-only": basis}),
            "data_hash": short_hash({"dataset": summary.get("dataset")}),
            "train_hash": short_hash({"epochs": summary.get("epochs")}),
            "train_subset": None,
            "batch_size": None,
            "reference_dataset": str(summary.get("dataset") or UNKNOWN),
        }
    normalized = _without(config, _IGNORED_KEYS[""])
    for section in ("data", "train", "teacher_bank"):
        if section in normalized:
            normalized[section] = _without(normalized[section], _IGNORED_KEYS[section])
    student_cfg = config.get("student") or {}
    student_name = student_cfg.get("name") or summary.get("student")
    student_kwargs = dict(student_cfg.get("kwargs") or {})
    if student_cfg.get("checkpoint"):
        saved = resolver.model_of(student_cfg["checkpoint"], run_dir)
        student_name = student_name or saved.get("name")
        student_kwargs = {**(saved.get("kwargs") or {}), **student_kwargs}
    # Everything else that shapes the student (LMA activations, pruning, QAT, ...) stays in the
    # setting: a ReLU and an LMA student of one architecture are different groups.
    variants = {k: v for k, v in student_cfg.items() if k not in ("name", "kwargs", "checkpoint") and v}
    normalized["student"] = {
        "name": student_name,
        "kwargs": student_kwargs,
        "initialised_from_checkpoint": bool(student_cfg.get("checkpoint")),
        **variants,
    }
    teachers, teacher_ids = [], []
    for entry in config.get("teachers") or []:
        entry = entry or {}
        saved = resolver.model_of(entry["checkpoint"], run_dir) if entry.get("checkpoint") else {}
        name = entry.get("name") or saved.get("name") or UNKNOWN
        kwargs = {**(saved.get("kwargs") or {}), **(entry.get("kwargs") or {})}
        teachers.append(architecture(str(name), kwargs))
        teacher_ids.append(
            {
                "name": name,
                "kwargs": kwargs,
                "run": resolver.setting_hash(entry["checkpoint"], run_dir, depth) if entry.get("checkpoint") else None,
            }
        )
    normalized["teachers"] = teacher_ids
    data = config.get("data") or {}
    options = data.get("options") or {}
    reference_dataset = str(summary.get("dataset") or data.get("name") or UNKNOWN)
    if reference_dataset == "cifar100" and options.get("label_type", "fine") != "fine":
        reference_dataset = f"cifar100-{options['label_type']}"
    train = config.get("train") or {}
    return {
        "teachers": tuple(teachers),
        "student_arch": architecture(student_name, student_kwargs)
        + "".join(
            f"+{key}" + (f"(k={value['k']})" if key == "lma" and isinstance(value, dict) and "k" in value else "")
            for key, value in sorted(variants.items())
        ),
        "config_hash": short_hash(normalized),
        "data_hash": short_hash(normalized.get("data")),
        "train_hash": short_hash(normalized.get("train")),
        "train_subset": _integer(data.get("train_subset")),
        "batch_size": _integer(train.get("batch_size")),
        "reference_dataset": reference_dataset,
    }


class TeacherResolver:
    """Finds what a checkpoint path in a recipe points at, reading each file once.

    Recipe paths are relative to the folder training was started from, which the report does not
    know; they are tried as given, then against every ancestor of the run directory, then as a
    sibling run directory of the same name (pipelines and suites lay stages side by side).
    """

    def __init__(self) -> None:
        self._models: dict[str, dict[str, Any]] = {}
        self._settings: dict[str, str | None] = {}

    def locate(self, checkpoint: str, run_dir: Path) -> Path | None:
        path = Path(checkpoint).expanduser()
        candidates = [path] if path.is_absolute() else [path, *(parent / path for parent in run_dir.parents)]
        if len(path.parts) >= 3 and path.parent.name == "checkpoints":
            candidates.append(run_dir.parent / path.parent.parent.name / "checkpoints" / path.name)
        for candidate in candidates:
            if candidate.is_file():
                return candidate.resolve()
        # the file itself may be gone while its run directory (summary.json) is still there
        for candidate in candidates:
            if candidate.parent.name == "checkpoints" and (candidate.parent.parent / "summary.json").is_file():
                return candidate.resolve()
        return None

    def model_of(self, checkpoint: str, run_dir: Path) -> dict[str, Any]:
        """``{"name": ..., "kwargs": ...}`` of the network in ``checkpoint``; empty when unknown."""
        path = self.locate(checkpoint, run_dir)
        if path is None:
            return {}
        key = str(path)
        if key not in self._models:
            self._models[key] = self._read_model(path)
        return self._models[key]

    @staticmethod
    def _read_model(path: Path) -> dict[str, Any]:
        summary_path = path.parent.parent / "summary.json" if path.parent.name == "checkpoints" else None
        if path.is_file():
            try:
                model = read_model_file(path).get("model") or {}
                if model.get("name"):
                    return {"name": model["name"], "kwargs": dict(model.get("kwargs") or {})}
            except Exception:  # noqa: BLE001 - an unreadable file only costs the name
                pass
        if summary_path is not None and summary_path.is_file():
            try:
                summary = json.loads(summary_path.read_text())
                config = _read_config(summary_path.parent)
                kwargs = (config.get("student") or {}).get("kwargs") or {}
                if summary.get("student"):
                    return {"name": summary["student"], "kwargs": dict(kwargs)}
            except (OSError, ValueError, AttributeError):
                pass
        return {}

    def setting_hash(self, checkpoint: str, run_dir: Path, depth: int) -> str | None:
        """The setting hash of the run that produced ``checkpoint`` (None if it is not a run's file)."""
        path = self.locate(checkpoint, run_dir)
        if path is None or path.parent.name != "checkpoints" or depth > 4:
            return None
        teacher_dir = path.parent.parent
        key = str(teacher_dir)
        if key not in self._settings:
            self._settings[key] = None
            try:
                summary = json.loads((teacher_dir / "summary.json").read_text())
            except (OSError, ValueError):
                summary = None
            config = _read_config(teacher_dir)
            if isinstance(summary, dict) and config:
                self._settings[key] = setting_of(config, summary, teacher_dir, self, depth + 1)["config_hash"]
        return self._settings[key]


_SEED_SUFFIX = re.compile(r"(?:[-_.]+(?:seed|s)?[-_]?|seed[-_]?)(\d+)$")


def strip_seed(name: str, seed: int | None) -> str:
    """``kd-seed3`` -> ``kd`` when the run's seed is 3; names without such a suffix are kept."""
    match = _SEED_SUFFIX.search(name)
    if match and seed is not None and int(match.group(1)) == seed and match.start() > 0:
        return name[: match.start()]
    return name

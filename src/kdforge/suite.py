"""Suites: a grid of runs (methods x teacher/student pairs x seeds) described once, run reproducibly.

A suite file::

    name: digits-smoke
    seeds: [0, 1, 2]
    base:                       # the recipe every run starts from (may use `base: file.yaml`)
      data: {name: digits, augment: false, train_subset: 300}
      train: {epochs: 100, batch_size: 64, optimizer: {name: sgd, lr: 0.05}}
    teachers:                   # trained once by the suite, or an existing model file
      lenet4: {recipe: {data: {name: digits}, student: {name: lenet}, method: {name: ce}, train: {...}}}
      resnet20: {checkpoint: benchmarks/teachers/cifar10_resnet20.pt}
      assistant: {recipe: {..., method: {name: kd}, teachers: [resnet20]}}   # names earlier teachers
    pairs:
      - {teacher: lenet4, student: {name: mlp, kwargs: {hidden: [64]}}}
    methods:                    # label -> partial recipe merged onto base + pair
      student_alone: {method: {name: ce}}
      kd: {method: {name: kd, temperature: 4}}
      ensemble: {method: {name: ensemble_kd}, teachers: [lenet4, lenet4_b]}
    teacher_bank: true          # replay stored teacher outputs in every run that has teachers

Each run is an ordinary run directory, ``OUT/<pair>/<method>/seed<k>``; teachers train into
``OUT/teachers/<label>``. Finished runs are skipped and interrupted ones resumed, so running a
suite again continues it. ``jobs`` runs several at once as separate processes, splitting the cores.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdforge.config import build_config, deep_merge, read_yaml, rebase_data_spec, rebase_imports
from kdforge.core.errors import ConfigError, closest
from kdforge.core.plugins import import_all
from kdforge.core.runlock import RunLock
from kdforge.core.signals import PARENT_ENV
from kdforge.core.storage import ensure_writable_dir
from kdforge.core.validation import validation_message
from kdforge.models.specs import rebase_spec


class TeacherSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipe: dict[str, Any] | None = None
    checkpoint: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSpec:
        if (self.recipe is None) == (self.checkpoint is None):
            raise ValueError("a teacher needs exactly one of 'recipe' (train it) or 'checkpoint' (a model file)")
        return self


class PairSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: str | None = None
    student: dict[str, Any]
    label: str | None = None


class SuiteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    seeds: list[int] = Field(default_factory=lambda: [0])
    base: dict[str, Any] = Field(default_factory=dict)
    teachers: dict[str, TeacherSpec] = Field(default_factory=dict)
    pairs: list[PairSpec]
    methods: dict[str, dict[str, Any]]
    teacher_bank: bool = False
    #: modules or .py files (relative to the suite file) with the user's models and methods,
    #: imported before planning and added to every run's recipe
    imports: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _teachers_exist(self) -> SuiteSpec:
        for pair in self.pairs:
            if pair.teacher is not None and pair.teacher not in self.teachers:
                raise ValueError(
                    f"pair teacher '{pair.teacher}' is not defined under 'teachers'{closest(pair.teacher, self.teachers)}"  # noqa: E501
                )
        return self


@dataclass
class PlannedRun:
    """One run of the suite: where it goes and the recipe it trains."""

    label: str
    out: Path
    recipe: dict[str, Any]
    is_teacher: bool = False
    depends_on: list[str] = field(default_factory=list)

    def status(self) -> str:
        summary = self.out / "summary.json"
        if summary.is_file():
            try:
                return json.loads(summary.read_text()).get("status", "unknown")
            except json.JSONDecodeError:
                return "unknown"
        return "interrupted" if (self.out / "checkpoints" / "state.pt").exists() else "pending"

    def failure(self) -> str:
        """The cause a failed run recorded in its summary.json."""
        try:
            return str(json.loads((self.out / "summary.json").read_text()).get("error") or "no cause recorded")
        except (OSError, json.JSONDecodeError):
            return "no cause recorded"


def load_suite(path: str | Path) -> tuple[SuiteSpec, Path]:
    path = Path(path)
    data = read_yaml(path)
    try:
        return SuiteSpec.model_validate(data), path.parent
    except ValidationError as exc:
        raise ConfigError(f"suite '{path}': {validation_message(exc, SuiteSpec)}") from None


def _resolve_base(recipe: dict[str, Any], folder: Path) -> dict[str, Any]:
    recipe = dict(recipe)
    base = recipe.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"'base' must be the path of a recipe, got {base!r}")
    merged = deep_merge(read_yaml(folder / base), recipe) if base else recipe
    rebase_imports(merged, folder)
    rebase_data_spec(merged, folder)  # data.name 'file.py:function' beside the suite
    return merged


def _student_label(student: dict[str, Any]) -> str:
    name = student.get("name", "student")
    hidden = student.get("kwargs", {}).get("hidden")
    return f"{name}{'-'.join(map(str, hidden))}" if hidden else name


def plan(spec: SuiteSpec, folder: Path, out: Path) -> list[PlannedRun]:
    """Expand the suite into runs: teachers first, then seeds x pairs x methods."""
    from kdforge.methods import METHODS

    imports_holder: dict[str, Any] = {"imports": list(spec.imports)}
    rebase_imports(imports_holder, folder)
    suite_imports: list[str] = imports_holder["imports"]
    import_all(suite_imports)  # the user's methods and models must be registered before planning
    runs: list[PlannedRun] = []
    teacher_files: dict[str, str] = {}
    for label, teacher in spec.teachers.items():
        if teacher.checkpoint is not None:
            file = Path(teacher.checkpoint)
            teacher_files[label] = str(file if file.is_absolute() else (folder / file).resolve())
        else:
            teacher_files[label] = str((out / "teachers" / label / "checkpoints" / "model_last.pt").resolve())
    for label, teacher in spec.teachers.items():
        if teacher.recipe is None:
            continue
        recipe = _resolve_base(teacher.recipe, folder)
        recipe.setdefault("name", f"teacher {label}")
        if suite_imports:
            recipe["imports"] = suite_imports + [i for i in recipe.get("imports", []) if i not in suite_imports]
        # a teacher distilled from other suite teachers (a teacher assistant) names them by label
        depends_on = []
        resolved_teachers = []
        for entry in recipe.get("teachers") or []:
            if isinstance(entry, str):
                if entry not in teacher_files or entry == label:
                    raise ConfigError(
                        f"teacher '{label}' is distilled from '{entry}', which is not another teacher of "
                        f"this suite{closest(entry, teacher_files)}"
                    )
                if spec.teachers[entry].recipe is not None:
                    depends_on.append(f"teachers/{entry}")
                entry = {"checkpoint": teacher_files[entry]}
            resolved_teachers.append(entry)
        if resolved_teachers:
            recipe["teachers"] = resolved_teachers
        runs.append(
            PlannedRun(f"teachers/{label}", out / "teachers" / label, recipe, is_teacher=True, depends_on=depends_on)
        )

    base = _resolve_base(spec.base, folder)
    for pair in spec.pairs:
        pair_label = pair.label or f"{pair.teacher or 'none'}-{_student_label(pair.student)}"
        for method_label, partial in spec.methods.items():
            partial = copy.deepcopy(partial)
            import_all(deep_merge(base, partial).get("imports"))
            method = partial.get("method", {}).get("name", "ce")
            needs_teacher = METHODS.get(method).teachers_required[0] > 0
            teacher_labels = partial.pop("teachers", None)
            if teacher_labels is None:
                teacher_labels = [pair.teacher] if needs_teacher and pair.teacher else []
            for teacher_label in teacher_labels:
                if teacher_label not in teacher_files:
                    raise ConfigError(
                        f"method '{method_label}' names teacher '{teacher_label}', which the suite does not define"
                    )
            if needs_teacher and not teacher_labels:
                raise ConfigError(f"method '{method_label}' needs a teacher but pair '{pair_label}' has none")
            for seed in spec.seeds:
                recipe = deep_merge(base, partial)
                recipe["student"] = copy.deepcopy(pair.student)
                if isinstance(recipe["student"].get("name"), str):  # a file or hf: folder spec, relative to the suite
                    recipe["student"]["name"] = rebase_spec(recipe["student"]["name"], folder)
                recipe["teachers"] = [{"checkpoint": teacher_files[t]} for t in teacher_labels]
                recipe["seed"] = seed
                recipe["name"] = f"{method_label} ({pair_label})"
                if suite_imports:
                    recipe["imports"] = suite_imports + [i for i in recipe.get("imports", []) if i not in suite_imports]
                if spec.teacher_bank and teacher_labels:
                    recipe.setdefault("teacher_bank", {})["enabled"] = True
                runs.append(
                    PlannedRun(
                        f"{pair_label}/{method_label}/seed{seed}",
                        out / pair_label / method_label / f"seed{seed}",
                        recipe,
                        depends_on=[f"teachers/{t}" for t in teacher_labels if spec.teachers[t].recipe is not None],
                    )
                )
    # seed-major order: a suite stopped part-way has every method at the first seeds
    order = {seed: i for i, seed in enumerate(spec.seeds)}
    runs.sort(key=lambda r: -1 if r.is_teacher else order[r.recipe["seed"]])
    for run in runs:  # validate every recipe before anything trains
        try:
            build_config(run.recipe)
        except ConfigError as exc:
            raise ConfigError(f"suite run '{run.label}': {exc}") from None
    return runs


def _launch(run: PlannedRun, threads: int, log_dir: Path) -> tuple[PlannedRun, int, float]:
    """Train one run in its own process; returns its exit code and wall time."""
    recipe_file = log_dir / (run.label.replace("/", "__") + ".yaml")
    recipe = copy.deepcopy(run.recipe)
    recipe.setdefault("train", {})["num_threads"] = threads
    recipe["train"]["progress"] = "none"
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    command = [sys.executable, "-m", "kdforge", "train", str(recipe_file), "--out", str(run.out)]
    if run.status() in ("interrupted", "running", "unknown"):
        command.append("--resume")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        PARENT_ENV: str(os.getpid()),  # the run stops if this bench dies, even by kill -9
    }
    started = time.perf_counter()
    with open(log_dir / (run.label.replace("/", "__") + ".log"), "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        with _LIVE_LOCK:
            _LIVE.add(process)
        try:
            code = process.wait()
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(process)
    return run, code, time.perf_counter() - started


# training processes started by a suite, so that an interrupted suite can stop them cleanly
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def _stop_children(echo) -> None:
    """Ask every running training process to stop (SIGTERM: each saves its state as 'interrupted')."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for process in live:
        if process.poll() is None:
            process.terminate()
    for process in live:
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
    if live:
        echo(f"  stopped {len(live)} running training process(es); run the same command again to resume")


def select(spec: SuiteSpec, methods: list[str] | None = None, seeds: list[int] | None = None) -> SuiteSpec:
    """The suite restricted to some method labels and seeds (unknown ones are errors)."""
    if methods:
        unknown = [m for m in methods if m not in spec.methods]
        if unknown:
            raise ConfigError(
                f"suite '{spec.name}' has no method label '{unknown[0]}'{closest(unknown[0], spec.methods)}"
            )
        spec = spec.model_copy(update={"methods": {m: spec.methods[m] for m in methods}})
    if seeds:
        unknown_seeds = [s for s in seeds if s not in spec.seeds]
        if unknown_seeds:
            raise ConfigError(f"suite '{spec.name}' has no seed {unknown_seeds[0]}; its seeds are {spec.seeds}")
        spec = spec.model_copy(update={"seeds": [s for s in spec.seeds if s in seeds]})
    return spec


def run_suite(
    path: str | Path,
    out: str | Path | None = None,
    jobs: int = 1,
    echo=print,
    threads: int | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
) -> dict[str, Any]:
    """Run (or continue) a suite; returns counts and the failed runs.

    ``threads`` (torch threads per run) defaults to the cores divided by ``jobs``; set it lower to
    leave cores free for other work on the machine. ``methods`` and ``seeds`` restrict the suite
    to some of its method labels and seeds (and the teachers those need).
    """
    spec, folder = load_suite(path)
    spec = select(spec, methods, seeds)
    out = Path(out or Path("runs") / "suites" / spec.name)
    runs = plan(spec, folder, out)
    if methods:  # keep only the teachers the selected runs need (directly or through an assistant)
        needed = {d for r in runs if not r.is_teacher for d in r.depends_on}
        by_label = {r.label: r for r in runs}
        frontier = list(needed)
        while frontier:
            for d in by_label[frontier.pop()].depends_on:
                if d not in needed:
                    needed.add(d)
                    frontier.append(d)
        runs = [r for r in runs if not r.is_teacher or r.label in needed]
    ensure_writable_dir(out, "suite folder")
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(out, "suite folder"):  # two benches on one folder would train the same runs twice
        return _run_planned(spec, runs, out, log_dir, jobs, echo, threads)


def _run_planned(spec, runs, out, log_dir, jobs, echo, threads) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    jobs = max(1, min(jobs, cores))
    threads = max(1, threads if threads else cores // jobs)

    pending = [r for r in runs if r.status() != "finished"]
    echo(
        f"suite {spec.name}: {len(runs)} runs ({len(runs) - len(pending)} already finished), "
        f"{jobs} at a time x {threads} threads, into {out}"
    )
    failed: dict[str, int] = {}
    for run in [r for r in pending if r.status() == "failed"]:  # never retried silently
        pending.remove(run)
        failed[run.label] = 1
        echo(f"  FAILED {run.label} (earlier: {run.failure()}); delete '{run.out}' to run it again")
    done: set[str] = {r.label for r in runs if r.status() == "finished"}
    started = time.perf_counter()
    running: dict[Future, PlannedRun] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            _schedule(pool, pending, running, done, failed, jobs, threads, log_dir, echo)
        except KeyboardInterrupt:
            _stop_children(echo)
            raise
    echo(f"suite {spec.name}: {len(done)} finished, {len(failed)} failed, {time.perf_counter() - started:.0f} s")
    return {"out": str(out), "runs": len(runs), "finished": len(done), "failed": failed}


def _schedule(pool, pending, running, done, failed, jobs, threads, log_dir, echo) -> None:
    """Launch runs as their teachers finish, ``jobs`` at a time, until none is left."""
    while pending or running:
        blocked = [r for r in pending if any(d in failed for d in r.depends_on)]
        for run in blocked:
            failed[run.label] = -1
            pending.remove(run)
            echo(f"  skipped {run.label}: its teacher failed")
        ready = [r for r in pending if all(d in done for d in r.depends_on)]
        # teachers first (others may wait on them), then in plan order; keep every job busy
        ready.sort(key=lambda r: not r.is_teacher)
        for run in ready[: jobs - len(running)]:
            pending.remove(run)
            running[pool.submit(_launch, run, threads, log_dir)] = run
        if not running:
            if pending:
                raise ConfigError("suite runs wait on each other in a cycle")
            break
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            running.pop(future)
            run, code, seconds = future.result()
            if code == 0:
                done.add(run.label)
                echo(f"  done {run.label} ({seconds:.0f} s)")
            else:
                failed[run.label] = code
                cause = f": {run.failure()}" if run.status() == "failed" else ""
                log = log_dir / (run.label.replace("/", "__") + ".log")
                echo(f"  FAILED {run.label} (exit {code}){cause}; log: {log}")

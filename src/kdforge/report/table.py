"""Group runs that differ only by seed, and compute each group's row of the report.

Everything here is plain arithmetic on :class:`~kdforge.report.collect.RunResult`; formatting
for people lives in :func:`table_rows`, and the raw numbers stay on :class:`Group` for the CSV.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kdforge.methods.references import Reference, lookup
from kdforge.report.collect import RunResult, strip_seed

DASH = "—"
STUDENT_ALONE = "ce"
PLAIN_KD = "kd"


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (n - 1) of the values that exist; std is None for n < 2."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        present = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        if not present:
            return cls(None, None, 0)
        mean = statistics.fmean(present)
        std = statistics.stdev(present) if len(present) > 1 else None
        return cls(mean, std, len(present))

    def format(self, digits: int = 2) -> str:
        if self.mean is None:
            return DASH
        std = DASH if self.std is None else f"{self.std:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {std}"


@dataclass
class Group:
    """The runs of one setting (all seeds) and what the report says about them."""

    key: tuple
    runs: list[RunResult]
    name: str = ""
    final: Stat = field(default_factory=lambda: Stat(None, None, 0))  # the primary metric (top-1 or MAE)
    best: Stat = field(default_factory=lambda: Stat(None, None, 0))
    final_rmse: Stat = field(default_factory=lambda: Stat(None, None, 0))  # regression only
    seconds_per_batch: Stat = field(default_factory=lambda: Stat(None, None, 0))
    train_minutes: Stat = field(default_factory=lambda: Stat(None, None, 0))
    student_alone: Group | None = None
    delta: float | None = None  # final mean minus the student-alone group's final mean (< 0 better for MAE)
    kd: Group | None = None
    time_vs_kd: float | None = None  # seconds per batch relative to the plain-KD group
    reference: Reference | None = None
    reference_budget_differs: bool = False

    # ---------------------------------------------------------------- identity
    @property
    def first(self) -> RunResult:
        return self.runs[0]

    @property
    def method(self) -> str:
        return self.first.method

    @property
    def dataset(self) -> str:
        return self.first.dataset

    @property
    def task(self) -> str:
        return self.first.task

    @property
    def primary(self) -> str:
        """The metric ``final`` and ``best`` hold: "top1" (classification) or "mae" (regression)."""
        return self.first.primary

    @property
    def lower_is_better(self) -> bool:
        return self.first.lower_is_better

    @property
    def student(self) -> str:
        return self.first.student

    @property
    def student_arch(self) -> str:
        return self.first.student_arch

    @property
    def teachers(self) -> tuple[str, ...]:
        return self.first.teachers

    @property
    def config_hash(self) -> str:
        return self.first.config_hash

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    @property
    def selection_split(self) -> str:
        return self.first.selection_split

    @property
    def epochs(self) -> int | None:
        return self.first.epochs

    @property
    def extra_parameters(self) -> int | None:
        return max((r.extra_parameters for r in self.runs if r.extra_parameters is not None), default=None)

    @property
    def student_parameters(self) -> int | None:
        return max((r.student_parameters for r in self.runs if r.student_parameters is not None), default=None)

    @property
    def device(self) -> str:
        """The device most of the group's runs trained on (timings compare only on one device)."""
        return Counter(r.device for r in self.runs).most_common(1)[0][0]

    @property
    def teacher_bank(self) -> bool:
        return bool((self.first.config.get("teacher_bank") or {}).get("enabled"))

    def curve(self) -> list[tuple[int, float, float, float]]:
        """(epoch, mean, min, max) of the test primary metric over the seeds, at epochs every curve has."""
        curves = [dict(r.curve) for r in self.runs if r.curve]
        if not curves:
            return []
        epochs = sorted(set.intersection(*(set(c) for c in curves)))
        return [
            (e, statistics.fmean(c[e] for c in curves), min(c[e] for c in curves), max(c[e] for c in curves))
            for e in epochs
        ]


# --------------------------------------------------------------------------- grouping
_METHOD_ORDER = {STUDENT_ALONE: 0, PLAIN_KD: 1}


def group_runs(runs: Sequence[RunResult]) -> list[Group]:
    """Runs with the same group key (same recipe apart from seed and name) form a group."""
    by_key: dict[tuple, list[RunResult]] = {}
    for run in runs:
        by_key.setdefault((*run.group_key, run.primary), []).append(run)
    groups = []
    for key, members in by_key.items():
        members.sort(key=lambda r: (r.seed if r.seed is not None else -1, str(r.path)))
        group = Group(key=key, runs=members)
        group.final = Stat.of(r.final_score for r in members)
        group.best = Stat.of(r.best_score for r in members)
        group.final_rmse = Stat.of(r.final_rmse for r in members)
        group.seconds_per_batch = Stat.of(r.seconds_per_batch for r in members)
        group.train_minutes = Stat.of(None if r.train_seconds is None else r.train_seconds / 60 for r in members)
        groups.append(group)
    _name_groups(groups)
    groups.sort(
        key=lambda g: (
            g.dataset,
            g.student_arch,
            g.teachers,
            _METHOD_ORDER.get(g.method, 2),
            g.method,
            g.name,
            g.config_hash,
        )
    )
    for group in groups:
        group.student_alone = _student_alone_for(group, groups)
        if (
            group.student_alone is not None
            and group.final.mean is not None
            and group.student_alone.final.mean is not None
        ):
            group.delta = group.final.mean - group.student_alone.final.mean
        group.kd = _kd_for(group, groups)
        if group.kd is not None and group.seconds_per_batch.mean and group.kd.seconds_per_batch.mean:
            group.time_vs_kd = group.seconds_per_batch.mean / group.kd.seconds_per_batch.mean
        group.reference = reference_for(group)
        if group.reference is not None:
            group.reference_budget_differs = (
                group.epochs != group.reference.epochs or group.first.train_subset is not None
            )
    return groups


def _common_name(runs: Sequence[RunResult]) -> str:
    names = sorted({strip_seed(r.name, r.seed) for r in runs})
    if len(names) == 1:
        return names[0]
    prefix = names[0]
    for other in names[1:]:
        while not other.startswith(prefix):
            prefix = prefix[:-1]
    prefix = prefix.rstrip("-_. ")
    return prefix or names[0]


def _name_groups(groups: list[Group]) -> None:
    """Each group is shown with its runs' name; a short hash tells apart different recipes sharing one."""
    for group in groups:
        group.name = _common_name(group.runs)
    counts = Counter(g.name for g in groups)
    for group in groups:
        if counts[group.name] > 1:
            group.name = f"{group.name} [{group.config_hash[:6]}]"


def _student_alone_for(group: Group, groups: Sequence[Group]) -> Group | None:
    """The `ce` group with the same dataset, student architecture and training budget.

    Budget = epochs and data.train_subset. Among several, the one with the same data settings is
    preferred, then the same train settings, then the most seeds.
    """
    if group.method == STUDENT_ALONE:
        return None
    candidates = [
        g
        for g in groups
        if g.method == STUDENT_ALONE
        and g.dataset == group.dataset
        and g.student_arch == group.student_arch
        and g.epochs == group.epochs
        and g.first.train_subset == group.first.train_subset
        and g.primary == group.primary
    ]
    if not candidates:
        return None
    return max(
        candidates,
        key=lambda g: (
            g.first.data_hash == group.first.data_hash,
            g.first.train_hash == group.first.train_hash,
            g.n,
        ),
    )


def _kd_for(group: Group, groups: Sequence[Group]) -> Group | None:
    """The plain `kd` group with the same dataset, student, teachers, batch size and device.

    A `kd` group is its own reference. Among several, the same data settings, train settings and
    teacher-bank use are preferred, then the most seeds.
    """
    if not group.teachers:
        return None
    candidates = [
        g
        for g in groups
        if g.method == PLAIN_KD
        and g.dataset == group.dataset
        and g.student_arch == group.student_arch
        and g.teachers == group.teachers
        and g.first.batch_size == group.first.batch_size
        and g.device == group.device
    ]
    if not candidates:
        return None
    return max(
        candidates,
        key=lambda g: (
            g is group,
            g.first.data_hash == group.first.data_hash,
            g.first.train_hash == group.first.train_hash,
            g.teacher_bank == group.teacher_bank,
            g.n,
        ),
    )


def reference_for(group: Group) -> Reference | None:
    """The published number for the group's exact (method, dataset, teacher, student), if any.

    Only plain zoo networks match (a student built with extra constructor arguments is another
    network), and only single-teacher methods or the student alone.
    """
    if group.student_arch != group.student or len(group.teachers) > 1 or group.primary != "top1":
        return None
    teacher = group.teachers[0] if group.teachers else None
    return lookup(group.method, group.first.reference_dataset, teacher, group.student)


# --------------------------------------------------------------------------- formatting
def metric_label(groups: Sequence[Group] = ()) -> tuple[str, str]:
    """(name, unit suffix) of the primary metric of ``groups``: top-1 (%) for classification,
    MAE for regression (in the target's units, e.g. degrees), both named when a report mixes them."""
    metrics = {g.primary for g in groups} or {"top1"}
    if metrics == {"top1"}:
        return "top-1", " (%)"
    if metrics == {"mae"}:
        return "MAE", ""
    return "top-1 (%) or MAE", ""


def best_header(split: str, groups: Sequence[Group] = ()) -> str:
    name, unit = metric_label(groups)
    return f"{name} best epoch, selected on {split}{unit}"


def final_header(groups: Sequence[Group] = ()) -> str:
    name, unit = metric_label(groups)
    return f"{name} final epoch{unit}"


FINAL_HEADER = final_header()  # the classification report's header
RMSE_HEADER = "RMSE final epoch"


def _count(value: int | None) -> str:
    return DASH if value is None else f"{value:,}"


def _signed(value: float | None) -> str:
    return DASH if value is None else f"{value:+.2f}"


def columns(groups: Sequence[Group]) -> list[str]:
    """Headers of the table; one best-epoch column per selection split present, never merged."""
    splits = sorted({g.selection_split for g in groups}, key=lambda s: (s != "val", s))
    return [
        "run",
        "method",
        "dataset",
        "student",
        "teacher",
        "seeds",
        final_header(groups),
        *([RMSE_HEADER] if any(g.primary == "mae" for g in groups) else []),
        *(best_header(s, groups) for s in splits),
        "Δ final vs student alone",
        *(["paper top-1 (%)"] if any(g.primary == "top1" for g in groups) or not groups else []),
        "extra params",
        "time/batch vs KD",
        "train min/run",
    ]


def paper_cell(group: Group) -> str:
    if group.reference is None:
        return DASH
    return f"{group.reference.top1:.2f}" + ("†" if group.reference_budget_differs else "")


def table_rows(groups: Sequence[Group]) -> list[dict[str, str]]:
    """One dict per group, keyed by the headers of :func:`columns`, values formatted for people."""
    headers = columns(groups)
    rows = []
    for group in groups:
        row = {
            "run": group.name,
            "method": group.method,
            "dataset": group.dataset,
            "student": group.student_arch,
            "teacher": ", ".join(group.teachers) or DASH,
            "seeds": str(group.n),
            final_header(groups): group.final.format(),
            RMSE_HEADER: group.final_rmse.format(),
        }
        for header in headers:
            if " best epoch, selected on " in header:
                own = best_header(group.selection_split, groups)
                row[header] = group.best.format() if header == own else DASH
        row["Δ final vs student alone"] = "ref" if group.method == STUDENT_ALONE else _signed(group.delta)
        row["paper top-1 (%)"] = paper_cell(group)
        row["extra params"] = _count(group.extra_parameters)
        row["time/batch vs KD"] = DASH if group.time_vs_kd is None else f"{group.time_vs_kd:.2f}×"
        row["train min/run"] = DASH if group.train_minutes.mean is None else f"{group.train_minutes.mean:.1f}"
        rows.append({h: row[h] for h in headers})
    return rows


def provenance(runs: Sequence[RunResult]) -> dict[str, list[str]]:
    """Distinct code versions, libraries and devices behind the runs, each with its run count."""

    def tally(values: Iterable[Any]) -> list[str]:
        counts = Counter(values)
        return [f"{value} ({count} run{'s' if count != 1 else ''})" for value, count in sorted(counts.items())]

    commits = []
    for run in runs:
        commit = run.record.get("git_commit")
        if not commit:
            commits.append("unknown")
        else:
            commits.append(str(commit)[:12] + (" (uncommitted edits)" if run.record.get("git_dirty") else ""))
    return {
        "git commits": tally(commits),
        "kdforge versions": tally(str(r.record.get("kdforge_version") or "unknown") for r in runs),
        "torch versions": tally(str(r.record.get("torch_version") or "unknown") for r in runs),
        "devices": tally(r.device for r in runs),
    }

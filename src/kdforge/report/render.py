"""Turn grouped results into ``report.md``, ``results.csv`` and a self-contained ``report.html``."""

from __future__ import annotations

import base64
import csv
import html
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kdforge.report.collect import RunResult, SkippedRun
from kdforge.report.plots import Plot
from kdforge.report.table import (
    DASH,
    RMSE_HEADER,
    Group,
    best_header,
    columns,
    final_header,
    metric_label,
    provenance,
    table_rows,
)


@dataclass
class Report:
    """Everything the three files are made from."""

    groups: list[Group]
    runs: list[RunResult]
    skipped: list[SkippedRun]
    sources: list[str]
    out_dir: Path

    @property
    def headers(self) -> list[str]:
        return columns(self.groups)

    @property
    def rows(self) -> list[dict[str, str]]:
        return table_rows(self.groups)

    def where(self, path: Path) -> str:
        """A run directory as shown in the report: relative to the output folder when below it."""
        try:
            return os.path.relpath(path, self.out_dir.resolve())
        except ValueError:  # another drive on Windows
            return str(path)


# --------------------------------------------------------------------------- notes (shared)
def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def unfinished_line(skipped: Sequence[SkippedRun]) -> str | None:
    unfinished = [s for s in skipped if not s.reason.startswith("unreadable")]
    if not unfinished:
        return None
    return f"{_plural(len(unfinished), 'run')} unfinished: " + ", ".join(s.describe() for s in unfinished)


def unreadable_line(skipped: Sequence[SkippedRun]) -> str | None:
    unreadable = [s for s in skipped if s.reason.startswith("unreadable")]
    if not unreadable:
        return None
    return f"{_plural(len(unreadable), 'run directory')} unreadable: " + ", ".join(
        f"{s.path} ({s.reason})" for s in unreadable
    )


def column_notes(report: Report) -> list[str]:
    """What each column is, in the order of the table (plain text with `code` and **bold**)."""
    splits = sorted({g.selection_split for g in report.groups})
    groups = report.groups
    regression = any(g.primary == "mae" for g in groups)
    name = metric_label(groups)[0]
    metric = {"top-1": "top-1", "MAE": "MAE"}.get(name, "top-1 (classification) or MAE (regression)")
    best = {"top-1": "highest", "MAE": "lowest"}.get(name, "best")
    notes = [
        f"**{final_header(groups)}**: test-set {metric} of the network after the last epoch, mean ± sample "
        f"standard deviation over the seeds (n − 1 in the denominator; {DASH} for a single seed)."
        + (
            " MAE (mean absolute error) is in the regression target's units (degrees for rotated_mnist); "
            "lower is better."
            if regression
            else ""
        ),
    ]
    if regression:
        notes.append(
            f"**{RMSE_HEADER}**: root mean squared error after the last epoch (regression runs), mean ± std; "
            "it weighs large errors more than MAE and is never below it."
        )
    for split in splits:
        if split == "test":
            notes.append(
                f"**{best_header(split, groups)}**: test {metric} at the epoch with the {best} *test* {metric}, "
                "mean ± std over seeds. The epoch was chosen on the test set itself, so this number is optimistic; "
                "it is what RepDistiller and mdistiller report. Never averaged together with final-epoch numbers."
            )
        else:
            notes.append(
                f"**{best_header(split, groups)}**: test {metric} at the epoch with the {best} {metric} on the "
                f"held-out `{split}` split (data.val_fraction), mean ± std over seeds: a clean model-selection number."
            )
    notes += [
        "**Δ final vs student alone**: final-epoch mean minus the final-epoch mean of the student trained "
        "alone (method `ce`) with the same dataset, student architecture, epochs and training subset "
        "(preferring identical data and train settings); `ref` marks a student-alone group itself."
        + (" For MAE a negative Δ is an improvement (a smaller error)." if regression else ""),
        "**extra params**: trainable parameters the method adds beside the student (adapters, heads, "
        "memory banks); they are dropped at deployment.",
        "**time/batch vs KD**: mean training seconds per batch divided by that of the plain `kd` group with "
        "the same dataset, student, teacher(s), batch size and device. Includes the teacher forward pass "
        "(or the teacher-bank lookup when enabled).",
        "**train min/run**: mean training time per run in minutes (the epochs' training loops, without evaluation).",
    ]
    if any(g.primary == "top1" for g in groups) or not groups:
        notes.insert(
            len(notes) - 3,
            "**paper top-1**: the published number registered in `kdforge.methods.references` for exactly this "
            "method, dataset, teacher and student (CIFAR-100 benchmark tables; those are best-epoch numbers "
            "selected on test after 240 epochs). † marks a group whose budget (epochs or training subset) differs "
            f"from the published one, so it is context, not a target. {DASH}: no matching published number.",
        )
    return notes


def comparison_notes(report: Report) -> list[str]:
    """Which groups each group's Δ and time ratio were computed against, and what each group holds."""
    lines = []
    for group in report.groups:
        seeds = ", ".join(DASH if s is None else str(s) for s in group.seeds)
        parts = [f"seeds {seeds}", f"setting {group.config_hash}"]
        if group.student_alone is not None:
            parts.append(f"student alone: {group.student_alone.name}")
        if group.kd is not None and group.kd is not group:
            parts.append(f"KD timing: {group.kd.name}")
        if group.reference is not None:
            parts.append(f"paper: {group.reference.source}")
        lines.append(f"`{group.name}`: " + "; ".join(parts))
    return lines


# --------------------------------------------------------------------------- markdown
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[dict[str, str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |"]
    lines.append("|" + "|".join(" --- " if i < 5 else " ---: " for i in range(len(headers))) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(row.get(h, DASH)) for h in headers) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(report: Report) -> str:
    out = ["# kdforge report", ""]
    out.append(
        f"{_plural(len(report.runs), 'finished run')} in {_plural(len(report.groups), 'group')} "
        f"(runs that differ only by seed), from {', '.join(f'`{s}`' for s in report.sources)}."
    )
    out.append("")
    for line in (unfinished_line(report.skipped), unreadable_line(report.skipped)):
        if line:
            out += [f"**{line}** (left out of the table)", ""]
    if report.groups:
        out.append(markdown_table(report.headers, report.rows))
    else:
        out += ["No finished runs.", ""]
    out += ["## What the columns mean", ""]
    out += [f"* {note}" for note in column_notes(report)]
    if report.groups:
        out += ["", "## Groups", ""]
        out += [f"* {line}" for line in comparison_notes(report)]
    out += ["", "## Provenance", ""]
    for label, values in provenance(report.runs).items():
        out.append(f"* {label}: {', '.join(values) or DASH}")
    out += ["", "Per-run numbers: `results.csv`. Plots: `report.html`.", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- csv
CSV_FIELDS = [
    "run_dir",
    "run_name",
    "group",
    "setting",
    "method",
    "dataset",
    "student",
    "teachers",
    "seed",
    "epochs",
    "final_epoch",
    "final_top1",
    "final_top5",
    "best_epoch",
    "best_top1",
    "best_selected_on",
    "best_selection_top1",
    "student_parameters",
    "extra_parameters",
    "seconds_per_batch",
    "train_seconds",
    "wall_seconds",
    "device",
    "git_commit",
    "git_dirty",
    "torch_version",
    "kdforge_version",
    "group_seeds",
    "group_final_top1_mean",
    "group_final_top1_std",
    "group_best_top1_mean",
    "group_best_top1_std",
    "group_delta_vs_student_alone",
    "student_alone_group",
    "group_time_vs_kd",
    "kd_group",
    "paper_top1",
    "paper_source",
    "paper_budget_differs",
    "task",
    "final_mae",
    "final_rmse",
    "best_mae",
    "group_final_mae_mean",
    "group_final_mae_std",
    "group_best_mae_mean",
    "group_best_mae_std",
]


def _csv_value(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e-3 and value != 0 else round(value, 4)
    return value


def render_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for group in report.groups:
        classification = group.primary == "top1"
        for run in group.runs:
            row = {
                "run_dir": report.where(run.path),
                "run_name": run.name,
                "group": group.name,
                "setting": group.config_hash,
                "method": run.method,
                "dataset": run.dataset,
                "student": run.student_arch,
                "teachers": ";".join(run.teachers),
                "seed": run.seed,
                "epochs": run.epochs,
                "final_epoch": run.final_epoch,
                "final_top1": run.final_top1,
                "final_top5": run.final_top5,
                "best_epoch": run.best_epoch,
                "best_top1": run.best_top1,
                "best_selected_on": run.selection_split,
                "best_selection_top1": run.best_selection_top1,
                "student_parameters": run.student_parameters,
                "extra_parameters": run.extra_parameters,
                "seconds_per_batch": run.seconds_per_batch,
                "train_seconds": run.train_seconds,
                "wall_seconds": run.wall_seconds,
                "device": run.device,
                "git_commit": run.record.get("git_commit"),
                "git_dirty": run.record.get("git_dirty"),
                "torch_version": run.record.get("torch_version"),
                "kdforge_version": run.record.get("kdforge_version"),
                "group_seeds": group.n,
                "group_final_top1_mean": group.final.mean if classification else None,
                "group_final_top1_std": group.final.std if classification else None,
                "group_best_top1_mean": group.best.mean if classification else None,
                "group_best_top1_std": group.best.std if classification else None,
                "group_delta_vs_student_alone": group.delta,
                "student_alone_group": group.student_alone.name if group.student_alone else None,
                "group_time_vs_kd": group.time_vs_kd,
                "kd_group": group.kd.name if group.kd else None,
                "paper_top1": group.reference.top1 if group.reference else None,
                "paper_source": group.reference.source if group.reference else None,
                "paper_budget_differs": group.reference_budget_differs if group.reference else None,
                "task": run.task,
                "final_mae": run.final_score if not classification else None,
                "final_rmse": run.final_rmse,
                "best_mae": run.best_score if not classification else None,
                "group_final_mae_mean": group.final.mean if not classification else None,
                "group_final_mae_std": group.final.std if not classification else None,
                "group_best_mae_mean": group.best.mean if not classification else None,
                "group_best_mae_std": group.best.std if not classification else None,
            }
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return buffer.getvalue()


# --------------------------------------------------------------------------- html
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:nth-child(even) td { background: #fafafa; }
.warning { background: #fff4e0; border-left: 4px solid #f0a030; padding: 0.5em 1em; }
figure { margin: 1.5em 0; } figcaption { font-size: 0.9em; color: #555; }
img { max-width: 100%; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_EMPHASIS = re.compile(r"\*([^*\s][^*]*)\*")


def _inline(text: str) -> str:
    """Escape text, then turn the notes' `code`, **bold** and *emphasis* markers into tags."""
    escaped = html.escape(text, quote=True)  # leaves ` and * alone, so the markers survive
    escaped = _CODE.sub(r"<code>\1</code>", escaped)
    escaped = _BOLD.sub(r"<strong>\1</strong>", escaped)
    return _EMPHASIS.sub(r"<em>\1</em>", escaped)


def html_table(headers: Sequence[str], rows: Sequence[dict[str, str]]) -> str:
    text_columns = set(headers[:5])
    parts = ["<table>", "<thead><tr>"]
    parts += [f"<th>{html.escape(h)}</th>" for h in headers]
    parts.append("</tr></thead><tbody>")
    for row in rows:
        parts.append("<tr>")
        for h in headers:
            css = "" if h in text_columns else ' class="num"'
            parts.append(f"<td{css}>{html.escape(row.get(h, DASH))}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def render_html(report: Report, plots: Sequence[Plot]) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>kdforge report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>kdforge report</h1>",
        f"<p>{e(_plural(len(report.runs), 'finished run'))} in {e(_plural(len(report.groups), 'group'))} "
        f"(runs that differ only by seed), from {', '.join(f'<code>{e(s)}</code>' for s in report.sources)}.</p>",
    ]
    for line in (unfinished_line(report.skipped), unreadable_line(report.skipped)):
        if line:
            parts.append(f'<p class="warning">{e(line)} (left out of the table)</p>')
    parts.append(html_table(report.headers, report.rows) if report.groups else "<p>No finished runs.</p>")
    parts.append("<h2>What the columns mean</h2><ul>")
    parts += [f"<li>{_inline(note)}</li>" for note in column_notes(report)]
    parts.append("</ul>")
    if plots:
        parts.append("<h2>Plots</h2>")
        for plot in plots:
            data = base64.b64encode(plot.png).decode("ascii")
            parts.append(
                f'<figure><img alt="{e(plot.title)}" src="data:image/png;base64,{data}">'
                f"<figcaption><strong>{e(plot.title)}.</strong> {e(plot.caption)}</figcaption></figure>"
            )
    if report.groups:
        parts.append("<h2>Groups</h2><ul>")
        parts += [f"<li>{_inline(line)}</li>" for line in comparison_notes(report)]
        parts.append("</ul>")
    parts.append("<h2>Provenance</h2><ul>")
    for label, values in provenance(report.runs).items():
        parts.append(f"<li>{e(label)}: {e(', '.join(values) or DASH)}</li>")
    parts.append("</ul><p>Per-run numbers: <code>results.csv</code> beside this file.</p></body></html>")
    return "\n".join(parts) + "\n"

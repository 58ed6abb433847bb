"""``write_report``: collect, group, render, and write the three files atomically."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdforge.core.checkpoint import atomic_write_text
from kdforge.core.errors import KDForgeError
from kdforge.report.collect import collect_all, find_run_dirs
from kdforge.report.render import Report, markdown_table, render_csv, render_html, render_markdown, unfinished_line
from kdforge.report.table import group_runs

MARKDOWN = "report.md"
CSV = "results.csv"
HTML = "report.html"


def build_report(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> Report:
    """Read and group the runs at or below ``paths``; nothing is written."""
    paths = [str(p) for p in paths]
    if not paths:
        raise KDForgeError("give at least one run directory or folder of runs")
    if not find_run_dirs(paths):
        raise KDForgeError(
            f"no run directories (folders with a summary.json) at or below {', '.join(paths)}; "
            "give the --out of `kdforge train` or a folder holding several"
        )
    runs, skipped = collect_all(paths)
    return Report(groups=group_runs(runs), runs=runs, skipped=skipped, sources=paths, out_dir=Path(out_dir))


def _write_atomically(text: str, path: Path) -> None:
    atomic_write_text(text, path)


def write_report(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write ``report.md``, ``results.csv`` and ``report.html`` into ``out_dir`` (default: the first path).

    Returns ``{"markdown": Path, "csv": Path, "html": Path, "rows": [table rows], "headers": [...],
    "groups": [Group], "unfinished": [SkippedRun]}``; each file is written to a temporary name
    and renamed, so a reader never sees half a report.
    """
    from kdforge.report.plots import cost_plots, curve_plots

    paths = list(paths)
    out = Path(out_dir if out_dir is not None else (paths[0] if paths else "."))
    report = build_report(paths, out)
    out.mkdir(parents=True, exist_ok=True)
    plots = [*curve_plots(report.groups), *cost_plots(report.groups)]
    written = {"markdown": out / MARKDOWN, "csv": out / CSV, "html": out / HTML}
    _write_atomically(render_markdown(report), written["markdown"])
    _write_atomically(render_csv(report), written["csv"])
    _write_atomically(render_html(report, plots), written["html"])
    return {
        **written,
        "headers": report.headers,
        "rows": report.rows,
        "groups": report.groups,
        "unfinished": report.skipped,
    }


def main(paths: list[str], out: str | None = None) -> int:
    """``kdforge report DIR... [--out DIR]``: write the report and print its table."""
    result = write_report(paths, out)
    if result["rows"]:
        sys.stdout.write(markdown_table(result["headers"], result["rows"]))
    else:
        print("no finished runs")
    line = unfinished_line(result["unfinished"])
    if line:
        print(line)
    print(f"report: {result['markdown']}, {result['html']}, {result['csv']}")
    return 0

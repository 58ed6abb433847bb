"""Aggregate run directories into a report: ``report.md``, ``results.csv``, ``report.html``.

* :func:`collect` reads finished runs (:class:`RunResult`) at or below the given paths;
  :func:`collect_all` also returns the runs left out (unfinished or unreadable).
* :func:`group_runs` groups runs that differ only by seed and computes each group's statistics,
  its delta over the student alone, its cost relative to plain KD and its published number.
* :func:`write_report` writes the three files; :func:`main` is the ``kdforge report`` command.

See ``docs/reports.md`` for what each column means.
"""

from kdforge.report.collect import RunResult, SkippedRun, collect, collect_all, find_run_dirs
from kdforge.report.table import Group, Stat, group_runs, table_rows
from kdforge.report.writer import build_report, main, write_report

__all__ = [
    "Group",
    "RunResult",
    "SkippedRun",
    "Stat",
    "build_report",
    "collect",
    "collect_all",
    "find_run_dirs",
    "group_runs",
    "main",
    "table_rows",
    "write_report",
]

"""The report's figures, drawn headless with matplotlib and returned as PNG bytes.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot state), one per dataset: runs on
different datasets never share axes.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from kdforge.report.table import Group


@dataclass(frozen=True)
class Plot:
    title: str
    caption: str
    png: bytes


def _figure(width: float, height: float, columns: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def _png(figure, layout: bool = True) -> bytes:
    buffer = io.BytesIO()
    if layout:
        figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _by_dataset(groups: Sequence[Group]) -> dict[str, list[Group]]:
    found: dict[str, list[Group]] = {}
    for group in groups:
        found.setdefault(group.dataset, []).append(group)
    return found


def _colors(groups: Sequence[Group]) -> dict[int, str]:
    return {id(g): f"C{i % 10}" for i, g in enumerate(groups)}


def _metric(members: Sequence[Group]) -> tuple[str, str, str]:
    """(axis label, title word, caption word) of a dataset's primary metric: top-1 or MAE."""
    if members and all(g.primary == "mae" for g in members):
        return "test MAE", "error", "MAE"
    return "test top-1 (%)", "accuracy", "top-1"


def curve_plots(groups: Sequence[Group]) -> list[Plot]:
    """Test top-1 (MAE for regression) against epoch per group: the mean over seeds, with a band
    from min to max."""
    plots = []
    for dataset, members in _by_dataset(groups).items():
        curves = [(g, g.curve()) for g in members]
        curves = [(g, c) for g, c in curves if c]
        if not curves:
            continue
        figure, (axes,) = _figure(8, 4.5)
        colors = _colors(members)
        for group, curve in curves:
            epochs = [e + 1 for e, *_ in curve]
            mean = [m for _, m, _, _ in curve]
            (line,) = axes.plot(
                epochs,
                mean,
                marker="." if len(epochs) < 40 else None,
                label=f"{group.name} (n={group.n})",
                color=colors[id(group)],
            )
            if group.n > 1:
                axes.fill_between(
                    epochs,
                    [lo for *_, lo, _ in curve],
                    [hi for *_, hi in curve],
                    color=line.get_color(),
                    alpha=0.18,
                    linewidth=0,
                )
        axis, word, caption = _metric(members)
        axes.set_xlabel("epoch")
        axes.set_ylabel(axis)
        axes.set_title(f"{dataset}: {axis.split(' (')[0]} by epoch")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small", loc="lower right" if word == "accuracy" else "upper right")
        plots.append(
            Plot(
                f"{dataset}: {word} against epoch",
                f"Mean test {caption} over seeds; the shaded band spans the lowest to the highest seed.",
                _png(figure),
            )
        )
    return plots


def _labels(groups: Sequence[Group]) -> dict[int, str]:
    """Short point labels: the method where it tells groups apart, else the group's name."""
    methods = Counter(g.method for g in groups)
    return {id(g): g.method if methods[g.method] == 1 else g.name for g in groups}


def cost_plots(groups: Sequence[Group]) -> list[Plot]:
    """Final top-1 or MAE (mean, error bar = sample std) against seconds per batch and train minutes."""
    plots = []
    axes_specs = (
        (
            "time per batch (ms)",
            lambda g: None if g.seconds_per_batch.mean is None else 1000 * g.seconds_per_batch.mean,
        ),
        ("train minutes per run", lambda g: g.train_minutes.mean),
    )
    for dataset, members in _by_dataset(groups).items():
        colors = _colors(members)  # the same colour per group as in the curves
        members = [g for g in members if g.final.mean is not None]
        if not members:
            continue
        labels = _labels(members)
        axis, word, caption = _metric(members)
        figure, axes_list = _figure(11, 4.8, columns=2)
        handles: dict[str, object] = {}
        for axes, (label, x_of) in zip(axes_list, axes_specs):
            for group in members:
                x = x_of(group)
                if x is None:
                    continue
                handle = axes.errorbar(
                    [x], [group.final.mean], yerr=[group.final.std or 0.0], fmt="o", capsize=4, color=colors[id(group)]
                )
                handles.setdefault(f"{group.name} (n={group.n})", handle)
                text = axes.annotate(
                    labels[id(group)],
                    (x, group.final.mean),
                    textcoords="offset points",
                    xytext=(6, 4),
                    fontsize="small",
                )
                text.set_in_layout(False)
            axes.set_xlabel(label)
            axes.set_ylabel(f"final {axis}")
            axes.margins(x=0.2, y=0.15)
            axes.grid(alpha=0.3)
        if not handles:
            continue
        figure.suptitle(f"{dataset}: {word} against cost")
        figure.legend(
            list(handles.values()),
            list(handles),
            loc="lower center",
            fontsize="small",
            ncol=min(3, len(handles)),
            frameon=False,
        )
        rows = -(-len(handles) // 3)
        figure.set_size_inches(11, 4.8 + 0.25 * rows)
        figure.tight_layout(rect=(0, 0.06 + 0.05 * rows, 1, 1))
        plots.append(
            Plot(
                f"{dataset}: {word} against cost",
                f"Final-epoch test {caption}, mean over seeds, error bars one sample standard deviation "
                "(none for a single seed). Timings compare only between runs on the same device.",
                _png(figure, layout=False),
            )
        )
    return plots

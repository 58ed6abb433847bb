"""Plots of a run's history (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(history: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Training loss and the test/val primary metric (top-1, or MAE for regression) against epoch,
    side by side, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] + 1 for r in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
    loss_ax.plot(epochs, [r["train"]["loss"] for r in history], label="train loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    metric, label = "top1", "top-1 (%)"
    evaluated: dict[str, Any] = next((r[split] for r in history for split in ("test", "val") if split in r), {})
    if "top1" not in evaluated and "mae" in evaluated:
        metric, label = "mae", "MAE"
    if "top1" not in evaluated and "map" in evaluated:  # retrieval
        metric, label = "map", "mAP (%)"
    for split in ("test", "val"):
        points = [(r["epoch"] + 1, r[split][metric]) for r in history if split in r and metric in r[split]]
        if points:
            xs, ys = zip(*points)
            acc_ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=f"{split} {label.split(' ')[0]}")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel(label)
    acc_ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)

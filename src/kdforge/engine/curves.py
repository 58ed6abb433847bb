"""Plots of a run's history (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(history: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Training loss and test/val top-1 against epoch, side by side, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] + 1 for r in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
    loss_ax.plot(epochs, [r["train"]["loss"] for r in history], label="train loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    for split in ("test", "val"):
        points = [(r["epoch"] + 1, r[split]["top1"]) for r in history if split in r]
        if points:
            xs, ys = zip(*points)
            acc_ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=f"{split} top-1")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("top-1 (%)")
    acc_ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)

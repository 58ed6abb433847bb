"""The demo's setting over several seeds, and the vanilla-KD family on the bundled digits.

Teacher: LeNet (width 4) on the 1,297 digits training images. Students: an MLP (64 hidden) on a
300-image class-balanced subset, 100 epochs, tested on the 500 test images. Variants: the student
alone; KD (T = 4, soft 0.9, CE 0.1); dynamic temperature annealing (T: 10 -> 1, exponential by
epoch); alpha annealing (soft weight cosine 0.95 -> 0.1, CE = 1 - soft); selective KD (teacher
correct only); an ensemble of two teachers; and the same student alone / KD trained with Adam,
where KD did not help in our measurements. Offline, about a minute on 2 cores.

    python benchmarks/digits_kd.py [--seeds 0 1 2 3 4] [--record]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from kdforge.config import build_config
from kdforge.engine.trainer import Trainer

TEACHER = {
    "data": {"name": "digits", "augment": False},
    "student": {"name": "lenet", "kwargs": {"width": 4}},
    "method": {"name": "ce"},
    "train": {
        "epochs": 30,
        "batch_size": 64,
        "optimizer": {"name": "adam", "lr": 0.002, "weight_decay": 0.0},
        "scheduler": {"name": "cosine"},
        "progress": "none",
    },
}
SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
ADAM = {"name": "adam", "lr": 0.001, "weight_decay": 0.0}
KD = {"name": "kd", "temperature": 4, "kd_weight": 0.9, "ce_weight": 0.1}
VARIANTS = {
    "student alone": ({"name": "ce"}, SGD, 0),
    "kd (T=4, 0.9/0.1)": (KD, SGD, 1),
    "kd, temperature annealed 10 -> 1": (
        {**KD, "temperature": {"kind": "exponential", "start": 10, "end": 1, "by": "epoch"}},
        SGD,
        1,
    ),
    "kd, alpha annealed 0.95 -> 0.1": (
        {**KD, "kd_weight": {"kind": "cosine", "start": 0.95, "end": 0.1}, "ce_weight": "complement"},
        SGD,
        1,
    ),
    "kd, selective (teacher correct)": ({**KD, "select": "correct"}, SGD, 1),
    "ensemble_kd, 2 teachers (mean of probs)": ({**KD, "name": "ensemble_kd"}, SGD, 2),
    "student alone, Adam": ({"name": "ce"}, ADAM, 0),
    "kd, Adam": (KD, ADAM, 1),
}


def student_recipe(method: dict, optimizer: dict, teachers: list[str], seed: int) -> dict:
    return {
        "seed": seed,
        "data": {"name": "digits", "augment": False, "train_subset": 300},
        "student": {"name": "mlp", "kwargs": {"hidden": [64]}},
        "teachers": [{"checkpoint": t} for t in teachers],
        "method": method,
        "train": {
            "epochs": 100,
            "batch_size": 64,
            "optimizer": optimizer,
            "scheduler": {"name": "constant"},
            "progress": "none",
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teachers, teacher_top1 = [], []
        for index in range(2):
            summary = Trainer(build_config({**TEACHER, "seed": index}), root / f"teacher{index}").fit()
            teachers.append(str(root / f"teacher{index}" / "checkpoints" / "model_last.pt"))
            teacher_top1.append(summary["final"]["test"]["top1"])
        rows = []
        for label, (method, optimizer, n_teachers) in VARIANTS.items():
            accs = []
            for seed in args.seeds:
                out = root / f"{label}-{seed}".replace(" ", "_").replace("/", "_")
                config = build_config(student_recipe(method, optimizer, teachers[:n_teachers], seed))
                accs.append(Trainer(config, out).fit()["final"]["test"]["top1"])
            rows.append((label, statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0))
    lines = [
        f"Teachers: LeNet width 4, final test top-1 {teacher_top1[0]:.1f}% and {teacher_top1[1]:.1f}% (seeds 0, 1). "
        f"Students: MLP 64 hidden (4,810 parameters), 300 training images, 100 epochs; final-epoch test top-1 "
        f"over seeds {args.seeds} (500 test images, so one image = 0.2 points).",
        "",
        "| variant | top-1 (%) mean ± std | vs alone (same optimizer) |",
        "| --- | ---: | ---: |",
    ]
    baselines = {"sgd": rows[0][1], "adam": rows[6][1]}
    for label, mean, std in rows:
        base = baselines["adam" if "Adam" in label else "sgd"]
        delta = "" if label.startswith("student alone") else f"{mean - base:+.2f}"
        lines.append(f"| {label} | {mean:.2f} ± {std:.2f} | {delta} |")
    lines.append(f"\nWall time: {(time.perf_counter() - started) / 60:.1f} min.")
    table = "\n".join(lines)
    print(table)
    if args.record:
        results = Path(__file__).resolve().parent / "RESULTS.md"
        section = f"\n## Vanilla-KD family on digits (`python benchmarks/digits_kd.py --record`), {time.strftime('%Y-%m-%d')}\n\n{table}\n"  # noqa: E501
        results.write_text((results.read_text() if results.exists() else "# Benchmark results\n") + section)


if __name__ == "__main__":
    main()

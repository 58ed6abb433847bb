"""Image regression on rotated MNIST: the student alone vs teacher-target KD vs feature KD (FitNet).

Data: ``rotated_mnist`` (real MNIST digits rotated by a known angle in [0, 90) degrees; fixed
angles, official 60,000 / 10,000 split); MAE in degrees on the 10,000 rotated test digits.
Teacher: LeNet width 2 (one output), ``configs/rotated_mnist/teacher.yaml`` (12 epochs on the full
training set, Adam) unless ``--teacher`` names a trained model file. Students: an MLP with one
hidden layer of 128 units (one output), Adam lr 1e-3, cosine, batch 128, on a digit-balanced
subset of 600 or 6,000 training images (label-scarce) or on all 60,000:

* student alone: ``ce`` (the task's loss: MSE to the normalised angle);
* teacher-target KD: ``kd`` on regression, ``0.5 MSE(s, y) + 0.5 MSE(s, t)``, teacher outputs
  replayed from a teacher bank;
* FitNet: ``fitnet`` hint from the MLP's hidden layer (``stage1``) to the LeNet's pooled features
  (``pool``) through a linear regressor, hint weight 0.1 (not tuned), plus MSE to the labels.

Budgets (epochs): 600 images x 100, 6,000 x 30, 60,000 x 10 (about 470, 1,400 and 4,700 steps).
Each setting runs for every seed; the table gives the final-epoch test MAE, mean ± sample std.
On 2 shared CPU cores the 600 and 6,000 settings take about 10 minutes together; the full
setting's FitNet runs its teacher live on every batch (--full-methods to choose).

    python benchmarks/rotated_mnist_regression.py [--teacher runs/rotated_mnist_teacher/checkpoints/model_last.pt]
        [--seeds 0 1 2] [--subsets 600 6000 full] [--full-methods ce kd] [--output sigmoid] [--record]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from kdforge.config import build_config
from kdforge.core.checkpoint import read_model_file
from kdforge.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = {600: 100, 6000: 30, None: 10}
METHODS = {
    "ce": ("student alone", {"name": "ce"}),
    "kd": ("teacher-target KD (0.5 / 0.5)", {"name": "kd", "kd_weight": 0.5, "ce_weight": "complement"}),
    "fitnet": (
        "FitNet hint stage1 → teacher pool (w 0.1)",
        {"name": "fitnet", "student_layers": ["stage1"], "teacher_layers": ["pool"], "weight": 0.1},
    ),
}


def student_recipe(
    method: dict, subset: int | None, teacher: str | None, seed: int, data_root: str, bank: str, output: str = "linear"
):
    data = {"name": "rotated_mnist", "root": data_root, "augment": False}
    if subset is not None:
        data["train_subset"] = subset
    epochs = EPOCHS[subset]
    return {
        "name": f"{method['name']}-{subset or 'full'}-s{seed}",
        "seed": seed,
        "data": data,
        "student": {"name": "mlp", "kwargs": {"hidden": [128], **({"output": output} if output != "linear" else {})}},
        "teachers": [{"checkpoint": teacher}] if method["name"] != "ce" else [],
        "method": method,
        "teacher_bank": {"enabled": method["name"] == "kd", "directory": bank},
        "train": {
            "epochs": epochs,
            "batch_size": 128,
            "optimizer": {"name": "adam", "lr": 0.001, "weight_decay": 0.0},
            "scheduler": {"name": "cosine"},
            "eval_every": epochs,
            "progress": "none",
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--teacher", help="a trained teacher model file (default: train configs/rotated_mnist/teacher.yaml)"
    )
    parser.add_argument("--data-root", default=str(ROOT / "data"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--subsets", nargs="+", default=["600", "6000", "full"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--full-methods", nargs="+", default=["ce", "kd"], choices=list(METHODS))
    parser.add_argument(
        "--output", default="linear", choices=["linear", "sigmoid", "relu"], help="the student's output activation"
    )
    parser.add_argument("--out", help="keep the run directories here (default: a temporary folder)")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        teacher = args.teacher
        if teacher is None:
            recipe = yaml.safe_load((ROOT / "configs" / "rotated_mnist" / "teacher.yaml").read_text())
            recipe["data"]["root"] = args.data_root
            recipe["train"]["progress"] = "none"
            Trainer(build_config(recipe), root / "teacher").fit()
            teacher = str(root / "teacher" / "checkpoints" / "model_last.pt")
        record = read_model_file(teacher)
        teacher_mae = float(record["metrics"]["mae"])
        teacher_params = sum(
            v.numel() for k, v in record["state_dict"].items() if "running" not in k and "num_batches" not in k
        )
        rows = []
        for text in args.subsets:
            subset = None if text == "full" else int(text)
            methods = args.methods if subset is not None else [m for m in args.methods if m in args.full_methods]
            alone = None
            for key in methods:
                label, method = METHODS[key]
                maes, params, seconds = [], 0, []
                for seed in args.seeds:
                    recipe = student_recipe(
                        method, subset, teacher, seed, args.data_root, str(root / "bank"), args.output
                    )
                    summary = Trainer(build_config(recipe), root / recipe["name"]).fit()
                    maes.append(summary["final"]["test"]["mae"])
                    params = summary["student_parameters"]
                    seconds.append(summary["train_seconds"])
                    print(f"  {recipe['name']}: MAE {maes[-1]:.2f}°", flush=True)
                mean, std = statistics.mean(maes), statistics.stdev(maes) if len(maes) > 1 else 0.0
                alone = mean if key == "ce" else alone
                rows.append((text, label, mean, std, alone, params, statistics.mean(seconds)))
    lines = [
        f"Teacher: LeNet width 2 ({teacher_params:,} parameters), test MAE {teacher_mae:.2f}° (full training set). "
        f"Student: MLP 128 hidden, {args.output} output. Final-epoch test MAE in degrees over seeds {args.seeds}; "
        "Δ is KD minus the student alone (negative = smaller error).",
        "",
        "| training images | student | MAE (°) mean ± std | Δ vs alone | student params | train s/run |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for text, label, mean, std, alone, params, seconds in rows:
        delta = "" if alone is None or label == METHODS["ce"][0] else f"{mean - alone:+.2f}"
        size = "60,000" if text == "full" else f"{int(text):,}"
        lines.append(f"| {size} | {label} | {mean:.2f} ± {std:.2f} | {delta} | {params:,} | {seconds:.0f} |")
    lines.append(f"\nWall time: {(time.perf_counter() - started) / 60:.1f} min.")
    table = "\n".join(lines)
    print(table)
    if args.record:
        results = Path(__file__).resolve().parent / "RESULTS.md"
        section = (
            f"\n## Image regression on rotated MNIST (`python benchmarks/rotated_mnist_regression.py --record`), "
            f"{time.strftime('%Y-%m-%d')}\n\n{table}\n"
        )
        results.write_text(results.read_text() + section)


if __name__ == "__main__":
    main()

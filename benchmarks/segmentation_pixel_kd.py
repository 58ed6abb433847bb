"""Pixel-wise KD variants on seg_mnist at 45 epochs: which pixels and which temperature the KL uses.

A follow-up to ``benchmarks/segmentation_kd.py`` (whose teacher it reuses: unet2d base 14, depth 3,
trained there; ``--teacher``): the 8% student (unet2d base 8, depth 2, 27.7k parameters) on the
first 1,000 ``seg_mnist`` canvases (40x40, 1-2 real MNIST digits, 11 classes per pixel) for 45
epochs (batch 16, Adam 3e-3, cosine decay), test dice and mIoU on 300 test canvases after the last
epoch. Every distilled variant uses ``0.5 (CE + Dice) + 0.5 T^2 KL``; they differ in T and in how
the per-pixel KL is averaged:

* ``alone``: the student alone (CE + Dice, weight 1);
* ``kd``: T = 4, plain mean over pixels (the benchmark's KD); ``kd_T1``: the same at T = 1;
* ``fg_T4`` / ``fg_T2`` / ``fg_T1``: ``pixel_weight: foreground`` (pixels that label and teacher
  both call background weigh ``background_weight`` 0.1, all others 1) at T = 4 / 2 / 1;
* ``fgc_T4``: ``fg_T4`` distilling only the pixels the teacher classifies correctly
  (``select: correct``).
* ``growing_ta`` / ``growing_ta_fg_T4``: ``segmentation_kd.py``'s growing teacher assistant (base 16,
  depth 2, grown from the student's width in 3 steps) with the plain / foreground-weighted KL, T = 4.

    python benchmarks/segmentation_pixel_kd.py --variants alone kd fg_T4 --seeds 0 1 2 [--record]

Runs are sequential (``OMP_NUM_THREADS=1`` recommended); finished runs under ``--work`` (one folder
``<variant>_s<seed>`` each, status "finished") are reused, and ``--table-only`` tabulates them without training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from kdforge.config import build_config
from kdforge.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parent
KD = {"name": "kd", "ce_weight": 0.5, "kd_weight": 0.5, "dice_weight": 1.0}
FOREGROUND = {"pixel_weight": "foreground", "background_weight": 0.1}
#: segmentation_kd.py's growing TA: unet2d base 16, depth 2, grown from the student's width in 3 steps
GROWING = {
    "name": "growing_ta",
    "ce_weight": 0.5,
    "kd_weight": 0.5,
    "dice_weight": 1.0,
    "ta": {"name": "unet2d", "kwargs": {"base": 16, "depth": 2}},
    "grow_epochs": 3,
}
VARIANTS: dict[str, dict | None] = {
    "alone": None,
    "kd": {**KD, "temperature": 4.0},
    "kd_T1": {**KD, "temperature": 1.0},
    "fg_T4": {**KD, "temperature": 4.0, **FOREGROUND},
    "fg_T2": {**KD, "temperature": 2.0, **FOREGROUND},
    "fg_T1": {**KD, "temperature": 1.0, **FOREGROUND},
    "fgc_T4": {**KD, "temperature": 4.0, **FOREGROUND, "select": "correct"},
    "growing_ta": {**GROWING, "temperature": 4.0},
    "growing_ta_fg_T4": {**GROWING, "temperature": 4.0, **FOREGROUND},
}


def recipe(variant: str, seed: int, args) -> dict:
    method = VARIANTS[variant]
    options = {"canvas": 40, "max_digits": 2, "train_size": 1000, "test_size": 300}
    return {
        "name": f"{variant}_s{seed}",
        "seed": seed,
        "data": {"name": "seg_mnist", "root": args.root, "augment": False, "options": options},
        "student": {"name": "unet2d", "kwargs": {"base": 8, "depth": 2}},
        "teachers": [] if method is None else [{"checkpoint": args.teacher}],
        "method": {"name": "ce", "dice_weight": 1.0} if method is None else method,
        "train": {
            "epochs": args.epochs,
            "batch_size": 16,
            "optimizer": {"name": "adam", "lr": 0.003, "weight_decay": 0.0},
            "scheduler": {"name": "cosine"},
            "progress": "none",
            "eval_every": 15,
            "num_threads": 1,
            "compile": False,
        },
    }


def finished(summary: Path) -> bool:
    """A run counts once its summary says it finished (a running or failed run writes one too)."""
    return summary.is_file() and json.loads(summary.read_text()).get("status") == "finished"


def spread(values: list[float]) -> str:
    return f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["alone", "kd", "fg_T4"], choices=sorted(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=45)
    parser.add_argument("--teacher", default="runs/segmentation_kd/2d/teacher/checkpoints/model_last.pt")
    parser.add_argument("--root", default=str(ROOT.parent / "data"))
    parser.add_argument("--work", default="runs/segmentation_pixel_kd")
    parser.add_argument("--table-only", action="store_true", help="tabulate finished runs, train nothing new")
    parser.add_argument("--record", action="store_true", help="write benchmarks/records/segmentation/pixel_kd.json")
    args = parser.parse_args()
    rows: dict[str, dict[int, dict]] = {}
    for variant in args.variants:
        for seed in args.seeds:
            out = Path(args.work) / f"{variant}_s{seed}"
            summary = out / "summary.json"
            if not finished(summary):
                if args.table_only:
                    continue
                started = time.time()
                Trainer(build_config(recipe(variant, seed, args)), out).fit()
                print(f"  {variant} seed {seed}: {time.time() - started:.0f} s", flush=True)
            rows.setdefault(variant, {})[seed] = json.loads(summary.read_text())["final"]["test"]
    table = ["| variant | dice (%) | mIoU (%) | seeds | dice per seed |", "|---|---|---|---|---|"]
    for variant, by_seed in rows.items():
        dice = [r["dice"] for r in by_seed.values()]
        miou = [r["miou"] for r in by_seed.values()]
        per_seed = " / ".join(f"{r['dice']:.2f}" for r in by_seed.values())
        table.append(
            f"| {variant} | {statistics.mean(dice):.2f}{spread(dice)} | {statistics.mean(miou):.2f}{spread(miou)} | "
            f"{', '.join(map(str, by_seed))} | {per_seed} |"
        )
    print("\n".join(table))
    if args.record:
        out_file = ROOT / "records" / "segmentation" / "pixel_kd.json"
        out_file.parent.mkdir(parents=True, exist_ok=True)
        record = {v: {str(s): {"dice": r["dice"], "miou": r["miou"]} for s, r in b.items()} for v, b in rows.items()}
        settings = {"epochs": args.epochs, "variants": {v: VARIANTS[v] for v in rows}}
        out_file.write_text(json.dumps({"settings": settings, "rows": record}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Segmentation KD across a growing teacher-student gap: teacher, student alone, KD, TAKD, growing TA.

The setting of GTAN (Xu et al., Phys. Med. Biol. 2021: KD for real-time 3-D liver segmentation with
a growing teacher assistant, students at 8% and 2% of the teacher's parameters), scaled to a
2-core CPU: ``seg_mnist`` (real MNIST digits on 40x40 canvases, 1-2 digits, 11 classes per pixel;
``--dims 3``: ``seg3d_mnist`` volumes) and small U-Nets:

* teacher ``unet2d`` base 14, depth 3 (345k parameters), trained once (seed 0) on 2,000 canvases for
  12 epochs (batch 32) with CE + Dice;
* students base 8 / depth 2 (27.7k, 8.0% of the teacher) and base 4 / depth 2 (7.1k, 2.0%), trained
  on the first 1,000 of those canvases for 15 epochs (batch 16, Adam 3e-3, cosine);
* the assistant (TAKD's TA, and the growing TA's final size): base 16 / depth 2 (110k, 32%), the
  students' topology.

Every student run uses the same loss, ``0.5 (CE + Dice) + 0.5 T^2 mean_pixels KL_T`` (T = 4);
only the soft targets' source differs: ``kd`` distils the teacher directly (TAKD's BLKD baseline),
``takd`` the TA (trained once, seed 0, from the teacher with the same loss and budget),
``growing_ta`` a TA that starts at the student's width and grows in 3 equal steps to base 16 while
it learns from the teacher, all in one run. ``ce`` is the student alone (CE + Dice). Final-epoch
test dice (mean over the ten digit classes) and mIoU (all 11 classes) in %, on 300 test canvases
(the teacher's row: its own run's 400, whose first 300 are the students'), mean ± std over seeds;
parameters, share of the teacher and CPU latency per sample (batch 1, one thread, least of 3 medians of 20)
beside every row.

    python benchmarks/segmentation_kd.py --seeds 0 1 2 [--record]

Runs are sequential in one process (``OMP_NUM_THREADS=1`` recommended on a shared machine);
finished runs under ``--work`` are reused, so seeds can be added later.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from kdforge.config import build_config
from kdforge.engine.trainer import Trainer
from kdforge.models import count_parameters, create, measure_latency

ROOT = Path(__file__).resolve().parent
#: (base, depth) of the U-Nets: teacher 345k, assistant 110k (32%), students 27.7k (8.0%) and 7.1k (2.0%)
TEACHER, ASSISTANT, STUDENTS = (14, 3), (16, 2), ((8, 2), (4, 2))
LOSS = {"temperature": 4.0, "kd_weight": 0.5, "ce_weight": 0.5, "dice_weight": 1.0}
TAKD = {"name": "takd", "weight": 0.5, "temperature": 4.0, "reduction": "batchmean", "dice_weight": 1.0}


def data_config(dims: int, train_size: int, test_size: int, root: str) -> dict:
    if dims == 2:
        options = {"canvas": 40, "max_digits": 2, "train_size": train_size, "test_size": test_size}
        return {"name": "seg_mnist", "root": root, "augment": False, "options": options}
    options = {"depth": 16, "canvas": 32, "max_digits": 2, "train_size": train_size, "test_size": test_size}
    return {"name": "seg3d_mnist", "root": root, "augment": False, "options": options}


def recipe(name, dims, net, method, teachers, seed, args, teacher=False) -> dict:
    epochs = args.teacher_epochs if teacher else args.epochs
    size = args.teacher_train_size if teacher else args.train_size
    test_size = args.teacher_test_size if teacher else args.test_size
    return {
        "name": name,
        "seed": seed,
        "data": data_config(dims, size, test_size, args.root),
        "student": {"name": f"unet{dims}d", "kwargs": {"base": net[0], "depth": net[1]}},
        "teachers": [{"checkpoint": path} for path in teachers],
        "method": method,
        "train": {
            "epochs": epochs,
            "batch_size": 32 if teacher else args.batch_size,
            "optimizer": {"name": "adam", "lr": 0.003, "weight_decay": 0.0},
            "scheduler": {"name": "cosine"},
            "progress": "none",
            "eval_every": epochs,
        },
    }


def train(config: dict, out: Path, table_only: bool = False) -> dict | None:
    summary_path = out / "summary.json"
    if summary_path.is_file():  # reruns reuse finished runs
        return json.loads(summary_path.read_text())
    if table_only:
        return None
    started = time.time()
    summary = Trainer(build_config(config), out).fit()
    dice = summary["final"]["test"]["dice"]
    print(f"  {config['name']}: dice {dice:.2f} ({time.time() - started:.0f} s)", flush=True)
    return summary


@functools.cache
def footprint(dims: int, net: tuple[int, int]) -> tuple[int, float]:
    """Parameters and CPU ms per sample (batch 1, one thread): the least of 3 medians of 20 forwards,
    which is the steadiest figure on a shared machine."""
    model = create(f"unet{dims}d", num_classes=11, in_channels=1, base=net[0], depth=net[1])
    shape = (1, 40, 40) if dims == 2 else (1, 16, 32, 32)
    torch.set_num_threads(1)
    latency = min(measure_latency(model.eval(), shape, 1, warmup=3, repeats=20, num_threads=1) for _ in range(3))
    return count_parameters(model), 1000.0 * latency


def spread(values: list[float]) -> str:
    return f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=300)
    parser.add_argument("--teacher-test-size", type=int, default=400)
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--teacher-train-size", type=int, default=2000)
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--root", default=str(ROOT.parent / "data"))
    parser.add_argument("--work", default="runs/segmentation_kd")
    parser.add_argument("--methods", nargs="+", default=["ce", "kd", "takd", "growing_ta"])
    parser.add_argument(
        "--students", nargs="+", default=[f"{b}x{d}" for b, d in STUDENTS], help="student U-Nets as BASExDEPTH"
    )
    parser.add_argument("--table-only", action="store_true", help="tabulate finished runs, train nothing new")
    parser.add_argument("--record", action="store_true", help="write benchmarks/records/segmentation/<dims>d.json")
    args = parser.parse_args()
    work = Path(args.work) / f"{args.dims}d"
    dims = args.dims

    alone = {"name": "ce", "dice_weight": 1.0}
    teacher = train(recipe("teacher", dims, TEACHER, alone, [], 0, args, teacher=True), work / "teacher")
    assert teacher is not None
    teacher_file = str(work / "teacher" / "checkpoints" / "model_last.pt")
    rows: dict[str, list[dict]] = {"teacher": [teacher["final"]["test"]]}
    nets = {"teacher": TEACHER}
    if "takd" in args.methods:
        assistant = train(recipe("assistant", dims, ASSISTANT, TAKD, [teacher_file], 0, args), work / "assistant")
        assert assistant is not None
        rows["assistant (TAKD hop 1)"] = [assistant["final"]["test"]]
        nets["assistant (TAKD hop 1)"] = ASSISTANT
    ta_file = str(work / "assistant" / "checkpoints" / "model_last.pt")
    grown = {"name": f"unet{dims}d", "kwargs": {"base": ASSISTANT[0], "depth": ASSISTANT[1]}}
    methods = {
        "ce": (alone, []),
        "kd": ({"name": "kd", **LOSS}, [teacher_file]),
        "takd": (TAKD, [ta_file]),
        "growing_ta": ({"name": "growing_ta", **LOSS, "ta": grown, "grow_epochs": 3}, [teacher_file]),
    }
    students = [tuple(int(v) for v in text.split("x")) for text in args.students]
    for net in students:
        for name in args.methods:
            method, teachers = methods[name]
            for seed in args.seeds:
                tag = f"{name}_b{net[0]}d{net[1]}"
                config = recipe(f"{tag}_s{seed}", dims, net, method, teachers, seed, args)
                run = train(config, work / tag / f"seed{seed}", args.table_only)
                if run is None:
                    continue
                label = f"{name}, student base {net[0]} depth {net[1]}"
                rows.setdefault(label, []).append(run["final"]["test"])
                nets[label] = net

    teacher_params, _ = footprint(dims, TEACHER)
    table = [
        "| run | dice (%) | mIoU (%) | seeds | parameters | % of teacher | CPU ms/sample |",
        "|---|---|---|---|---|---|---|",
    ]
    record = []
    for label, results in rows.items():
        params, latency = footprint(dims, nets[label])
        dice = [r["dice"] for r in results]
        miou = [r["miou"] for r in results]
        table.append(
            f"| {label} | {statistics.mean(dice):.2f}{spread(dice)} | {statistics.mean(miou):.2f}{spread(miou)} | "
            f"{len(results)} | {params:,} | {100 * params / teacher_params:.1f} | {latency:.2f} |"
        )
        record.append({"run": label, "dice": dice, "miou": miou, "parameters": params, "latency_ms": latency})
    print("\n".join(table))
    if args.record:
        out = ROOT / "records" / "segmentation" / f"{dims}d.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k not in ("record", "root", "work", "table_only")}
        out.write_text(json.dumps({"settings": settings, "rows": record}, indent=1) + "\n")


if __name__ == "__main__":
    main()

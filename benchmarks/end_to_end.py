"""End-to-end training throughput of ``kdforge train``: student alone, live KD, banked KD, methods.

Each variant is one real ``kdforge train`` process (CIFAR-10, resnet20 -> resnet8, batch 128, one
thread), run in interleaved rounds so machine noise hits every variant alike. Per run it reads:

* ``train images/s``: the run's own figure (metrics.jsonl, epochs after the first, median);
* ``cpu s / 1k images``: the process's CPU time (user + system, from ``getrusage``) per thousand
  training images, start-up and evaluation included: with one thread this is close to the work done
  whatever else the machine runs, so it is the steadier figure on a shared machine;
* ``wall s``: the whole process, start-up, data loading and evaluation included.

Ratios are to the student alone of the same round (median over rounds). The banked run replays a
bank stored beforehand by ``kdforge teacher-bank`` (its cost is reported separately: it is paid once
per seed and augmentation).

    python benchmarks/end_to_end.py --root data [--rounds 3] [--epochs 3] [--subset 5000]
        [--methods fitnet,crd] [--record]

Targets: banked KD >= 0.95x the student alone, live KD >= 0.95x the physical limit (student step +
teacher forward, see benchmarks/throughput.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TEACHER = HERE / "teachers" / "cifar10_resnet20.pt"


def recipe(root: str, subset: int, epochs: int, method: dict, teachers: bool, bank: str | None) -> dict:
    data: dict = {
        "name": "endtoend",
        "data": {"name": "cifar10", "root": root, "train_subset": subset},
        "student": {"name": "resnet8"},
        "method": method,
        "train": {
            "epochs": epochs,
            "batch_size": 128,
            "num_threads": 1,
            "progress": "none",
            "eval_every": 1000,  # evaluated once, at the end, in every variant alike
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
            "scheduler": {"name": "onecycle"},
        },
    }
    if teachers:
        data["teachers"] = [{"checkpoint": str(TEACHER)}]
    if bank:
        data["teacher_bank"] = {"enabled": True, "directory": bank}
    return data


def run(recipe_data: dict, folder: Path, label: str) -> dict[str, float]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{label}.yaml"
    path.write_text(yaml.safe_dump(recipe_data))
    out = folder / label
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "kdforge", "train", str(path), "--out", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [line["train"]["images_per_second"] for line in lines[1:]] or [lines[0]["train"]["images_per_second"]]
    images = sum(1 for _ in lines) * recipe_data["data"]["train_subset"]
    summary = json.loads((out / "summary.json").read_text())
    return {
        "images_per_second": statistics.median(speeds),
        "cpu_per_1k": 1000 * cpu / images,
        "wall": wall,
        "top1": summary["final"]["test"]["top1"],
    }


TEACHER_FORWARD = """
import resource, sys, time
import torch
from kdforge.compress.fold import fold_frozen_teachers
from kdforge.core.allocator import tune_allocator
from kdforge.models import create
tune_allocator("auto", "cpu")  # as kdforge train
torch.set_num_threads(1)
teacher = create("resnet20", num_classes=10).eval().requires_grad_(False)
fold_frozen_teachers([teacher], trained=[])
teacher.to(memory_format=torch.channels_last)
x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    for _ in range(3):
        teacher(x)
    started, steps = time.perf_counter(), 20
    for _ in range(steps):
        teacher(x)
print(128 * steps / (time.perf_counter() - started))
"""


def teacher_images_per_second() -> float:
    """The resnet20 teacher's inference forward as ``kdforge train`` runs it (BatchNorm folded,
    channels_last, batch 128, one thread): the other half of live KD's physical limit."""
    done = subprocess.run([sys.executable, "-c", TEACHER_FORWARD], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data", help="folder holding cifar-10-batches-py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=5000, help="training images (class-balanced)")
    parser.add_argument("--methods", default="", help="comma-separated further methods to run live (e.g. fitnet,crd)")
    parser.add_argument(
        "--system-allocator",
        action="store_true",
        help="also run the student alone and live KD with train.allocator: system (glibc's defaults)",
    )
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if not (Path(args.root) / "cifar-10-batches-py").is_dir():
        sys.exit(f"no CIFAR-10 under '{args.root}'; pass --root (python ../shared/tools/materialize_datasets.py data)")

    kd = {"name": "kd", "temperature": 4, "kd_weight": 0.9, "ce_weight": 0.1}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bank_dir = str(folder / "bank")
        variants = {
            "student alone": recipe(args.root, args.subset, args.epochs, {"name": "ce"}, False, None),
            "kd live": recipe(args.root, args.subset, args.epochs, kd, True, None),
            "kd banked": recipe(args.root, args.subset, args.epochs, kd, True, bank_dir),
        }
        if args.system_allocator:  # the same runs with glibc's allocator as it comes (train.allocator: system)
            for name in ("student alone", "kd live"):
                system = json.loads(json.dumps(variants[name]))
                system["train"]["allocator"] = "system"
                variants[f"{name}, allocator system"] = system
        for name in filter(None, args.methods.split(",")):
            variants[f"{name} live"] = recipe(args.root, args.subset, args.epochs, {"name": name}, True, None)

        # store the bank once (what a suite does before its first banked run)
        (folder / "bank.yaml").write_text(yaml.safe_dump(variants["kd banked"]))
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "kdforge", "teacher-bank", str(folder / "bank.yaml"), "--directory", bank_dir],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        bank_seconds = time.perf_counter() - started

        results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        teacher_speeds: list[float] = []
        for r in range(args.rounds):
            for name, data in variants.items():
                results[name].append(run(data, folder / f"round{r}", name.replace(" ", "_")))
                print(f"round {r} {name}: {results[name][-1]}", flush=True)
            teacher_speeds.append(teacher_images_per_second())
            print(f"round {r} teacher forward: {teacher_speeds[-1]:.0f} images/s", flush=True)

    base = results["student alone"]
    rows = [
        "| variant | train images/s | ratio | cpu s / 1k images | ratio (alone / variant) | wall s | top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        ips = statistics.median(x["images_per_second"] for x in runs)
        ratio = statistics.median(x["images_per_second"] / b["images_per_second"] for x, b in zip(runs, base))
        cpu = statistics.median(x["cpu_per_1k"] for x in runs)
        cpu_ratio = statistics.median(b["cpu_per_1k"] / x["cpu_per_1k"] for x, b in zip(runs, base))
        wall = statistics.median(x["wall"] for x in runs)
        top1 = statistics.median(x["top1"] for x in runs)
        rows.append(f"| {name} | {ips:.0f} | {ratio:.3f} | {cpu:.2f} | {cpu_ratio:.3f} | {wall:.0f} | {top1:.2f} |")
    # live KD's physical limit: the student-alone run's whole training step (loading and
    # augmentation included) plus the teacher's inference forward, per image, same round
    limits = [1 / (1 / b["images_per_second"] + 1 / t) for b, t in zip(base, teacher_speeds)]
    live = results["kd live"]
    limit_ratio = statistics.median(x["images_per_second"] / lim for x, lim in zip(live, limits))
    rows.append("")
    rows.append(
        f"Teacher forward (resnet20, folded, channels_last, batch 128): "
        f"{statistics.median(teacher_speeds):.0f} images/s; live KD's limit (1 / (1/alone + 1/teacher)): "
        f"{statistics.median(limits):.0f} images/s; **kd live / limit = {limit_ratio:.3f}** (target >= 0.95)"
    )
    note = (
        f"End to end (`kdforge train`, CIFAR-10 {args.subset} images, {args.epochs} epochs, resnet20 -> resnet8, "
        f"batch 128, 1 thread, {args.rounds} interleaved rounds, medians); storing the bank once took "
        f"{bank_seconds:.0f} s"
    )
    table = "\n".join([note, "", *rows])
    print(table)
    if args.record:
        with (HERE / "RESULTS.md").open("a") as f:
            f.write(f"\n### End-to-end throughput ({time.strftime('%Y-%m-%d')})\n\n{table}\n")


if __name__ == "__main__":
    main()

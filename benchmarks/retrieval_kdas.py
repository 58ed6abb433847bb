"""Retrieval on held-out classes, and KD-guided architecture search (KDAS-ReID's recipe), on MNIST.

Data: ``retrieval_mnist``: train on digits 0-4 (a seeded class-balanced subset), rank the official
test images of digits 5-9 (100 queries per digit against a gallery of the rest). Digits stand in
for person identities; the numbers measure methods against each other, not re-ID accuracy.

Part ``retrieval``: teacher ``embed_cnn`` (width 1, 64-d embedding) trained with ``metric`` (CE +
batch-hard triplet); students ``embed_cnn`` (width 0.25, 32-d): alone with CE, alone with CE +
triplet, RKD on the embedding, KD at fixed T = 4, KD with T annealed 10 -> 1 (exponential, by
epoch). Every run uses P x K batches (5 digits x 8 images) and SGD with a cosine schedule.

Part ``search``: ``kdforge search`` (first-order DARTS; 3 cells of 3 nodes, 4 channels) on the
same training subset with objective CE, KD at T = 4, and KD annealed 10 -> 1, from the teacher
above (a finished search in ``--out`` is reused); each derived ``darts_net`` (``--derived-channels``,
4 cells) is then trained with annealed KD, beside a hand-designed ``embed_cnn`` whose width gives
about the same parameter count, all with the gradient norm clipped at ``--grad-clip`` (5, DARTS's
setting: without it one searched network's KD loss exploded at lr 0.05).

Reported per run: final-epoch rank-1 and mAP (%) on the held-out digits, parameters and CPU
latency (batch 1, one thread, median of 20). One training process at a time.

    python benchmarks/retrieval_kdas.py --out runs/bench-retrieval [--seeds 0 1 2] [--parts retrieval search]
        [--search-seeds 0 1 2] [--objectives ce kd_fixed kd_annealed]
        [--dataset retrieval_cifar10]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from kdforge.compress.arch import load_model_file
from kdforge.config import build_config
from kdforge.engine.search import SearchRecipe, run_search
from kdforge.engine.trainer import Trainer
from kdforge.models import count_parameters, create, measure_latency

DATASET = {"name": "retrieval_mnist", "input": (1, 28, 28)}


def data(root: str, subset: int) -> dict:
    return {
        "name": DATASET["name"],
        "root": root,
        "train_subset": subset,
        "augment": False,
        "sampler": {"name": "pk", "k": 8},
    }


def train_settings(epochs: int) -> dict:
    return {
        "epochs": epochs,
        "batch_size": 40,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "scheduler": {"name": "cosine"},
        "progress": "none",
    }


ANNEALED = {"kind": "exponential", "start": 10, "end": 1, "by": "epoch"}
STUDENT = {"name": "embed_cnn", "kwargs": {"width": 0.25, "dim": 32}}
TEACHER = {"name": "embed_cnn", "kwargs": {"width": 1.0, "dim": 64}}
METHODS = {
    "student alone (CE)": {"name": "ce"},
    "student alone (CE + triplet)": {"name": "metric"},
    "RKD on the embedding": {"name": "rkd", "student_layers": ["embedding"]},
    "KD, T = 4": {"name": "kd", "temperature": 4},
    "KD, T annealed 10 -> 1": {"name": "kd", "temperature": ANNEALED},
}


def run(recipe: dict, out: Path) -> dict:
    started = time.perf_counter()
    summary = Trainer(build_config(recipe), out).fit()
    model, _ = load_model_file(out / "checkpoints" / "model_last.pt")
    test = summary["final"]["test"]
    return {
        "rank1": test["rank1"],
        "map": test["map"],
        "parameters": count_parameters(model),
        "latency_ms": 1000 * measure_latency(model, DATASET["input"], batch_size=1, repeats=20, num_threads=1),
        "seconds": time.perf_counter() - started,
    }


def retrieval_part(args, teacher_file: Path, results: dict) -> None:
    for seed in args.seeds:
        for number, (label, method) in enumerate(METHODS.items()):
            recipe = {
                "name": f"{label}-{seed}",
                "seed": seed,
                "data": data(args.root, args.subset),
                "student": STUDENT,
                "method": method,
                "train": train_settings(args.epochs),
            }
            if method["name"] != "ce" and method["name"] != "metric":
                recipe["teachers"] = [{"checkpoint": str(teacher_file)}]
            row = run(recipe, args.out / "retrieval" / f"{number}-{method['name']}-seed{seed}")
            results.setdefault(label, []).append(row)
            print(f"{label} seed {seed}: rank-1 {row['rank1']:.2f} mAP {row['map']:.2f} ({row['seconds']:.0f} s)")


def matching_width(parameters: int) -> float:
    widths = [w / 100 for w in range(10, 101)]
    channels = DATASET["input"][0]
    return min(
        widths, key=lambda w: abs(count_parameters(create("embed_cnn", 5, channels, width=w, dim=32)) - parameters)
    )


def search_part(args, teacher_file: Path, results: dict) -> None:
    """For each seed in ``--search-seeds``: a search per objective, each genotype trained with annealed
    KD, and a hand-designed ``embed_cnn`` of the same parameter count as the ``kd_annealed`` genotype
    (or the first objective's) trained alike. Seed 0 keeps the folders of the first runs."""
    every = {"ce": {}, "kd_fixed": {"temperature": 4.0}, "kd_annealed": {"temperature_start": 10.0}}
    objectives = {name: every[name] for name in args.objectives}
    for seed in args.search_seeds:
        tag = "" if seed == 0 else f"-seed{seed}"
        searched: dict[str, int] = {}
        for objective, extra in objectives.items():
            recipe = SearchRecipe.model_validate(
                {
                    "name": f"search-{objective}{tag}",
                    "seed": seed,
                    "data": {k: v for k, v in data(args.root, args.subset).items() if k != "sampler"},
                    "teacher": {"checkpoint": str(teacher_file)},
                    "search": {
                        "objective": objective,
                        "epochs": args.search_epochs,
                        "batch_size": 32,
                        "max_batches": args.search_batches,
                        "channels": 4,
                        "layers": 3,
                        "steps": 3,
                        "eval_samples": 500,
                        **extra,
                    },
                    "derived": {"channels": args.derived_channels, "layers": 4},
                }
            )
            folder = args.out / "search" / f"{objective}{tag}"
            done = folder / "search_summary.json"
            summary = json.loads(done.read_text()) if done.is_file() else run_search(recipe, folder)
            student = {
                "name": "darts_net",
                "kwargs": {"genotype": summary["genotype"], "channels": args.derived_channels, "layers": 4},
            }
            label = f"searched (search objective {objective}) + annealed KD"
            row = run(
                {
                    "name": f"{label}{tag}",
                    "seed": seed,
                    "data": data(args.root, args.subset),
                    "student": student,
                    "teachers": [{"checkpoint": str(teacher_file)}],
                    "method": {"name": "kd", "temperature": ANNEALED},
                    "train": {**train_settings(args.epochs), "grad_clip": args.grad_clip},
                },
                args.out / "search" / f"train-{objective}-clip{args.grad_clip:g}{tag}",
            )
            row["search_seconds"] = summary["search_seconds"]
            row["genotype"] = summary["genotype"]
            row["seed"] = seed
            searched[objective] = row["parameters"]
            results.setdefault(label, []).append(row)
            print(
                f"{label} seed {seed}: rank-1 {row['rank1']:.2f} mAP {row['map']:.2f}, {row['parameters']:,} parameters"
            )
        reference = "kd_annealed" if "kd_annealed" in searched else next(iter(searched))
        width = matching_width(searched[reference])
        label = f"hand-designed embed_cnn (width matched to the {reference} genotype) + annealed KD"
        row = run(
            {
                "name": f"hand{tag}",
                "seed": seed,
                "data": data(args.root, args.subset),
                "student": {"name": "embed_cnn", "kwargs": {"width": width, "dim": 32}},
                "teachers": [{"checkpoint": str(teacher_file)}],
                "method": {"name": "kd", "temperature": ANNEALED},
                "train": {**train_settings(args.epochs), "grad_clip": args.grad_clip},
            },
            args.out / "search" / f"train-hand-clip{args.grad_clip:g}{tag}",
        )
        row["width"], row["seed"] = width, seed
        results.setdefault(label, []).append(row)
        print(f"{label} seed {seed} (width {width}): rank-1 {row['rank1']:.2f} mAP {row['map']:.2f}")


def table(results: dict) -> str:
    lines = [
        "| run | seeds | rank-1 (%) | mAP (%) | parameters | CPU latency (ms, batch 1) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, rows in results.items():

        def cell(key: str, rows: list = rows) -> str:
            values = [r[key] for r in rows]
            if len(values) == 1:
                return f"{values[0]:.2f}"
            return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

        lines.append(
            f"| {label} | {len(rows)} | {cell('rank1')} | {cell('map')} | {rows[0]['parameters']:,} | "
            f"{statistics.median(r['latency_ms'] for r in rows):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/work/main/data")
    parser.add_argument("--dataset", choices=["retrieval_mnist", "retrieval_cifar10"], default="retrieval_mnist")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-retrieval"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--subset", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--search-epochs", type=int, default=4)
    parser.add_argument("--search-batches", type=int, default=30)
    parser.add_argument("--derived-channels", type=int, default=8)
    parser.add_argument(
        "--grad-clip", type=float, default=5.0, help="gradient-norm clip when training the searched and hand students"
    )
    parser.add_argument("--parts", nargs="+", choices=["retrieval", "search"], default=["retrieval", "search"])
    parser.add_argument("--search-seeds", type=int, nargs="+", default=[0], help="seeds of the search part")
    parser.add_argument(
        "--objectives", nargs="+", choices=["ce", "kd_fixed", "kd_annealed"], default=["ce", "kd_fixed", "kd_annealed"]
    )
    args = parser.parse_args()
    DATASET.update(name=args.dataset, input=(1, 28, 28) if args.dataset == "retrieval_mnist" else (3, 32, 32))
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    results: dict = {}
    teacher_dir = args.out / "teacher"
    teacher_file = teacher_dir / "checkpoints" / "model_last.pt"
    teacher_recipe = {
        "name": "teacher",
        "seed": 0,
        "data": data(args.root, args.subset),
        "student": TEACHER,
        "method": {"name": "metric"},
        "train": train_settings(args.epochs),
    }
    if teacher_file.is_file():
        results["teacher (embed_cnn width 1, CE + triplet)"] = json.loads((teacher_dir / "bench.json").read_text())
    else:
        row = run(teacher_recipe, teacher_dir)
        (teacher_dir / "bench.json").write_text(json.dumps([row]))
        results["teacher (embed_cnn width 1, CE + triplet)"] = [row]
    print(f"teacher: {results['teacher (embed_cnn width 1, CE + triplet)']}")
    if "retrieval" in args.parts:
        retrieval_part(args, teacher_file, results)
    if "search" in args.parts:
        search_part(args, teacher_file, results)
    (args.out / f"results-{'-'.join(args.parts)}.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()

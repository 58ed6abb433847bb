"""Cross-modal distillation on 2 CPU cores: a sensor upgrade with few labels, and spoken <-> written digits.

``sensor`` (sensor-modality transition KD, Van Molle et al., Sensors 2021): ``sensor_mnist`` with the
``gray_edge`` sensor model. A LeNet teacher is trained on the old sensor (MNIST as it is, all 60,000
labels, 2 epochs); LeNet students on the new sensor get ``k`` labelled images per class
(k = 1, 10, 100, 1000) and are trained alone (``ce``), by constant-alpha KD (``modality_kd``,
alpha 0.9), by annealed KD (alpha linear 0.95 -> 0.1 over the run) and by selective KD (alpha 0.9,
``select: correct``); plus annealed KD with 500 further *unlabelled* paired images per class (KL term
only). Every student run takes the same number of optimizer steps (``--steps``, default 400; batch
min(64, 5 k), Adam 1e-3, cosine), whatever k; the label subset is seeded by the run's seed. Test
top-1 on the 10,000 MNIST test images seen by the new sensor, at the last step (no selection).
``--variants`` adds the other annealing families (``annealed_exp``, ``annealed_cos``,
``annealed_step``: same end points 0.95 -> 0.1) and ``kd+unlabelled``.

``--dataset cifar10`` runs the same protocol on ``sensor_cifar10`` (default sensor model
``spectral``; ``--sensor`` picks another): the old-sensor teacher is the packaged
``benchmarks/teachers/cifar10_resnet20.pt`` (resnet20 trained on all 50,000 RGB training images,
83.93%; ``--teacher`` names another), the students are resnet8 on the new sensor.

``av`` (cross-modal KD between audio and images, CCL, Chen et al., CVPR 2021): ``av_mnist`` (FSDD
recordings, official split, each paired with one MNIST image of its digit: 2,700 train / 300 test).
An audio teacher (``audio_cnn``) and an image teacher (``lenet`` width 2) are trained on their own
input; for each direction (audio -> image: LeNet student on images; image -> audio: audio_cnn width
0.5 on spectrograms) the student is trained alone, by cross-modal KD, by CRD across modalities and by
CCL, all on the full 2,700 labels (``--av-epochs``, default 20; Adam 1e-3, cosine, batch 64; CCL drops
each epoch's partial last batch, whose contrastive softmax would run over 12 samples).
``--av-methods`` and ``--av-directions`` run a subset (cells already in results.json are kept);
``--av-audio-width`` changes the audio student's width (its runs and results key get a ``_w<width>``
suffix, e.g. ``av_w1``).

Runs go to --out (default runs/bench_cross_modal); finished runs are reused. Results print as
markdown tables (mean +- std over the seeds) and are written to --out/results.json; ``--plot`` draws
the label curve.

    python benchmarks/cross_modal.py --part sensor --seeds 0 1 2
    python benchmarks/cross_modal.py --part sensor --dataset cifar10 --root data --steps 1000 --labels 10 100
    python benchmarks/cross_modal.py --part av --seeds 0 1 2
    python benchmarks/cross_modal.py --part av --seeds 0 1 2 3 4 --av-directions 'image->audio' \
        --av-methods alone ccl --av-audio-width 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from kdforge.config import build_config
from kdforge.engine.trainer import Trainer

MNIST_ROOT = "data"
FSDD_ROOT = "../shared/data"
OPTIMIZER = {"name": "adam", "lr": 0.001, "weight_decay": 0.0}
SENSOR_VARIANTS: dict[str, dict[str, Any]] = {
    "alone": {"method": {"name": "ce"}},
    "kd": {"method": {"name": "modality_kd", "kd_weight": 0.9}},
    "annealed": {"method": {"name": "modality_kd"}},  # alpha linear 0.95 -> 0.1 over the steps
    "selective": {"method": {"name": "modality_kd", "kd_weight": 0.9, "select": "correct"}},
    "annealed+unlabelled": {"method": {"name": "modality_kd"}, "unlabelled": True},
    # the other annealing families, same end points (kdforge.core.schedules)
    "annealed_exp": {
        "method": {"name": "modality_kd", "kd_weight": {"kind": "exponential", "start": 0.95, "end": 0.1}}
    },
    "annealed_cos": {"method": {"name": "modality_kd", "kd_weight": {"kind": "cosine", "start": 0.95, "end": 0.1}}},
    "annealed_step": {"method": {"name": "modality_kd", "kd_weight": {"kind": "step", "start": 0.95, "end": 0.1}}},
    "kd+unlabelled": {"method": {"name": "modality_kd", "kd_weight": 0.9}, "unlabelled": True},
    "kd_alpha0.5": {"method": {"name": "modality_kd", "kd_weight": 0.5}},  # a mid constant alpha
}
DEFAULT_VARIANTS = ["alone", "kd", "annealed", "selective", "annealed+unlabelled"]
# dataset -> (default sensor model, student network, teacher network)
SENSOR_DATASETS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "mnist": ("gray_edge", {"name": "lenet"}, {"name": "lenet"}),
    "cifar10": ("spectral", {"name": "resnet8"}, {"name": "resnet20"}),
}
PACKAGED_CIFAR10_TEACHER = Path(__file__).resolve().parent / "teachers" / "cifar10_resnet20.pt"


def train(config: dict[str, Any], out: Path) -> dict[str, Any]:
    """Train (or reuse) one run; returns its summary."""
    summary_path = out / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("status") == "finished":
            return summary
    return Trainer(build_config(config), out, resume=False).fit()


def top1(summary: dict[str, Any]) -> float:
    return float(summary["final"]["test"]["top1"])


def run_config(name: str, data: dict, student: dict, method: dict, epochs: int, batch: int, seed: int, teachers=()):
    # ccl's contrastive softmax runs over the batch: it trains on full batches only (the 12 samples
    # of 2,700 left over at batch 64 are a different random few each epoch)
    drop_last = method["name"] == "ccl"
    return {
        "name": name,
        "seed": seed,
        "data": data,
        "student": student,
        "teachers": list(teachers),
        "method": method,
        "train": {
            "epochs": epochs,
            "batch_size": batch,
            "drop_last": drop_last,
            "optimizer": OPTIMIZER,
            "scheduler": {"name": "cosine"},
            "progress": "none",
            "num_threads": 1,
            "eval_every": epochs,
        },
    }


# ----------------------------------------------------------------------------- sensor upgrade
def sensor_key(args: argparse.Namespace) -> str:
    """results.json key and run folder of one sensor setting (``sensor`` for the original MNIST one)."""
    if args.dataset == "mnist" and args.sensor == "gray_edge":
        return "sensor"
    return f"sensor_{args.dataset}_{args.sensor}"


def sensor_part(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    key = sensor_key(args)
    _, student_net, teacher_net = SENSOR_DATASETS[args.dataset]
    base = {"name": f"sensor_{args.dataset}", "root": args.root, "augment": False}
    base_options = {"sensor": args.sensor}
    if args.teacher:
        # a teacher trained elsewhere on the old sensor (for cifar10: the packaged suite teacher,
        # trained on all 50,000 RGB training images); its top-1 is measured here on the old sensor
        # (the old-sensor input `image` is the dataset's own test set with its own normalisation, so the
        # teacher's recorded test top-1 is its old-sensor accuracy)
        checkpoint = str(args.teacher)
        summary = Path(checkpoint).with_suffix("") / "summary.json"
        teacher_top1 = top1(json.loads(summary.read_text())) if summary.is_file() else float("nan")
    else:
        teacher_run = out / key / "teacher"
        teacher = train(
            run_config(
                f"{key}_teacher",
                {**base, "options": base_options},
                {**teacher_net, "input": "image"},
                {"name": "ce"},
                2,
                128,
                0,
            ),
            teacher_run,
        )
        teacher_top1 = top1(teacher)
        checkpoint = str(teacher_run / "checkpoints" / "model_last.pt")
    results: dict[str, Any] = {
        "dataset": args.dataset,
        "sensor": args.sensor,
        "steps": args.steps,
        "teacher_top1_old_sensor": teacher_top1,
        "cells": {},
    }
    path = out / "results.json"
    if path.is_file():  # keep cells of earlier invocations (other label counts or variants)
        results["cells"] = json.loads(path.read_text()).get(key, {}).get("cells", {})
    for labels in args.labels:
        for variant, setting in SENSOR_VARIANTS.items():
            if variant not in args.variants:
                continue
            scores = []
            for seed in args.seeds:
                options = {**base_options, "labels_per_class": labels, "label_seed": seed}
                options["unlabelled_per_class"] = args.unlabelled if setting.get("unlabelled") else 0
                samples = 10 * (labels + options["unlabelled_per_class"])
                batch = min(64, max(10, 5 * labels))
                steps_per_epoch = -(-samples // batch)
                epochs = max(1, round(args.steps / steps_per_epoch))
                teachers = [] if variant == "alone" else [{"checkpoint": checkpoint, "input": "image"}]
                config = run_config(
                    f"{key}_{variant}_{labels}_s{seed}",
                    {**base, "options": options},
                    {**student_net, "input": "sensor"},
                    setting["method"],
                    epochs,
                    batch,
                    seed,
                    teachers,
                )
                summary = train(config, out / key / f"{variant}_{labels}" / f"seed{seed}")
                scores.append(top1(summary))
                print(f"{key} labels/class {labels:5d} {variant:20s} seed {seed}: {scores[-1]:.2f}", flush=True)
            results["cells"][f"{variant}|{labels}"] = scores
            write(out, key, results)
    return results


# ----------------------------------------------------------------------------- audio <-> image
AV_METHODS = ("alone", "kd", "crd", "ccl")
AV_DIRECTIONS = ("audio->image", "image->audio")


def av_part(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    data = {"name": "av_mnist", "root": args.root, "options": {"audio_root": args.fsdd_root}}
    epochs = args.av_epochs
    teachers = {
        "audio": ({"name": "audio_cnn", "input": "audio"}, out / "av" / "audio_teacher"),
        "image": ({"name": "lenet", "kwargs": {"width": 2}, "input": "image"}, out / "av" / "image_teacher"),
    }
    width = args.av_audio_width
    # runs with a non-default audio student width live beside the default ones, under their own names
    suffix = "" if width == 0.5 else f"_w{width:g}"
    # cells of methods, directions or seeds not run this time are kept from earlier invocations
    path = out / "results.json"
    earlier = json.loads(path.read_text()).get("av" + suffix, {}) if path.is_file() else {}
    results: dict[str, Any] = {"teachers": {}, "cells": dict(earlier.get("cells", {}))}
    for modality, (network, run) in teachers.items():
        results["teachers"][modality] = top1(
            train(run_config(f"av_{modality}_teacher", data, network, {"name": "ce"}, epochs, 64, 0), run)
        )
    students = {
        "audio->image": ({"name": "lenet", "input": "image"}, "audio", 0.5),
        "image->audio": ({"name": "audio_cnn", "kwargs": {"width": width}, "input": "audio"}, "image", 0.1),
    }
    methods = {
        "alone": {"name": "ce"},
        "kd": {"name": "kd"},
        "crd": {"name": "crd", "num_negatives": 1024},
        "ccl": {"name": "ccl"},
    }
    for direction, (student, teacher_input, tau) in students.items():
        if direction not in args.av_directions:
            continue
        tag = direction.replace("->", "_to_") + (suffix if direction == "image->audio" else "")
        checkpoint = str(teachers[teacher_input][1] / "checkpoints" / "model_last.pt")
        for method_name, method in methods.items():
            if method_name not in args.av_methods:
                continue
            if method_name == "ccl":
                method = {**method, "nce_temperature": tau}
            scores = []
            for seed in args.seeds:
                teacher = [] if method_name == "alone" else [{"checkpoint": checkpoint, "input": teacher_input}]
                name = f"av_{tag}_{method_name}_s{seed}"
                run = out / "av" / f"{tag}_{method_name}" / f"seed{seed}"
                scores.append(top1(train(run_config(name, data, student, method, epochs, 64, seed, teacher), run)))
                print(f"av {direction} {method_name:6s} seed {seed}: {scores[-1]:.2f}", flush=True)
            results["cells"][f"{direction}|{method_name}"] = scores
            write(out, "av" + suffix, results)
    return results


# ----------------------------------------------------------------------------- reporting
def write(out: Path, part: str, results: dict[str, Any]) -> None:
    path = out / "results.json"
    everything = json.loads(path.read_text()) if path.is_file() else {}
    everything[part] = results
    # atomic replace: a reader (another invocation on the same --out) never sees a half-written file
    scratch = path.with_name(f".results.{os.getpid()}.json")
    scratch.write_text(json.dumps(everything, indent=2) + "\n")
    os.replace(scratch, path)


def mean_std(scores: list[float]) -> str:
    if len(scores) == 1:
        return f"{scores[0]:.2f}"
    return f"{statistics.mean(scores):.2f} ± {statistics.stdev(scores):.2f}"


def sensor_table(results: dict[str, Any]) -> str:
    cells = results["cells"]
    labels = sorted({int(key.split("|")[1]) for key in cells})
    variants = [v for v in SENSOR_VARIANTS if any(key.startswith(f"{v}|") for key in cells)]
    lines = ["| labels / class | " + " | ".join(variants) + " |", "| ---: |" + " ---: |" * len(variants)]
    for k in labels:
        row = [mean_std(cells[f"{v}|{k}"]) if f"{v}|{k}" in cells else "" for v in variants]
        lines.append(f"| {k} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def av_table(results: dict[str, Any]) -> str:
    cells = results["cells"]
    methods = ["alone", "kd", "crd", "ccl"]
    lines = ["| direction | " + " | ".join(methods) + " |", "| --- |" + " ---: |" * len(methods)]
    for direction in ("audio->image", "image->audio"):
        row = [mean_std(cells[f"{direction}|{m}"]) if f"{direction}|{m}" in cells else "" for m in methods]
        lines.append(f"| {direction} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path, title: str, variants: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for variant in SENSOR_VARIANTS:
        if variant not in variants:
            continue
        points = sorted((int(k.split("|")[1]), v) for k, v in cells.items() if k.startswith(f"{variant}|"))
        if not points:
            continue
        xs = [p[0] for p in points]
        means = [statistics.mean(p[1]) for p in points]
        errors = [statistics.stdev(p[1]) if len(p[1]) > 1 else 0.0 for p in points]
        axis.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=variant)
    axis.set_xscale("log")
    axis.set_xlabel("labelled new-sensor images per class")
    axis.set_ylabel("test top-1 (%)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["sensor", "av", "both"], default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(SENSOR_VARIANTS))
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps of every sensor student run")
    parser.add_argument("--dataset", choices=list(SENSOR_DATASETS), default="mnist", help="sensor part: the scene")
    parser.add_argument("--sensor", help="new sensor's model (default: gray_edge for mnist, spectral for cifar10)")
    parser.add_argument("--unlabelled", type=int, default=500, help="unlabelled pairs per class (+unlabelled variants)")
    parser.add_argument(
        "--teacher",
        type=Path,
        help="old-sensor teacher checkpoint (default: trained here for mnist; the packaged "
        "benchmarks/teachers/cifar10_resnet20.pt for cifar10)",
    )
    parser.add_argument("--av-epochs", type=int, default=20)
    parser.add_argument("--av-methods", nargs="+", default=list(AV_METHODS), choices=list(AV_METHODS))
    parser.add_argument("--av-directions", nargs="+", default=list(AV_DIRECTIONS), choices=list(AV_DIRECTIONS))
    parser.add_argument(
        "--av-audio-width", type=float, default=0.5, help="image->audio student's audio_cnn width (0.5: 6.6k params)"
    )
    parser.add_argument("--mnist-root", "--root", dest="root", default=MNIST_ROOT, help="MNIST / CIFAR-10 folder")
    parser.add_argument("--fsdd-root", default=FSDD_ROOT)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_cross_modal"))
    parser.add_argument(
        "--plot", type=Path, help="write the label curve (png): --variants at every label count in results.json"
    )
    args = parser.parse_args()
    args.sensor = args.sensor or SENSOR_DATASETS[args.dataset][0]
    if args.dataset == "cifar10" and args.teacher is None:
        args.teacher = PACKAGED_CIFAR10_TEACHER
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part in ("sensor", "both"):
        results = sensor_part(args, args.out)
        print(f"\nteacher on the old sensor: {results['teacher_top1_old_sensor']:.2f}\n")
        print(sensor_table(results))
        if args.plot:
            student = SENSOR_DATASETS[args.dataset][1]["name"]
            plot(results, args.plot, f"sensor_{args.dataset} ({args.sensor}): {student} student", args.variants)
    if args.part in ("av", "both"):
        results = av_part(args, args.out)
        print(f"\nteachers: {results['teachers']}\n")
        print(av_table(results))


if __name__ == "__main__":
    main()

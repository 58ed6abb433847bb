"""Adversarial robustness on 2 CPU cores: robust teacher, robust students, robust pruning.

For MNIST (eps 0.3) and a class-balanced CIFAR-10 subset (eps 8/255), one table each with clean,
FGSM and PGD-20 top-1 (L-inf, random start, step 2.5 eps / 20) on a seeded class-balanced subset of the test set
(``kdforge.data.splits.evaluation_subset``; the shared CIFAR-10 test set is stored in class order) of:

* the robust teacher (``adv_ce``, Madry PGD training; on CIFAR-10 fine-tuned from the kept natural
  resnet20, benchmarks/teachers/cifar10_resnet20.pt),
* the student trained naturally (``ce``), adversarially (``adv_ce``), by plain KD from the robust
  teacher (``kd``), by ``ard`` and by ``fast_ard`` (free replays, epochs divided by the replays);

then, on MNIST, robust accuracy against sparsity: ``robust_prune`` (projection onto each target
sparsity, adversarial KD from the robust teacher, starting from the adversarially trained student,
last epoch a masked fine-tune; plus the L1 prox at a few rho) beside magnitude pruning of the
naturally trained student (the same schedule with natural training and no teacher), with the
compression rate (dense / non-zero parameters) and computation rate (dense / remaining FLOPs).

Data: data/MNIST/raw and data/cifar-10-batches-py (python ../shared/tools/materialize_datasets.py data).
Runs go to --out (default runs/bench_robust/{full,quick}); finished runs are reused, interrupted
ones resumed, so the command can simply be run again after an interruption.

    python benchmarks/robust.py --quick                 # tiny settings, a few minutes: checks the wiring
    python benchmarks/robust.py [--only mnist cifar10 prune] [--record]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from kdforge.config import ModelConfig, build_config
from kdforge.data import load_dataset
from kdforge.engine.build import build_model
from kdforge.engine.trainer import Trainer
from kdforge.methods.robust_prune import compression_report
from kdforge.robust import robust_evaluate

ROOT = Path(__file__).resolve().parents[1]
DATA = str(ROOT / "data")
CIFAR_TEACHER = str(ROOT / "benchmarks" / "teachers" / "cifar10_resnet20.pt")
SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
ADAM = {"name": "adam", "lr": 1e-3, "weight_decay": 0.0}

# Per dataset: networks, data size, training attack (PGD-k, random start), epochs, evaluation size.
FULL: dict[str, dict[str, Any]] = {
    # MNIST at eps 0.3 from scratch: SGD (lr 0.05, one-cycle) collapsed to a constant prediction in a
    # short trial; Adam with the eps warm-up learned (70 % clean / 18 % PGD-20 after 470 steps), so the
    # full run uses the whole training set for ~2,800-3,750 steps.
    "mnist": {
        "data": {"name": "mnist", "root": DATA},
        "teacher": {"name": "lenet", "kwargs": {"width": 2}},
        "student": {"name": "lenet", "kwargs": {"width": 1}},
        "eps": 0.3,
        "train_steps": 5,
        "train_step_size": 0.1,
        "eps_ramp": 0.3,
        "teacher_epochs": 8,
        "epochs": 6,
        "natural_epochs": 3,
        "optimizer": ADAM,
        "scheduler": "cosine",
        "eval_images": 2000,
        "eval_steps": 20,
        "prune_subset": 20000,
    },
    "cifar10": {
        "data": {"name": "cifar10", "root": DATA, "train_subset": 10000},
        "teacher": {"name": "resnet20", "checkpoint": CIFAR_TEACHER},
        "student": {"name": "resnet8"},
        "eps": 8 / 255,
        "train_steps": 3,
        "train_step_size": 2.5 * (8 / 255) / 3,
        "eps_ramp": 0.0,
        "teacher_epochs": 10,
        "epochs": 15,
        "natural_epochs": 15,
        "optimizer": SGD,
        "scheduler": "onecycle",
        "eval_images": 1000,
        "eval_steps": 20,
        "prune_subset": 10000,
    },
}
PRUNE = {"sparsities": [0.5, 0.8, 0.9, 0.95], "rhos": [0.01, 0.05, 0.2], "epochs": 3, "lr": 0.01}
REPLAYS = 4


def quick_settings() -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The same code paths on tiny data: a few minutes on 2 cores."""
    quick = json.loads(json.dumps(FULL))
    for name, setting in quick.items():
        setting["data"]["train_subset"] = 256 if name == "mnist" else 200
        setting["prune_subset"] = setting["data"]["train_subset"]
        setting.update(teacher_epochs=1, epochs=1, natural_epochs=1, eval_images=64, eval_steps=5, train_steps=2)
    return quick, {**PRUNE, "sparsities": [0.5, 0.9], "rhos": [0.05], "epochs": 2}


# ----------------------------------------------------------------------------- runs
def train(config: dict[str, Any], out: Path) -> dict[str, Any]:
    """Train (or reuse / resume) one run; returns its summary."""
    summary_path = out / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("status") == "finished":
            return summary
    resume = (out / "checkpoints" / "state.pt").is_file()
    return Trainer(build_config(config), out, resume=resume).fit()


def recipe(
    setting: dict[str, Any],
    name: str,
    student: dict,
    method: dict,
    epochs: int,
    threads: int,
    teachers: list[str] = (),
    optimizer: dict | None = None,
    scheduler: str | None = None,
    subset: int | None = None,
) -> dict[str, Any]:
    data = {**setting["data"], "augment": True}
    if subset:
        data["train_subset"] = subset
    return {
        "name": name,
        "data": data,
        "student": student,
        "teachers": [{"checkpoint": t} for t in teachers],
        "method": method,
        "train": {
            "epochs": epochs,
            "batch_size": 128,
            "optimizer": optimizer or setting["optimizer"],
            "scheduler": {"name": scheduler or setting["scheduler"]},
            "progress": "none",
            "num_threads": threads,
            "eval_every": epochs,
        },
    }


def attack(setting: dict[str, Any]) -> dict[str, Any]:
    return {
        "eps": setting["eps"],
        "steps": setting["train_steps"],
        "step_size": setting["train_step_size"],
        "eps_ramp": setting["eps_ramp"],
    }


class Evaluator:
    """Clean / FGSM / PGD-k top-1 of model files on a class-balanced subset of a test set."""

    def __init__(self, setting: dict[str, Any]):
        data = setting["data"]
        self.splits = load_dataset(data["name"], root=data["root"])
        self.setting = setting

    def model(self, checkpoint: str):
        return build_model(ModelConfig(checkpoint=checkpoint), self.splits.info, "model")[0].eval()

    def __call__(self, checkpoint: str) -> dict[str, float]:
        model, info, s = self.model(checkpoint), self.splits.info, self.setting
        common = {"eps": s["eps"], "limit": s["eval_images"], "batch_size": 250}
        pgd = robust_evaluate(
            model, self.splits.test, info.mean, info.std, attack="pgd", steps=s["eval_steps"], **common
        )
        fgsm = robust_evaluate(model, self.splits.test, info.mean, info.std, attack="fgsm", **common)
        return {"clean": pgd["clean_top1"], "fgsm": fgsm["robust_top1"], "pgd": pgd["robust_top1"]}


def last(run: Path) -> str:
    return str(run / "checkpoints" / "model_last.pt")


def robust_table(name: str, setting: dict[str, Any], out: Path, threads: int) -> tuple[list[str], dict[str, Path]]:
    """The robust teacher and the five students; returns the table lines and the run folders."""
    teacher_net = {k: v for k, v in setting["teacher"].items()}
    student_net = setting["student"]
    runs: dict[str, Path] = {}
    rows: list[tuple[str, str, Path]] = []

    def run(key: str, label: str, net_label: str, config: dict[str, Any]) -> None:
        runs[key] = out / name / key
        started = time.perf_counter()
        summary = train(config, runs[key])
        print(
            f"[{name}] {key}: done ({(time.perf_counter() - started) / 60:.1f} min this session, "
            f"{summary.get('train_seconds', 0) / 60:.1f} min training)",
            flush=True,
        )
        rows.append((label, net_label, runs[key]))

    adv = {"name": "adv_ce", **attack(setting)}
    E = setting["epochs"]
    run(
        "teacher",
        "robust teacher (adv_ce, PGD training)",
        teacher_net["name"],
        recipe(setting, f"{name}_teacher_adv", teacher_net, adv, setting["teacher_epochs"], threads),
    )
    teacher = last(runs["teacher"])
    run(
        "natural",
        "student, natural training (ce)",
        student_net["name"],
        recipe(setting, f"{name}_student_ce", student_net, {"name": "ce"}, setting["natural_epochs"], threads),
    )
    run(
        "adv_ce",
        "student, adversarial training (adv_ce)",
        student_net["name"],
        recipe(setting, f"{name}_student_adv", student_net, adv, E, threads),
    )
    run(
        "kd",
        "student, plain KD from the robust teacher (kd)",
        student_net["name"],
        recipe(
            setting, f"{name}_student_kd", student_net, {"name": "kd"}, setting["natural_epochs"], threads, [teacher]
        ),
    )
    run(
        "ard",
        "student, ARD (alpha 1, T 30)",
        student_net["name"],
        recipe(setting, f"{name}_student_ard", student_net, {"name": "ard", **attack(setting)}, E, threads, [teacher]),
    )
    fast = {"name": "fast_ard", "replays": REPLAYS, "eps": setting["eps"], "eps_ramp": setting["eps_ramp"]}
    run(
        "fast_ard",
        f"student, Fast-ARD ({REPLAYS} free replays, {math.ceil(E / REPLAYS)} epochs)",
        student_net["name"],
        recipe(setting, f"{name}_student_fast_ard", student_net, fast, math.ceil(E / REPLAYS), threads, [teacher]),
    )

    evaluate = Evaluator(setting)
    lines = [
        f"| model | network | clean (%) | FGSM (%) | PGD-{setting['eval_steps']} (%) | full-test clean (%) | train min |",  # noqa: E501
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, net, folder in rows:
        result = evaluate(last(folder))
        summary = json.loads((folder / "summary.json").read_text())
        full = (summary.get("final") or {}).get("test") or {}
        lines.append(
            f"| {label} | {net} | {result['clean']:.2f} | {result['fgsm']:.2f} | {result['pgd']:.2f} | "
            f"{full.get('top1', float('nan')):.2f} | {summary.get('train_seconds', 0) / 60:.1f} |"
        )
        print(lines[-1], flush=True)
    return lines, runs


def prune_table(
    name: str, setting: dict[str, Any], runs: dict[str, Path], prune: dict[str, Any], out: Path, threads: int
) -> list[str]:
    """Robust accuracy against sparsity: robust_prune vs magnitude pruning of the natural student."""
    teacher, evaluate = last(runs["teacher"]), Evaluator(setting)
    info = evaluate.splits.info
    shape = (info.in_channels, *info.image_size)
    epochs = prune["epochs"]
    common = {"finetune_epochs": 1, "ramp": 0.5 * (epochs - 1) / epochs}
    rows = []
    for sparsity in prune["sparsities"]:
        rows.append(
            (
                "robust_prune, projection (adv. KD from the robust teacher)",
                sparsity,
                f"rp_project_{sparsity}",
                {"checkpoint": last(runs["adv_ce"])},
                [teacher],
                {
                    "name": "robust_prune",
                    "prox": "project",
                    "sparsity": sparsity,
                    **common,
                    **attack(setting),
                    "eps_ramp": 0.0,
                },
            )
        )
        rows.append(
            (
                "magnitude pruning of the natural student (natural fine-tune)",
                sparsity,
                f"magnitude_{sparsity}",
                {"checkpoint": last(runs["natural"])},
                [],
                {"name": "robust_prune", "prox": "project", "sparsity": sparsity, "adversarial": False, **common},
            )
        )
    for rho in prune["rhos"]:
        rows.append(
            (
                f"robust_prune, L1 prox rho {rho}",
                None,
                f"rp_l1_{rho}",
                {"checkpoint": last(runs["adv_ce"])},
                [teacher],
                {"name": "robust_prune", "prox": "l1", "rho": rho, **common, **attack(setting), "eps_ramp": 0.0},
            )
        )
    lines = [
        f"| pruning | target sparsity | sparsity | compression rate | computation rate | clean (%) | PGD-{setting['eval_steps']} (%) |",  # noqa: E501
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dense_key, label in (
        ("adv_ce", "dense adversarially trained student (start of robust_prune)"),
        ("natural", "dense naturally trained student (start of magnitude pruning)"),
    ):
        result = evaluate(last(runs[dense_key]))
        lines.append(f"| {label} | 0 | 0.000 | 1.00 | 1.00 | {result['clean']:.2f} | {result['pgd']:.2f} |")
    for label, target, key, student, teachers, method in rows:
        folder = out / name / "prune" / key
        config = recipe(
            setting,
            f"{name}_{key}",
            student,
            method,
            epochs,
            threads,
            teachers,
            optimizer={**SGD, "lr": prune["lr"]},
            scheduler="cosine",
            subset=setting["prune_subset"],
        )
        train(config, folder)
        report = compression_report(evaluate.model(last(folder)), shape)
        result = evaluate(last(folder))
        shown = "-" if target is None else f"{target:.2f}"
        lines.append(
            f"| {label} | {shown} | {report['sparsity']:.3f} | {report['compression_rate']:.2f} | "
            f"{report['computation_rate']:.2f} | {result['clean']:.2f} | {result['pgd']:.2f} |"
        )
        print(lines[-1], flush=True)
    return lines


def describe_data(setting: dict[str, Any]) -> str:
    subset = setting["data"].get("train_subset")
    return f"{subset} class-balanced training images" if subset else "the whole training set"


def describe_optimizer(setting: dict[str, Any]) -> str:
    opt = setting["optimizer"]
    return f"{opt['name']} lr {opt['lr']} ({setting['scheduler']}), batch 128"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings (checks the wiring, numbers meaningless)")
    parser.add_argument(
        "--only", nargs="+", choices=["mnist", "cifar10", "prune"], default=["mnist", "cifar10", "prune"]
    )
    parser.add_argument("--out", help="run folder (default runs/bench_robust/full or .../quick)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.record and args.quick:
        parser.error("--record is for full runs; --quick numbers are not results")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    settings, prune = quick_settings() if args.quick else (FULL, PRUNE)
    out = Path(args.out or ROOT / "runs" / "bench_robust" / ("quick" if args.quick else "full"))
    started = time.perf_counter()
    sections = []
    mnist_runs = None
    for name in ("mnist", "cifar10"):
        if name in args.only or (name == "mnist" and "prune" in args.only):
            lines, runs = robust_table(name, settings[name], out, args.threads)
            mnist_runs = runs if name == "mnist" else mnist_runs
            if name in args.only:
                s = settings[name]
                sections.append(
                    f"### {name}: eps {s['eps']:.4g} (L-inf, pixel units)\n\n"
                    f"Train: {describe_data(s)}; {describe_optimizer(s)}; training attack PGD-{s['train_steps']} "
                    f"(step {s['train_step_size']:.4g}, random start, eps warm-up over {s['eps_ramp']:.0%} of the run); "  # noqa: E501
                    f"teacher {s['teacher']['name']} {s['teacher_epochs']} epochs, students {s['student']['name']} "
                    f"({s['epochs']} epochs adversarial, {s['natural_epochs']} natural/KD). Evaluation on a seeded "
                    f"class-balanced subset of {s['eval_images']} test images: clean, FGSM and PGD-{s['eval_steps']} (step 2.5 eps / "  # noqa: E501
                    f"{s['eval_steps']}, random start); 'full-test clean' is the run's own final test top-1.\n\n"
                    + "\n".join(lines)
                )
    if "prune" in args.only:
        lines = prune_table("mnist", settings["mnist"], mnist_runs, prune, out, args.threads)
        sections.append(
            f"### mnist: robust accuracy against sparsity\n\n"
            f"Each pruned run: {prune['epochs']} epochs on {settings['mnist']['prune_subset']} class-balanced training "
            f"images (SGD, cosine lr from {prune['lr']}), target sparsity (or rho) ramped "
            "over the first half of the pruning epochs, last epoch a masked fine-tune; every Conv2d/Linear weight pruned "  # noqa: E501
            "(per-layer projection). Rates against the dense network (parameters incl. biases/BN; FLOPs of conv/linear "
            "at batch 1).\n\n" + "\n".join(lines)
        )
    minutes = (time.perf_counter() - started) / 60
    text = "\n\n".join(sections) + f"\n\nWall time of this invocation: {minutes:.1f} min ({args.threads} threads)."
    print("\n" + text)
    if args.record:
        results = Path(__file__).resolve().parent / "RESULTS.md"
        header = (
            f"\n## Adversarial robustness (`python benchmarks/robust.py --record`), {time.strftime('%Y-%m-%d')}\n\n"
        )
        results.write_text(
            (results.read_text() if results.exists() else "# Benchmark results\n") + header + text + "\n"
        )


if __name__ == "__main__":
    main()

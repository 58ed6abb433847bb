"""Structured pruning curve: accuracy against FLOPs, fine-tuned with and without KD.

Starts from a trained dense network (default: the kept CIFAR-10 resnet20,
``benchmarks/teachers/cifar10_resnet20.pt``, 83.93% top-1) and prunes it iteratively, as
``configs/recipes/prune_kd_cifar10.yaml`` does: each stage removes ``--amount`` of the filters of
every channel group (L1 filter norm; residual streams pruned through the additions and BNs, so the
network gets physically smaller), then fine-tunes ``--epochs`` epochs on the 10,000-image
class-balanced CIFAR-10 subset either with cross-entropy alone or with KD (T = 4, 0.9 soft / 0.1
hard) from the *unpruned* network. Each chain prunes its own previous stage, so the two chains have
the same widths (and FLOPs) at every stage. ``--schedule oneshot`` instead prunes the dense network
directly to each cumulative width. Reported per stage: parameters, FLOPs, the computation rate
against the dense network, test top-1 right after pruning (no fine-tuning) and after each
fine-tuning (full 10,000-image test set; the final epoch, no selection on the test set).

    python benchmarks/pruning_curve.py [--stages 3] [--amount 0.3] [--epochs 5] [--record]
    python benchmarks/pruning_curve.py --quick        # digits, tiny: checks the mechanics in ~1-2 min

Data: python ../shared/tools/materialize_datasets.py data (from the project root) for CIFAR-10.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from kdforge.compress.arch import load_model_file
from kdforge.compress.prune import prune_filters
from kdforge.config import DataConfig, build_config
from kdforge.engine.build import build_augmentation, build_data
from kdforge.engine.trainer import Trainer, evaluate_model
from kdforge.models import count_flops, count_parameters

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KD = {"name": "kd", "temperature": 4, "kd_weight": 0.9, "ce_weight": 0.1}


def settings(quick: bool, args: argparse.Namespace) -> dict[str, Any]:
    if quick:
        return {
            "data": {"name": "digits", "augment": False},
            "dense_recipe": {
                "data": {"name": "digits", "augment": False},
                "student": {"name": "resnet8"},
                "method": {"name": "ce"},
                "train": {
                    "epochs": 4,
                    "batch_size": 64,
                    "optimizer": {"name": "sgd", "lr": 0.05},
                    "scheduler": {"name": "cosine"},
                    "progress": "none",
                },
            },
            "train": {
                "epochs": 1,
                "batch_size": 64,
                "optimizer": {"name": "sgd", "lr": 0.01},
                "scheduler": {"name": "cosine"},
                "progress": "none",
            },
            "teacher_bank": False,
        }
    return {
        "data": {"name": "cifar10", "root": args.root, "train_subset": args.subset},
        "dense": args.dense,
        "train": {
            "epochs": args.epochs,
            "batch_size": 128,
            "optimizer": {"name": "sgd", "lr": args.lr, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
            "scheduler": {"name": "cosine"},
            "progress": "none",
        },
        "teacher_bank": True,
    }


def evaluate_file(path: Path, data_cfg: dict, prune: dict | None = None) -> dict[str, Any]:
    """Test top-1, parameters and FLOPs of a model file, optionally pruned first (no fine-tuning)."""
    model, _ = load_model_file(path)
    cfg = DataConfig(**{**data_cfg, "augment": False, "train_subset": None})
    data = build_data(cfg)
    shape = (data.info.in_channels, *data.info.image_size)
    if prune is not None:
        prune_filters(model, shape, prune["amount"], prune.get("norm", 1))
    top1 = evaluate_model(model, data.test, build_augmentation(cfg, data.info), 500)["top1"]
    return {"top1": top1, "parameters": count_parameters(model), "flops": count_flops(model, shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits and a tiny budget: a mechanics check")
    parser.add_argument("--dense", default=str(HERE / "teachers" / "cifar10_resnet20.pt"), help="dense model file")
    parser.add_argument("--root", default=str(ROOT / "data"), help="folder holding cifar-10-batches-py")
    parser.add_argument("--subset", type=int, default=10000, help="class-balanced training subset")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--amount", type=float, default=0.3, help="fraction of each group's filters removed per stage")
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs per stage")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--schedule", choices=["iterative", "oneshot"], default="iterative")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "pruning_curve"))
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    started = time.perf_counter()
    setup = settings(args.quick, args)
    out = Path(args.out) / ("quick" if args.quick else f"{args.schedule}-a{args.amount}-e{args.epochs}-s{args.seed}")
    out.mkdir(parents=True, exist_ok=True)

    if args.quick:
        dense_dir = out / "dense"
        if not (dense_dir / "summary.json").is_file():
            Trainer(build_config({**setup["dense_recipe"], "seed": args.seed}), dense_dir).fit()
        dense = dense_dir / "checkpoints" / "model_last.pt"
    else:
        dense = Path(setup["dense"])
    reference = evaluate_file(dense, setup["data"])
    print(
        f"dense: top-1 {reference['top1']:.2f}%, {reference['parameters']:,} parameters, "
        f"{reference['flops'] / 1e6:.1f}M FLOPs",
        flush=True,
    )

    rows = []
    previous = {"ce": dense, "kd": dense}
    for stage in range(1, args.stages + 1):
        if args.schedule == "iterative":
            amount = args.amount
            sources = previous
        else:  # prune the dense network straight to the cumulative width of this stage
            amount = 1 - (1 - args.amount) ** stage
            sources = {"ce": dense, "kd": dense}
        prune = {"amount": amount, "structured": True, "norm": 1}
        row: dict[str, Any] = {"stage": stage, "width": (1 - args.amount) ** stage}
        row["no_finetune"] = evaluate_file(sources["kd"], setup["data"], prune)
        for variant in ("ce", "kd"):
            recipe = {
                "name": f"prune stage {stage} ({variant})",
                "seed": args.seed,
                "data": setup["data"],
                "student": {"checkpoint": str(sources[variant]), "prune": prune},
                "teachers": [{"checkpoint": str(dense)}] if variant == "kd" else [],
                "method": KD if variant == "kd" else {"name": "ce"},
                "train": setup["train"],
                "teacher_bank": {"enabled": bool(setup["teacher_bank"] and variant == "kd")},
            }
            run_dir = out / f"stage{stage}-{variant}"
            summary_path = run_dir / "summary.json"
            if summary_path.is_file() and json.loads(summary_path.read_text()).get("status") == "finished":
                summary = json.loads(summary_path.read_text())
            else:
                summary = Trainer(build_config(copy.deepcopy(recipe)), run_dir, resume=run_dir.exists()).fit()
            compression = summary["compression"]
            row[variant] = {
                "top1": summary["final"]["test"]["top1"],
                "parameters": compression["student"]["parameters"],
                "flops": compression["student"]["flops"],
                "train_min": summary["train_seconds"] / 60,
            }
            previous[variant] = run_dir / "checkpoints" / "model_last.pt"
        rows.append(row)
        print(
            f"stage {stage}: width x{row['width']:.2f}, {row['kd']['flops'] / 1e6:.1f}M FLOPs, "
            f"no fine-tune {row['no_finetune']['top1']:.2f}%, CE {row['ce']['top1']:.2f}%, "
            f"KD {row['kd']['top1']:.2f}%",
            flush=True,
        )

    minutes = (time.perf_counter() - started) / 60
    data_text = (
        "digits (quick mechanics check)"
        if args.quick
        else f"CIFAR-10, {args.subset:,}-image class-balanced training subset, full 10,000-image test set"
    )
    intro = (
        f"Dense network: `{Path(dense).name if not args.quick else 'resnet8 (4 epochs on digits)'}`, top-1 "
        f"{reference['top1']:.2f}%, {reference['parameters']:,} parameters, {reference['flops'] / 1e6:.1f}M FLOPs. "
        f"Data: {data_text}. Schedule: {args.schedule}, {args.amount:.0%} of every channel group's filters "
        f"(L1 norm, residual streams included) per stage, {setup['train']['epochs']} fine-tuning epochs per stage "
        f"(SGD lr {setup['train']['optimizer']['lr']}, cosine), seed {args.seed}; KD = T 4, 0.9 soft / 0.1 hard "
        "from the unpruned network. Top-1 is the final epoch's."
    )
    lines = [
        intro,
        "",
        (
            "| stage | width | parameters | FLOPs (M) | computation rate | top-1 pruned, no fine-tune (%) "
            "| top-1 fine-tuned, CE (%) | top-1 fine-tuned, KD (%) | KD − CE |"
        ),
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        (
            f"| 0 (dense) | 1.00 | {reference['parameters']:,} | {reference['flops'] / 1e6:.1f} | 1.00× "
            f"| {reference['top1']:.2f} | — | — | — |"
        ),
    ]
    for row in rows:
        kd, ce = row["kd"], row["ce"]
        lines.append(
            f"| {row['stage']} | {row['width']:.2f} | {kd['parameters']:,} | {kd['flops'] / 1e6:.1f} "
            f"| {reference['flops'] / kd['flops']:.2f}× | {row['no_finetune']['top1']:.2f} | {ce['top1']:.2f} "
            f"| {kd['top1']:.2f} | {kd['top1'] - ce['top1']:+.2f} |"
        )
    lines.append(f"\nWall time: {minutes:.1f} min (2 cores).")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    if args.record:
        results = HERE / "RESULTS.md"
        command = "python benchmarks/pruning_curve.py" + (" --quick" if args.quick else "") + " --record"
        section = f"\n## Structured pruning curve (`{command}`), {time.strftime('%Y-%m-%d')}\n\n{table}\n"
        results.write_text((results.read_text() if results.exists() else "# Benchmark results\n") + section)


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()

"""CPU-scale KD on CIFAR-10: resnet20 teacher -> resnet8 student, alone vs KD, several seeds.

The budgets of DESIGN.md (2 cores): the teacher on the full training set (12 epochs, one-cycle
SGD), students on a 10,000-image class-balanced subset for 15 epochs, tested on the full test set.
Runs are ordinary run directories under ``--out``; finished ones are skipped, so the script
resumes after an interruption. Reports final-epoch and best-epoch test top-1 (mean +- std over
seeds), labelled separately: the best epoch is selected on the test set and is shown only for
comparison with papers that report it.

    python ../shared/tools/materialize_datasets.py data      # once: official CIFAR-10 files
    python benchmarks/kd_cifar10.py --out runs/kd_cifar10 [--seeds 0 1 2] [--record]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from kdforge.config import build_config, read_yaml
from kdforge.engine.trainer import Trainer

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "configs" / "cifar10" / "resnet20_resnet8.yaml"


def stage(recipe: dict, name: str) -> dict:
    from kdforge.engine.pipeline import stage_recipes

    return stage_recipes(recipe, RECIPE.parent)[name]


def train(data: dict, out: Path, root: str) -> dict:
    summary_path = out / "summary.json"
    if summary_path.is_file() and json.loads(summary_path.read_text()).get("status") == "finished":
        return json.loads(summary_path.read_text())
    data = {**data, "data": {**data["data"], "root": root}}
    config = build_config(data, ["train.progress=none"])
    return Trainer(config, out, resume=(out / "checkpoints" / "state.pt").exists()).fit()


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/kd_cifar10")
    parser.add_argument("--root", default="data", help="folder holding cifar-10-batches-py/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    out = Path(args.out)
    recipe = read_yaml(RECIPE)

    started = time.perf_counter()
    teacher = train(stage(recipe, "teacher"), out / "teacher", args.root)
    teacher_ckpt = out / "teacher" / "checkpoints" / "model_last.pt"
    results: dict[str, list[dict]] = {"student_alone": [], "kd": []}
    for seed in args.seeds:
        for name in results:
            data = stage(recipe, name)
            data["seed"] = seed
            if data.get("teachers"):
                data["teachers"] = [{"checkpoint": str(teacher_ckpt)}]
            results[name].append(train(data, out / f"{name}_seed{seed}", args.root))

    rows = []
    for name, summaries in results.items():
        final = [s["final"]["test"]["top1"] for s in summaries]
        best = [s["best"]["top1"] for s in summaries]
        minutes = statistics.mean(s["train_seconds"] for s in summaries) / 60
        rows.append((name, mean_std(final), mean_std(best), f"{minutes:.1f}"))
    alone = statistics.mean(s["final"]["test"]["top1"] for s in results["student_alone"])
    kd = statistics.mean(s["final"]["test"]["top1"] for s in results["kd"])
    lines = [
        f"Teacher resnet20 (full train set, 12 epochs): final test top-1 {teacher['final']['test']['top1']:.2f}%, "
        f"{teacher['train_seconds'] / 60:.1f} min. Students: resnet8, 10,000-image balanced subset, 15 epochs, "
        f"seeds {args.seeds}.",
        "",
        "| run | final top-1 (%) | best top-1 (%, selected on test) | train min / run |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in rows],
        "",
        f"KD minus student alone (final epoch, mean): **{kd - alone:+.2f}** points. "
        f"Wall time of this script: {(time.perf_counter() - started) / 60:.1f} min.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.record:
        results_md = HERE / "RESULTS.md"
        section = (f"\n## KD on CIFAR-10 at CPU scale (`python benchmarks/kd_cifar10.py --record`), "
                   f"{time.strftime('%Y-%m-%d')}\n\n{table}\n")
        results_md.write_text((results_md.read_text() if results_md.exists() else "# Benchmark results\n") + section)


if __name__ == "__main__":
    main()

"""cGAN-KD measured: a pipeline recipe's shared stages (teacher, GAN, generation) once, its student
stages for several seeds; prints a mean ± std table of the students' test metric.

    python benchmarks/cgan_kd.py configs/recipes/cgan_kd_mnist.yaml --out runs/bench_cgan_kd_mnist --seeds 0 1 2

Stages named in --shared run once (seed as in the recipe) under OUT/shared; every other stage runs
per seed under OUT/seed<k> (with ``<stage>:seed=k``), reading the shared stages through symbolic
links. Finished stages are skipped, so an interrupted benchmark resumes. --set overrides apply to
every stage (``stage:key=value`` to one); --only runs just the named student stages. Results:
OUT/results.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from kdforge.cli import train_run
from kdforge.config import read_yaml
from kdforge.engine.pipeline import run_pipeline, stage_recipes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--shared", nargs="+", default=["teacher", "gan", "generate", "generate_confidence", "generate_filter_only"]
    )
    parser.add_argument("--set", nargs="+", default=[], dest="overrides")
    parser.add_argument("--only", nargs="+", default=None, help="run only these student stages")
    args = parser.parse_args(argv)
    recipe_path = Path(args.recipe)
    recipe = read_yaml(recipe_path)
    stages = list(stage_recipes(recipe, recipe_path.parent))
    shared = [s for s in stages if s in args.shared]
    students = [s for s in stages if s not in shared and (args.only is None or s in args.only)]
    out = Path(args.out)
    shared_dir = out / "shared"
    summaries: dict[str, dict[int, dict]] = {}
    for seed in args.seeds:
        seed_dir = out / f"seed{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        for name in shared:
            link = seed_dir / name
            (shared_dir / name).mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to((shared_dir / name).resolve(), target_is_directory=True)
        overrides = [*args.overrides, *(f"{s}:seed={seed}" for s in students)]
        only = None if args.only is None else [*shared, *students]
        result = run_pipeline(recipe, recipe_path.parent, seed_dir, overrides, train_run, only=only)
        for name in students:
            summaries.setdefault(name, {})[seed] = result[name]
    rows = {}
    for name, by_seed in summaries.items():
        tests = [(s.get("final") or {}).get("test") or {} for s in by_seed.values()]
        metric = "mae" if "mae" in tests[0] else "top1"
        values = [t[metric] for t in tests]
        rows[name] = {
            "metric": metric,
            "values": values,
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "train_seconds": statistics.mean(s.get("train_seconds", 0.0) for s in by_seed.values()),
            "train_images": None,
        }
    shared_summaries = {}
    for name in shared:
        path = shared_dir / name / "summary.json"
        if path.is_file():
            shared_summaries[name] = json.loads(path.read_text())
    (out / "results.json").write_text(json.dumps({"students": rows, "shared": shared_summaries}, indent=2) + "\n")
    baseline = rows.get("student_alone")
    print("| stage | test metric | mean ± std | Δ vs alone | train s |")
    print("| --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        delta = row["mean"] - baseline["mean"] if baseline else float("nan")
        print(
            f"| {name} | {row['metric']} | {row['mean']:.2f} ± {row['std']:.2f} | {delta:+.2f} | "
            f"{row['train_seconds']:.0f} |"
        )
    for name, summary in shared_summaries.items():
        detail = summary.get("counts") or summary.get("best") or (summary.get("final") or {}).get("test")
        print(f"{name}: {summary.get('status')} {json.dumps(detail)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

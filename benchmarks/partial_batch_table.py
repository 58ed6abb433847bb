"""Print the cifar10-lite rows rerun with full batches (train.drop_last: true) next to the old rows.

    python benchmarks/partial_batch_table.py [RECORDS_DIR]

RECORDS_DIR defaults to benchmarks/records/cifar10-lite/resnet20-resnet8 (the committed records of
the rerun); the old figures (partial last batch of 16 images every epoch) are those published
before the rerun, per seed, from benchmarks/records/superseded/ and RESULTS.md.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

#: final-epoch top-1 per seed (0, 1, 2) with the partial last batch (train.drop_last: false), as
#: published before the rerun; None where a seed's record did not survive
OLD = {
    "student_alone": [67.02, 65.85, 66.67],  # the records of benchmarks/records/cifar10-lite-online
    "kd": [72.29, 70.74, 70.75],  # the ReLU rows of the cifar10-lite-lma suite: the same recipe and seeds
    "fitnet": [72.30, 72.33, 72.04],
    "crd": [68.62, 69.00, 68.85],
    "pkt": [59.85, 53.05, 51.83],
    "sp": [56.08, 48.56, 53.05],
}
OLD_MEAN = {
    "student_alone": "66.51 ± 0.60",
    "kd": "71.26 ± 0.89 (published 71.85 ± 0.87)",
    "fitnet": "72.22 ± 0.16",
    "crd": "68.82 ± 0.19",
    "pkt": "54.91 ± 4.32",
    "sp": "52.56 ± 3.78",
}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/records/cifar10-lite/resnet20-resnet8")
    finals: dict[str, dict[int, float]] = {}
    for method in OLD:
        for seed_dir in sorted((root / method).glob("seed*")):
            if not (seed_dir / "summary.json").is_file():
                continue
            summary = json.loads((seed_dir / "summary.json").read_text())
            if summary.get("status") == "finished":
                finals.setdefault(method, {})[int(seed_dir.name[4:])] = summary["final"]["test"]["top1"]
    alone = statistics.mean(finals["student_alone"].values())
    kd = statistics.mean(finals["kd"].values())
    print(
        "| method | seeds | full batches: top-1 (Δ vs alone, Δ vs kd) | per seed 0/1/2 | partial last batch (before) |"
    )
    print("| --- | ---: | ---: | --- | ---: |")
    for method in OLD:
        seeds = finals.get(method, {})
        if not seeds:
            continue
        values = [seeds[s] for s in sorted(seeds)]
        m = statistics.mean(values)
        per_seed = " / ".join(f"{seeds[s]:.2f}" if s in seeds else "—" for s in range(3))
        print(
            f"| `{method}` | {len(values)} | {mean_std(values)} ({m - alone:+.2f}, {m - kd:+.2f}) | {per_seed} | "
            f"{OLD_MEAN[method]} |"
        )


if __name__ == "__main__":
    main()

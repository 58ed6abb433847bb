"""What glibc's default allocator costs a CPU training step, and what ``train.allocator: auto``
(kdforge.core.allocator) saves.

Each measurement is its own process (the allocator's settings are process-wide): the method's
full step (``Distiller`` forward, backward, SGD step) as in ``benchmarks/feature_overhead.py``,
a few warm-up steps, then minor page faults per step, thread CPU time per step and wall time per
step, and the process's peak resident memory. ``system`` and ``auto`` alternate, round after
round; medians are reported.

    python benchmarks/allocator.py [--rounds 3] [--steps 4] [--record]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = {
    "kd resnet20 -> resnet8, 10 classes, batch 128": ("kd", "resnet20", "resnet8", 10, 128),
    "kd resnet32x4 -> resnet8x4, 100 classes, batch 64": ("kd", "resnet32x4", "resnet8x4", 100, 64),
    "rkd resnet32x4 -> resnet8x4, 100 classes, batch 64": ("rkd", "resnet32x4", "resnet8x4", 100, 64),
    "student alone (ce) resnet8, 10 classes, batch 128": ("ce", "resnet20", "resnet8", 10, 128),
}

CHILD = """
import json, resource, sys, time
import torch
from kdforge.core.allocator import tune_allocator
sys.path.insert(0, {here!r})
from feature_overhead import method_step
from kdforge.data.batch import Batch
setting, method, teacher, student, classes, batch_size, steps = sys.argv[1:8]
record = tune_allocator(setting, "cpu")
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
batch_size, classes, steps = int(batch_size), int(classes), int(steps)
batch = Batch(inputs={{"image": torch.randn(batch_size, 3, 32, 32, generator=g)}},
              targets=torch.randint(0, classes, (batch_size,), generator=g), index=torch.arange(batch_size))
run, _, _ = method_step(method, teacher, student, classes, batch, (3, 32, 32), defaults=True)
for _ in range(2):
    run()
faults, cpu, wall = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.thread_time(), time.perf_counter()
for _ in range(steps):
    run()
print(json.dumps({{
    "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps,
    "cpu_ms": 1000 * (time.thread_time() - cpu) / steps,
    "wall_ms": 1000 * (time.perf_counter() - wall) / steps,
    "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "tuned": record["tuned"],
}}))
"""


def measure(setting: str, case: tuple, steps: int) -> dict:
    args = [str(a) for a in case]
    code = CHILD.format(here=str(HERE))
    done = subprocess.run([sys.executable, "-c", code, setting, *args, str(steps)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"measurement failed ({setting}, {case}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cases", nargs="*", default=list(CASES), help="names of CASES (default: all)")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    results: dict[tuple[str, str], list[dict]] = {}
    for round_ in range(args.rounds):
        for name in args.cases:
            order = ("system", "auto") if round_ % 2 == 0 else ("auto", "system")
            for setting in order:
                results.setdefault((name, setting), []).append(measure(setting, CASES[name], args.steps))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)

    def med(name, setting, key):
        return statistics.median(r[key] for r in results[(name, setting)])

    lines = [
        "| step | allocator | page faults / step | CPU ms / step | wall ms / step | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in args.cases:
        for setting in ("system", "auto"):
            row = [med(name, setting, k) for k in ("faults", "cpu_ms", "wall_ms", "rss_mib")]
            lines.append(f"| {name} | {setting} | {row[0]:,.0f} | {row[1]:.0f} | {row[2]:.0f} | {row[3]:.0f} |")
        cpu = med(name, "auto", "cpu_ms") / med(name, "system", "cpu_ms")
        wall = med(name, "auto", "wall_ms") / med(name, "system", "wall_ms")
        rss = med(name, "auto", "rss_mib") / med(name, "system", "rss_mib")
        lines.append(f"| {name} | auto / system | | {cpu:.2f}x | {wall:.2f}x | {rss:.2f}x |")
    table = "\n".join(lines)
    header = (
        f"One process per measurement, one thread, the step as `kdforge train` runs it (teacher BatchNorm "
        f"folded, channels_last), {args.steps} steps after 2 warm-up steps, medians of {args.rounds} "
        f"alternating rounds."
    )
    print(header + "\n\n" + table)
    if args.record:
        with open(HERE / "RESULTS.md", "a") as handle:
            handle.write(
                f"\n## The C allocator on CPU steps (`python benchmarks/allocator.py --rounds {args.rounds} "
                f"--steps {args.steps}`), {time.strftime('%Y-%m-%d')}\n\n{header}\n\n{table}\n"
            )


if __name__ == "__main__":
    main()

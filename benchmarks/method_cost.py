"""Each method's extra parameters and training time per batch relative to plain ``kd`` and to the
student trained alone (``ce``), in one run.

Fixed pair: resnet20 teacher -> resnet8 student on CIFAR-10-shaped input (32x32x3, 10 classes),
batch 128, SGD. Every method does the same full step (teacher forward where the method needs it,
student forward and backward, optimizer step); steps are timed in interleaved rounds so machine
noise falls on every method alike, and the median per method is divided by ``kd``'s.

The project's cost goals: ``review_kd`` at most 1.4x ``kd``, ``crd`` at most 1.6x (the mdistiller
paper's GPU table shows 2.4x and 3.7x).

    python benchmarks/method_cost.py [--rounds 5] [--repeats 3] [--negatives 4096] [--record]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch

from kdforge.data.batch import Batch
from kdforge.methods import METHODS, Step
from kdforge.models import create

NUM_SAMPLES = 10_000  # memory-bank size of CRD/HKD (a cifar10-lite training subset)

# method name -> hyperparameters for this pair (paper defaults unless a CPU note says otherwise)
VARIANTS: dict[str, dict] = {
    "ce": {},
    "kd": {},
    "dkd": {},
    "fitnet": {},
    "at": {},
    "rkd": {},
    "pkt": {},
    "sp": {},
    "crd": {},
    "hkd": {},
    "review_kd": {},
    "fsp": {},
    "crosslayer": {},
    # online, self-distillation and assistant methods; the deployed network is a resnet8
    "dml": {},
    "one": {},
    "cl_ilr": {},
    "okddip": {},
    "ffsd": {},
    "introspective": {},
    "takd": {},
    "growing_ta": {"start_fraction": 0.5},
}


def make_step(name: str, params: dict, batch: Batch):
    torch.manual_seed(0)
    student = create("resnet8", num_classes=10)
    teacher = create("resnet20", num_classes=10)
    method = METHODS.get(name)
    accepted = inspect.signature(method.__init__).parameters
    extra = {}
    if "input_shape" in accepted:
        extra["input_shape"] = (3, 32, 32)
    if "num_samples" in accepted:
        extra["num_samples"] = NUM_SAMPLES
    teachers = [teacher] if method.teachers_required[0] > 0 else []
    distiller = method(student, teachers, params, **extra)
    distiller.train()
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    step = Step(epoch=30, epochs=240, global_step=1000, total_steps=100_000)

    def run():
        out = distiller(batch, step)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run, distiller.extra_parameter_count()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--negatives", type=int, default=4096, help="K for crd and hkd (paper: 16384)")
    parser.add_argument("--methods", nargs="+", help="subset of methods (default: all registered here)")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    bs = args.batch_size
    batch = Batch(
        inputs={"image": torch.randn(bs, 3, 32, 32, generator=generator)},
        targets=torch.randint(0, 10, (bs,), generator=generator),
        index=torch.randperm(NUM_SAMPLES, generator=generator)[:bs],
    )
    names = [n for n in (args.methods or VARIANTS) if n in METHODS]
    missing = [n for n in (args.methods or VARIANTS) if n not in METHODS]
    steps, extra = {}, {}
    for name in names:
        params = dict(VARIANTS.get(name, {}))
        if name in ("crd", "hkd"):
            params["num_negatives"] = args.negatives
        steps[name], extra[name] = make_step(name, params, batch)
        steps[name]()  # warm-up (first-batch initialisation such as CRD's Z)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for round_index in range(args.rounds):
        for name in names:
            for _ in range(args.repeats):
                start = time.perf_counter()
                steps[name]()
                samples[name].append(time.perf_counter() - start)
        print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr)
    median = {n: statistics.median(v) for n, v in samples.items()}
    base = median["kd"] if "kd" in median else None
    alone = median["ce"] if "ce" in median else None

    def ratio(value: float, reference: float | None) -> str:
        return f"{value / reference:.2f}x" if reference else "-"

    lines = [
        f"resnet20 -> resnet8, 32x32x3, batch {bs}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"median of {args.rounds} interleaved rounds x {args.repeats} steps; crd/hkd with K = {args.negatives} "
        f"negatives and N = {NUM_SAMPLES:,} bank rows.",
        "",
        "| method | extra parameters | ms / step | time vs kd | time vs student alone |",
        "| --- | ---: | ---: | ---: | ---: |",
        *[
            f"| {n} | {extra[n]:,} | {median[n] * 1000:.0f} | {ratio(median[n], base)} | {ratio(median[n], alone)} |"
            for n in names
        ],
    ]
    if missing:
        lines.append(f"\nNot registered in this build: {', '.join(missing)}.")
    table = "\n".join(lines)
    print(table)
    if args.record:
        results = Path(__file__).resolve().parent / "RESULTS.md"
        section = (
            f"\n## Method cost (`python benchmarks/method_cost.py --record`), {time.strftime('%Y-%m-%d')}\n\n{table}\n"
        )
        results.write_text((results.read_text() if results.exists() else "# Benchmark results\n") + section)


if __name__ == "__main__":
    main()

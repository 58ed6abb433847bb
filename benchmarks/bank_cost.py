"""What a KD step costs when the teacher's logits come from the teacher bank.

Measures, in one process, with every variant called back to back in a rotating order (so machine
noise hits every variant alike; ratios are medians of per-call ratios), on
CIFAR-10-shaped batches of 128 with a resnet8 student and a resnet20 teacher:

* (a) a plain student step: cross-entropy, forward, backward, SGD;
* (b) a ``kd`` Distiller step whose teacher logits come from ``TeacherBank.lookup`` (the lookup is
  inside the timed step);
* (c) a ``kd`` Distiller step with the live teacher.

Target (teacher-bank issue): (b) / (a) <= 1.05.

Real CIFAR-10 is used when ``benchmarks/.cache/cifar-10-batches-py`` exists, otherwise random
images of the same shape (said in the output). The bank is built over the first
``--bank-samples`` training images (a lookup's cost does not depend on the bank's length) in a
temporary folder, unless ``--bank-dir`` is given.

    python benchmarks/bank_cost.py [--rounds 5] [--repeats 5] [--batch-size 128] [--record]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdforge.core.checkpoint import atomic_save, model_record
from kdforge.data import BatchLoader, DatasetInfo, TensorData, default_augmentation, load_dataset
from kdforge.data.batch import Batch
from kdforge.engine.bank import TeacherBank
from kdforge.methods import METHODS, Step
from kdforge.models import create

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"


def cifar10() -> tuple[TensorData, DatasetInfo, str]:
    """The CIFAR-10 training split, its info and where it came from."""
    if (CACHE / "cifar-10-batches-py").is_dir():
        splits = load_dataset("cifar10", root=str(CACHE))
        return splits.train, splits.info, "real CIFAR-10 (benchmarks/.cache)"
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50000, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (50000,), generator=generator)
    info = DatasetInfo(
        "cifar10", 10, 3, (32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), [str(i) for i in range(10)]
    )
    return TensorData(images, labels, name="cifar10/train"), info, "random images of CIFAR-10's shape"


def timed(fn, repeats: int) -> float:
    """Median seconds per call over ``repeats`` calls (after one warm-up call)."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def make_plain_step(student: torch.nn.Module, batch: Batch):
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    student.train()

    def step():
        loss = torch.nn.functional.cross_entropy(student(batch.image), batch.targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_kd_step(student: torch.nn.Module, teacher: torch.nn.Module, batch: Batch, bank: TeacherBank | None):
    # a batch of its own: the stored logits must never leak into the live variant's batch
    batch = Batch(inputs=dict(batch.inputs), targets=batch.targets, index=batch.index)
    distiller = METHODS.get("kd")(student, [teacher])
    distiller.train()
    optimizer = torch.optim.SGD(
        [p for p in distiller.parameters() if p.requires_grad], lr=0.01, momentum=0.9, weight_decay=5e-4
    )
    step_info = Step()

    def step():
        if bank is not None:
            batch.extras["teacher_logits"] = bank.lookup(0, batch.index)
        out = distiller(batch, step_info)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant per round")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--bank-samples", type=int, default=2048, help="training images the bank covers")
    parser.add_argument("--bank-dir", default=None, help="bank folder (default: a temporary one)")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.manual_seed(0)

    data, info, source = cifar10()
    data = data.select(torch.arange(min(args.bank_samples, len(data))))
    augmentation = default_augmentation(info)
    bs = args.batch_size
    loader = BatchLoader(data, bs, shuffle=True, seed=0, augmentation=augmentation)
    batch = next(iter(loader))

    with tempfile.TemporaryDirectory() as tmp:
        teacher = create("resnet20", num_classes=10)
        teacher_file = Path(tmp) / "resnet20.pt"
        atomic_save(
            model_record(teacher, name="resnet20", kwargs={}, num_classes=10, in_channels=3, input_size=(32, 32)),
            teacher_file,
        )
        bank = TeacherBank(
            args.bank_dir or Path(tmp) / "bank", [teacher], [teacher_file], data, info.name, augmentation, seed=0
        )
        started = time.perf_counter()
        bank.ensure_epoch(0)
        fill_seconds = time.perf_counter() - started
        bank.lookup(0, batch.index)  # the epoch is in memory from here on, as in training
        # each variant trains its own student copy, so they all do the same work
        initial = create("resnet8", num_classes=10).state_dict()

        def student() -> torch.nn.Module:
            model = create("resnet8", num_classes=10)
            model.load_state_dict(initial)
            return model

        variants = {
            "(a) resnet8 step (CE)": make_plain_step(student(), batch),
            "(b) KD step, bank lookup": make_kd_step(student(), teacher, batch, bank),
            "(c) KD step, live resnet20": make_kd_step(student(), teacher, batch, None),
        }
        lookup = lambda: bank.lookup(0, batch.index)  # noqa: E731
        names = list(variants)
        for fn in variants.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in names}
        ratios: dict[str, list[float]] = {name: [] for name in names[1:]}
        lookup_times: list[float] = []
        for round_index in range(args.rounds):
            for repeat in range(args.repeats):
                # back-to-back calls of every variant, in a rotating order: each ratio compares
                # steps taken a few hundred ms apart, so slow drifts of the machine's load cancel
                shift = (round_index * args.repeats + repeat) % len(names)
                sample = {}
                for name in names[shift:] + names[:shift]:
                    start = time.perf_counter()
                    variants[name]()
                    sample[name] = time.perf_counter() - start
                for name, seconds in sample.items():
                    times[name].append(seconds)
                for name in ratios:
                    ratios[name].append(sample[name] / sample[names[0]])
            lookup_times.append(timed(lookup, args.repeats))
            print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)

    per_batch = {name: statistics.median(values) for name, values in times.items()}
    plain = per_batch[names[0]]
    ratio = {name: statistics.median(values) for name, values in ratios.items()}
    ratio[names[0]] = 1.0
    bank_ratio, live_ratio = ratio[names[1]], ratio[names[2]]
    lookup_ms = statistics.median(lookup_times) * 1000
    lines = [
        f"Data: {source}; batch {bs}; resnet20 -> resnet8; {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}; {args.rounds} rounds x {args.repeats} back-to-back calls of each step "
        f"(rotating order); times are medians, ratios medians of per-call ratios. "
        f"Bank: {len(data)} images, float16, filled in {fill_seconds:.1f} s.",
        "",
        "| step | ms / batch | images / s | x plain step |",
        "| --- | ---: | ---: | ---: |",
        *[
            f"| {name} | {seconds * 1000:.1f} | {bs / seconds:,.0f} | {ratio[name]:.3f} |"
            for name, seconds in per_batch.items()
        ],
        f"| bank lookup alone (K x B x C float32) | {lookup_ms:.3f} | | {lookup_ms / 1000 / plain:.4f} |",
        "",
        f"- KD step with the bank / plain student step: **{bank_ratio:.3f}x** (target <= 1.05x)",
        f"- KD step with the live teacher / plain student step: **{live_ratio:.3f}x**",
    ]
    table = "\n".join(lines)
    print(table)
    if args.record:
        results = HERE / "RESULTS.md"
        stamp = time.strftime("%Y-%m-%d")
        section = f"\n## Teacher bank cost (`python benchmarks/bank_cost.py --record`), {stamp}\n\n{table}\n"
        results.write_text((results.read_text() if results.exists() else "# Benchmark results\n") + section)


if __name__ == "__main__":
    main()

"""Training throughput on CIFAR-10: data pipeline, students alone, KD steps.

Measures, in one process and interleaved rounds (so machine noise hits every variant alike):

* the data pipeline alone (gather uint8 images by index, crop + flip + normalise, batch of 128);
* a training step (forward, backward, SGD) of resnet8 and resnet20 alone;
* a teacher forward (inference mode) of resnet56 and resnet20;
* a KD step (the ``kd`` Distiller: teacher forward + student step + loss) for resnet56->resnet20
  and resnet20->resnet8;
* the end-to-end loop of the real Trainer (data + KD step) for resnet20->resnet8.

The project's speed goals: the data pipeline costs under 5% of a resnet8 training step; a KD step
costs at most 1.1x (student step + teacher forward) measured separately.

Real CIFAR-10 is used when ``../shared/data`` has it (materialised once into the official format
under ``benchmarks/.cache``); otherwise random images of the same shape (said in the output).

    python benchmarks/throughput.py [--rounds 5] [--batch-size 128] [--record]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from kdforge.data import BatchLoader, TensorData, default_augmentation, load_dataset
from kdforge.data.batch import Batch
from kdforge.methods import METHODS, Step
from kdforge.models import create

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
CACHE = HERE / ".cache"


def cifar10() -> tuple[TensorData, object, str]:
    """The CIFAR-10 training split, its info and where it came from."""
    if not (CACHE / "cifar-10-batches-py").is_dir() and (SHARED / "data" / "cifar10_jpeg_bytes.npz").is_file():
        CACHE.mkdir(exist_ok=True)
        subprocess.run(
            [sys.executable, str(SHARED / "tools" / "materialize_datasets.py"), str(CACHE), "--only", "cifar10"],
            check=True,
            capture_output=True,
        )
    if (CACHE / "cifar-10-batches-py").is_dir():
        splits = load_dataset("cifar10", root=str(CACHE))
        return splits.train, splits.info, "real CIFAR-10 (../shared/data)"
    from kdforge.data import DatasetInfo

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50000, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (50000,), generator=generator)
    info = DatasetInfo(
        "cifar10", 10, 3, (32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), [str(i) for i in range(10)]
    )
    return TensorData(images, labels), info, "random images of CIFAR-10's shape (no ../shared/data)"


def timed(fn, repeats: int) -> float:
    """Median seconds per call over ``repeats`` calls (after one warm-up call)."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def make_step(model: torch.nn.Module, batch: Batch):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()

    def step():
        loss = torch.nn.functional.cross_entropy(model(batch.image), batch.targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_teacher_forward(model: torch.nn.Module, batch: Batch):
    model.eval()

    def forward():
        with torch.inference_mode():
            model(batch.image)

    return forward


def make_kd_step(student: torch.nn.Module, teacher: torch.nn.Module, batch: Batch):
    distiller = METHODS.get("kd")(student, [teacher])
    distiller.train()
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    def step():
        out = distiller(batch, Step())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_pipeline(data: TensorData, info, batch_size: int):
    loader = BatchLoader(data, batch_size, shuffle=True, seed=0, augmentation=default_augmentation(info))

    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = batches()
    return lambda: next(stream)


def trainer_loop(info_source: str, batch_size: int) -> float:
    """Images/s of the real Trainer's KD loop (data + step), resnet20 -> resnet8, second epoch."""
    import json
    import tempfile

    from kdforge.config import build_config
    from kdforge.core.checkpoint import atomic_save, model_record
    from kdforge.engine.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        teacher = create("resnet20", num_classes=10)
        atomic_save(
            model_record(teacher, name="resnet20", kwargs={}, num_classes=10, in_channels=3, input_size=(32, 32)),
            Path(tmp) / "teacher.pt",
        )
        data = {"name": "cifar10", "root": str(CACHE), "train_subset": 40 * batch_size}
        config = build_config(
            {
                "name": "throughput",
                "data": data,
                "student": {"name": "resnet8"},
                "teachers": [{"checkpoint": str(Path(tmp) / "teacher.pt")}],
                "method": {"name": "kd"},
                "train": {
                    "epochs": 2,
                    "batch_size": batch_size,
                    "eval_every": 100,
                    "progress": "none",
                    "eval_batch_size": 1000,
                },
            }
        )
        Trainer(config, Path(tmp) / "run").fit()
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["train"]["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant per round")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.manual_seed(0)

    data, info, source = cifar10()
    bs = args.batch_size
    loader = BatchLoader(data, bs, shuffle=True, seed=0, augmentation=default_augmentation(info))
    batch = next(iter(loader))
    models = {name: create(name, num_classes=10) for name in ("resnet8", "resnet20", "resnet56")}
    # teachers are separate copies so that a student's updates never touch them
    teachers = {name: create(name, num_classes=10) for name in ("resnet20", "resnet56")}

    variants = {
        "data pipeline (gather + augment)": make_pipeline(data, info, bs),
        "resnet8 step": make_step(models["resnet8"], batch),
        "resnet20 step": make_step(models["resnet20"], batch),
        "resnet20 teacher forward": make_teacher_forward(teachers["resnet20"], batch),
        "resnet56 teacher forward": make_teacher_forward(teachers["resnet56"], batch),
        "KD step resnet56->resnet20": make_kd_step(create("resnet20", num_classes=10), teachers["resnet56"], batch),
        "KD step resnet20->resnet8": make_kd_step(create("resnet8", num_classes=10), teachers["resnet20"], batch),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn, args.repeats))
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    per_batch = {name: statistics.median(values) for name, values in times.items()}
    loop_images_per_second = trainer_loop(source, bs) if (CACHE / "cifar-10-batches-py").is_dir() else None

    rows = [(name, seconds * 1000, bs / seconds) for name, seconds in per_batch.items()]
    pipeline_share = per_batch["data pipeline (gather + augment)"] / per_batch["resnet8 step"]
    kd_ratios = {
        "resnet56->resnet20": per_batch["KD step resnet56->resnet20"]
        / (per_batch["resnet20 step"] + per_batch["resnet56 teacher forward"]),
        "resnet20->resnet8": per_batch["KD step resnet20->resnet8"]
        / (per_batch["resnet8 step"] + per_batch["resnet20 teacher forward"]),
    }
    lines = [
        f"Data: {source}; batch {bs}; {torch.get_num_threads()} threads; torch {torch.__version__}; "
        f"median of {args.rounds} interleaved rounds x {args.repeats} calls.",
        "",
        "| what | ms / batch | images / s |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {ms:.1f} | {ips:,.0f} |" for name, ms, ips in rows],
    ]
    if loop_images_per_second:
        lines.append(
            f"| Trainer loop, KD resnet20->resnet8 (data + step) | {bs / loop_images_per_second * 1000:.1f} | {loop_images_per_second:,.0f} |"  # noqa: E501
        )
    lines += [
        "",
        f"- data pipeline / resnet8 step: **{pipeline_share * 100:.1f}%** (target < 5%)",
        *[
            f"- KD step / (student step + teacher forward), {pair}: **{ratio:.3f}x** (target <= 1.1x)"
            for pair, ratio in kd_ratios.items()
        ],
    ]
    table = "\n".join(lines)
    print(table)
    if args.record:
        results = HERE / "RESULTS.md"
        stamp = time.strftime("%Y-%m-%d")
        section = f"\n## Throughput (`python benchmarks/throughput.py --record`), {stamp}\n\n{table}\n"
        results.write_text((results.read_text() if results.exists() else "# Benchmark results\n") + section)


if __name__ == "__main__":
    main()

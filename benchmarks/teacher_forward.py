"""What a frozen teacher allows: the forward time of zoo teachers as trained vs with BatchNorm folded
into the convolutions (kdforge.compress.fold), in contiguous and channels_last layouts.

One process, one thread, interleaved rounds; each figure is the median over rounds of the mean
over ``--repeats`` inference-mode forwards of a batch of 128 CIFAR-sized images, in thread CPU
time (steadier than wall time on a shared machine; with one thread the two agree when the machine
is idle). The folded teacher is checked to give the same logits first.

    python benchmarks/teacher_forward.py [--rounds 5] [--repeats 5] [--models resnet20,resnet56] [--record]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from kdforge.compress.fold import fold_batchnorm
from kdforge.models import create

HERE = Path(__file__).resolve().parent


def _trained_like(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, eval mode, no gradients (as a loaded teacher)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.3, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
    return model.eval().requires_grad_(False)


def cpu_time(fn, repeats: int) -> float:
    fn()  # warm-up
    started = time.thread_time()
    for _ in range(repeats):
        fn()
    return (time.thread_time() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--models", default="resnet20,resnet56,resnet32x4,wrn_40_2,vgg13")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 32, 32)
    images_cl = images.contiguous(memory_format=torch.channels_last)

    variants: dict[str, dict[str, object]] = {}
    for name in args.models.split(","):
        plain = _trained_like(create(name, num_classes=100 if name in ("resnet32x4", "wrn_40_2", "vgg13") else 10))
        folded = copy.deepcopy(plain)
        report = fold_batchnorm(folded)
        with torch.inference_mode():
            expected, got = plain(images), folded(images)
        error = float((expected - got).abs().max() / expected.abs().max())
        plain_cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
        folded_cl = copy.deepcopy(folded).to(memory_format=torch.channels_last)
        variants[name] = {
            "folded_layers": len(report.folded),
            "error": error,
            "runs": {
                "as trained": (plain, images),
                "folded": (folded, images),
                "as trained, channels_last": (plain_cl, images_cl),
                "folded, channels_last": (folded_cl, images_cl),
            },
        }

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, info in variants.items():
            for label, (model, batch) in info["runs"].items():  # type: ignore[union-attr]

                def forward(model=model, batch=batch) -> None:
                    with torch.inference_mode():
                        model(batch)

                times.setdefault((name, label), []).append(cpu_time(forward, args.repeats))

    rows = [
        "| teacher | BN folded | max rel. error | as trained ms | folded ms | saving | channels_last ms | "
        "folded + channels_last ms | saving |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, info in variants.items():
        t = {label: 1000 * statistics.median(times[(name, label)]) for label in info["runs"]}  # type: ignore[union-attr]
        rows.append(
            f"| {name} | {info['folded_layers']} | {info['error']:.1e} | {t['as trained']:.1f} | {t['folded']:.1f} "
            f"| {1 - t['folded'] / t['as trained']:.0%} | {t['as trained, channels_last']:.1f} "
            f"| {t['folded, channels_last']:.1f} | {1 - t['folded, channels_last'] / t['as trained']:.0%} |"
        )
    note = (
        f"Teacher forward, batch {args.batch_size} x 3 x 32 x 32, inference mode, 1 thread, thread CPU time, "
        f"median of {args.rounds} interleaved rounds x {args.repeats} forwards; savings relative to 'as trained'"
    )
    table = "\n".join([note, "", *rows])
    print(table)
    if args.record:
        with (HERE / "RESULTS.md").open("a") as f:
            f.write(f"\n### Frozen-teacher forward: BatchNorm folding, channels_last ({time.strftime('%Y-%m-%d')})\n\n")
            f.write(table + "\n")


if __name__ == "__main__":
    main()

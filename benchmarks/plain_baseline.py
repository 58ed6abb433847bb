"""Live KD in ``kdforge train`` against the plain-PyTorch loop a typical user writes.

The baseline is what most KD code does (RepDistiller, mdistiller, torchdistill's default CIFAR
pipeline): a torchvision-style ``Dataset`` whose ``__getitem__`` transforms one image at a time
(random crop with 4-pixel padding, horizontal flip, to float, normalise), a ``DataLoader`` with 2
worker processes, and a loop that runs the teacher under ``no_grad`` and the student with
``F.kl_div`` + cross-entropy and SGD. Same networks (kdforge's resnet20 teacher checkpoint and a
fresh resnet8), same subset, batch 128, same KD loss; torch's default threads in both.

Each variant runs in its own process, in interleaved rounds; the figure is training images per
second over the epochs after the first (the first pays start-up and worker spawning), median over
rounds.

    python benchmarks/plain_baseline.py --root data [--rounds 2] [--epochs 3] [--subset 5000] [--record]

Target: kdforge's live KD >= 1.5x the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TEACHER = HERE / "teachers" / "cifar10_resnet20.pt"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def baseline(root: str, subset: int, epochs: int) -> list[float]:
    """The plain loop; returns images/s of each epoch (run in a fresh process)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Dataset

    from kdforge.compress.arch import load_model_file
    from kdforge.data import load_dataset
    from kdforge.models import create

    splits = load_dataset("cifar10", root=root, train_subset=subset)
    images = splits.train.images.permute(0, 2, 3, 1).numpy()  # N x 32 x 32 x 3 uint8, as the pickles hold
    labels = splits.train.labels.numpy()
    mean = np.array(MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.array(STD, dtype=np.float32).reshape(3, 1, 1)

    class Cifar(Dataset):
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int):
            image = np.pad(images[i], ((4, 4), (4, 4), (0, 0)))
            top, left = np.random.randint(0, 9, size=2)
            image = image[top : top + 32, left : left + 32]
            if np.random.rand() < 0.5:
                image = image[:, ::-1]
            x = (image.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std
            return torch.from_numpy(np.ascontiguousarray(x)), int(labels[i])

    loader = DataLoader(Cifar(), batch_size=128, shuffle=True, num_workers=2, drop_last=True)
    teacher, _ = load_model_file(str(TEACHER))
    teacher.eval()
    student = create("resnet8", num_classes=10)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    speeds = []
    for _ in range(epochs):
        started, seen = time.perf_counter(), 0
        student.train()
        for x, y in loader:
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            kd = F.kl_div(F.log_softmax(s_logits / 4, 1), F.softmax(t_logits / 4, 1), reduction="batchmean") * 16
            loss = 0.9 * kd + 0.1 * F.cross_entropy(s_logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(y)
        speeds.append(seen / (time.perf_counter() - started))
    return speeds


def kdforge_run(root: str, subset: int, epochs: int, folder: Path) -> list[float]:
    recipe = {
        "name": "plain-vs-kdforge",
        "data": {"name": "cifar10", "root": root, "train_subset": subset},
        "student": {"name": "resnet8"},
        "teachers": [{"checkpoint": str(TEACHER)}],
        "method": {"name": "kd", "temperature": 4, "kd_weight": 0.9, "ce_weight": 0.1},
        "train": {
            "epochs": epochs,
            "batch_size": 128,
            "progress": "none",
            "eval_every": 1000,
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
        },
    }
    path = folder / "kd.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = folder / f"run{time.monotonic_ns()}"
    subprocess.run([sys.executable, "-m", "kdforge", "train", str(path), "--out", str(out)], check=True)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line["train"]["images_per_second"] for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=5000)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--_baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._baseline:  # the child process of one baseline run
        print(json.dumps(baseline(args.root, args.subset, args.epochs)))
        return
    if not (Path(args.root) / "cifar-10-batches-py").is_dir():
        sys.exit(f"no CIFAR-10 under '{args.root}'; pass --root")
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            command = [sys.executable, __file__, "--_baseline", "--root", args.root]
            command += ["--subset", str(args.subset), "--epochs", str(args.epochs)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            theirs.append(statistics.median(json.loads(done.stdout.strip().splitlines()[-1])[1:]))
            ours.append(statistics.median(kdforge_run(args.root, args.subset, args.epochs, Path(tmp))[1:]))
            print(f"round {r}: plain {theirs[-1]:.0f} img/s, kdforge {ours[-1]:.0f} img/s", flush=True)
    ratio = statistics.median(o / t for o, t in zip(ours, theirs))
    table = "\n".join(
        [
            f"Live KD resnet20 -> resnet8, CIFAR-10 {args.subset} images, batch 128, torch's default threads, "
            f"{args.rounds} interleaved rounds, train images/s of epochs 2-{args.epochs} (median)",
            "",
            "| variant | train images/s |",
            "|---|---|",
            f"| plain PyTorch (per-sample transforms, DataLoader with 2 workers) | {statistics.median(theirs):.0f} |",
            f"| kdforge train (defaults) | {statistics.median(ours):.0f} |",
            f"| ratio kdforge / plain | {ratio:.2f} |",
        ]
    )
    print(table)
    if args.record:
        with (HERE / "RESULTS.md").open("a") as f:
            f.write(f"\n### kdforge vs the plain-PyTorch loop ({time.strftime('%Y-%m-%d')})\n\n{table}\n")


if __name__ == "__main__":
    main()

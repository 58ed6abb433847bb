"""int8 vs float: accuracy and measured CPU latency of a distilled student, PTQ and QAT.

Rows, for the student (default: the cifar10-lite-lma suite's ReLU KD student, seed 0; trained here
with the same recipe when that run does not exist) and for its teacher (the kept resnet20):

* float, PyTorch (eager, eval mode);
* float, ONNX Runtime (the exported file: ``kdforge export``);
* int8, ONNX Runtime static quantization (QDQ, int8 weights per output channel, uint8 activations
  per tensor, min/max calibration on ``--calibration-batches`` shuffled training batches of 64);
* student only: QAT, ``--qat-epochs`` epochs of fake-quantized fine-tuning with KD (T 4, 0.9/0.1)
  from the float teacher (lr 0.01, cosine), then the same int8 export; and the fake-quant PyTorch
  accuracy of that network.

Accuracy: the full test set. Latency: median of ``--repeats`` forwards at batch 1 and 64 with
``--threads`` intra-op threads (PyTorch and ONNX Runtime alike), random inputs of the data's shape.
Size: the file on disk (ONNX files; the PyTorch row is the serialised state dict).

    python benchmarks/quantize.py [--student PATH] [--qat-epochs 3] [--threads 1] [--record]
    python benchmarks/quantize.py --quick     # digits, tiny: checks the mechanics in about a minute
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from kdforge.commands.export import calibration_batches
from kdforge.compress.arch import input_shape_of, load_model_file
from kdforge.compress.export import quantize_model
from kdforge.compress.footprint import size_on_disk
from kdforge.compress.quantize import OnnxModule, require_onnxruntime
from kdforge.config import DataConfig, build_config
from kdforge.engine.build import build_augmentation, build_data
from kdforge.engine.trainer import Trainer, evaluate_model
from kdforge.models.profile import measure_latency

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KD = {"name": "kd", "temperature": 4, "kd_weight": 0.9, "ce_weight": 0.1}
SUITE_STUDENT = ROOT / "runs/suites/cifar10-lite-lma/resnet20-resnet8-relu/kd/seed0/checkpoints/model_last.pt"


def train_if_missing(run_dir: Path, recipe: dict[str, Any]) -> Path:
    summary = run_dir / "summary.json"
    if not (summary.is_file() and json.loads(summary.read_text()).get("status") == "finished"):
        Trainer(build_config(recipe), run_dir, resume=run_dir.exists()).fit()
    return run_dir / "checkpoints" / "model_last.pt"


def measure(
    network: torch.nn.Module, shape: tuple, split, augmentation, threads: int, repeats: int
) -> dict[str, float]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        top1 = evaluate_model(network, split, augmentation, 500)["top1"]
        latency = {b: 1000 * measure_latency(network, shape, b, warmup=3, repeats=repeats) for b in (1, 64)}
    finally:
        torch.set_num_threads(previous)
    return {"top1": top1, "b1": latency[1], "b64": latency[64]}


def rows_for(label: str, checkpoint: Path, out: Path, data, augmentation, data_cfg: dict, args) -> list[tuple]:
    """float PyTorch, float ONNX Runtime and int8 ONNX Runtime rows of one model file."""
    model, record = load_model_file(checkpoint)
    shape = input_shape_of(record)
    calibration = calibration_batches(data_cfg["name"], data_cfg.get("root"), args.calibration_batches, 64)
    float_path, int8_path = quantize_model(model, out / f"{label}.int8.onnx", shape, calibration)
    found = []
    for kind, network, size in (
        ("float, PyTorch", model, size_on_disk(model)),
        ("float, ONNX Runtime", OnnxModule(float_path, args.threads), float_path.stat().st_size),
        ("int8, ONNX Runtime (static, per-channel)", OnnxModule(int8_path, args.threads), int8_path.stat().st_size),
    ):
        result = measure(network, shape, data.test, augmentation, args.threads, args.repeats)
        found.append((label, kind, result, size))
        print(
            f"{label} {kind}: top-1 {result['top1']:.2f}%, b1 {result['b1']:.2f} ms, b64 {result['b64']:.1f} ms",
            flush=True,
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits and a tiny budget: a mechanics check")
    parser.add_argument(
        "--student", help=f"student model file (default: {SUITE_STUDENT.relative_to(ROOT)}, trained here when missing)"
    )
    parser.add_argument("--teacher", default=str(HERE / "teachers" / "cifar10_resnet20.pt"))
    parser.add_argument("--root", default=str(ROOT / "data"), help="folder holding cifar-10-batches-py")
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for the latency measurements")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "quantize"))
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    require_onnxruntime()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    started = time.perf_counter()
    out = Path(args.out) / ("quick" if args.quick else "cifar10")
    out.mkdir(parents=True, exist_ok=True)

    if args.quick:
        data_cfg = {"name": "digits", "augment": False}
        small = {
            "epochs": 4,
            "batch_size": 64,
            "optimizer": {"name": "sgd", "lr": 0.05},
            "scheduler": {"name": "cosine"},
            "progress": "none",
        }
        teacher = train_if_missing(
            out / "teacher",
            {"data": data_cfg, "student": {"name": "resnet8"}, "method": {"name": "ce"}, "train": small},
        )
        student = train_if_missing(
            out / "student",
            {
                "data": data_cfg,
                "student": {"name": "lenet"},
                "method": KD,
                "teachers": [{"checkpoint": str(teacher)}],
                "train": small,
            },
        )
        args.calibration_batches, args.repeats = min(args.calibration_batches, 4), min(args.repeats, 5)
        qat_train = {**small, "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.01}}
    else:
        data_cfg = {"name": "cifar10", "root": args.root}
        teacher = Path(args.teacher)
        cifar = {
            "data": {**data_cfg, "train_subset": 10000},
            "train": {
                "epochs": 15,
                "batch_size": 128,
                "progress": "none",
                "scheduler": {"name": "onecycle"},
                "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
            },
            "teacher_bank": {"enabled": True},
        }
        if args.student:
            student = Path(args.student)
        elif SUITE_STUDENT.is_file():
            student = SUITE_STUDENT
        else:  # the suite's recipe (cifar10-lite, KD from the resnet20 teacher, seed 0)
            student = train_if_missing(
                out / "student",
                {**cifar, "student": {"name": "resnet8"}, "method": KD, "teachers": [{"checkpoint": str(teacher)}]},
            )
        qat_train = {
            **cifar["train"],
            "epochs": args.qat_epochs,
            "scheduler": {"name": "cosine"},
            "optimizer": {**cifar["train"]["optimizer"], "lr": 0.01},
        }

    cfg = DataConfig(**{**data_cfg, "augment": False})
    data = build_data(cfg)
    augmentation = build_augmentation(cfg, data.info)

    rows = rows_for("student", student, out, data, augmentation, data_cfg, args)
    qat_recipe = {
        "data": {**data_cfg, **({} if args.quick else {"train_subset": 10000})},
        "student": {"checkpoint": str(student), "qat": {"weight_bits": 8, "activation_bits": 8}},
        "teachers": [{"checkpoint": str(teacher)}],
        "method": KD,
        "train": qat_train,
        "teacher_bank": {"enabled": not args.quick},
    }
    qat_file = train_if_missing(out / "qat", qat_recipe)
    qat_summary = json.loads((out / "qat" / "summary.json").read_text())
    fake_top1 = qat_summary["final"]["test"]["top1"]
    print(f"QAT student (fake-quantized, PyTorch): top-1 {fake_top1:.2f}%", flush=True)
    qat_rows = rows_for("student_qat", qat_file, out, data, augmentation, data_cfg, args)
    rows += [row for row in qat_rows if row[1].startswith("int8")]
    rows += rows_for("teacher", teacher, out, data, augmentation, data_cfg, args)

    minutes = (time.perf_counter() - started) / 60
    names = {
        "student": f"student ({load_model_file(student)[1]['model']['name']})",
        "student_qat": f"student + QAT {qat_train['epochs']} ep. (KD from float teacher)",
        "teacher": f"teacher ({load_model_file(teacher)[1]['model']['name']})",
    }
    base = {
        label: next(r for r in rows if r[0] == label and r[1] == "float, ONNX Runtime")
        for label in ("student", "teacher")
    }
    intro = (
        f"Data: {'digits (quick mechanics check)' if args.quick else 'CIFAR-10, full 10,000-image test set'}; "
        f"student `{student.name if args.quick else student.relative_to(ROOT) if student.is_relative_to(ROOT) else student}`, "  # noqa: E501
        f"teacher `{teacher.name}`. int8 = ONNX Runtime static quantization (QDQ; int8 weights per output channel, "
        f"uint8 activations per tensor; min/max calibration on {args.calibration_batches} training batches of 64). "
        f"Latency: median of {args.repeats} forwards, {args.threads} thread(s), PyTorch and ONNX Runtime alike. "
        f"The QAT network's fake-quantized PyTorch top-1 is {fake_top1:.2f}%."
    )
    lines = [
        intro,
        "",
        "| network | runtime | top-1 (%) | Δ vs float | size (MB) | CPU ms, batch 1 | CPU ms, batch 64 | speed-up b64 vs ORT float |",  # noqa: E501
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, kind, result, size in rows:
        reference = base["teacher" if label == "teacher" else "student"][2]
        delta = "" if kind.startswith("float") else f"{result['top1'] - reference['top1']:+.2f}"
        lines.append(
            f"| {names[label]} | {kind} | {result['top1']:.2f} | {delta} | {size / 1e6:.3f} | {result['b1']:.3f} "
            f"| {result['b64']:.2f} | {reference['b64'] / result['b64']:.2f}× |"
        )
    lines.append(f"\nWall time: {minutes:.1f} min (2 cores).")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    if args.record:
        results = HERE / "RESULTS.md"
        command = "python benchmarks/quantize.py" + (" --quick" if args.quick else "") + " --record"
        section = f"\n## int8 vs float students (`{command}`), {time.strftime('%Y-%m-%d')}\n\n{table}\n"
        results.write_text((results.read_text() if results.exists() else "# Benchmark results\n") + section)


if __name__ == "__main__":
    main()

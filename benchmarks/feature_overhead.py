"""Overhead of kdforge's feature path: each feature/relation method's training step against its
physical limit, the same work done by hand.

For every method the limit is what the method cannot avoid: the student's training step
(forward with hooks on the same layers the method taps, cross-entropy, backward, SGD step) plus
the teacher's inference-mode forward with hooks on the method's teacher layers. The method step
is the ``Distiller`` (taps, adapters, the Batch/Output wrapping, its loss) doing a full step. The
ratio method / limit is the overhead of the method's own loss and modules plus kdforge's
plumbing; the target for the plumbing is <= 1.05 on the methods whose loss is cheap (at, sp, pkt,
rkd, kd, dkd).

One process, one thread, interleaved rounds, thread CPU time (steadier than wall time on a shared
machine), medians. Default pair resnet20 -> resnet8 on CIFAR-10 shapes, batch 128; the mdistiller
table's pair is ``--teacher resnet32x4 --student resnet8x4 --classes 100 --batch-size 64``.

If mdistiller (github.com/megvii-research/mdistiller) is importable, or ``--mdistiller PATH``
points at a checkout, its distiller for the same method on its own models of the same pair is
timed in the same rounds and the ratio kdforge / mdistiller is reported; otherwise that column is
skipped. "kdforge defaults" is the same method step as ``kdforge train`` runs it by default
(frozen teacher's BatchNorm folded, channels_last networks and images); the other kdforge columns
use the plain contiguous, unfolded networks, like the reference code.

    python benchmarks/feature_overhead.py [--methods at,sp,pkt,rkd,fitnet,kd,dkd] [--rounds 5] [--record]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdforge.compress.fold import fold_frozen_teachers
from kdforge.core.allocator import tune_allocator
from kdforge.data.batch import Batch
from kdforge.methods import METHODS, Step
from kdforge.models import FeatureTap, create
from kdforge.models.precision import run_in_bfloat16

HERE = Path(__file__).resolve().parent
NUM_SAMPLES = 10_000
DEFAULT_METHODS = "kd,dkd,at,sp,pkt,rkd,fitnet,crd,review_kd"


def _taps_of(distiller, network) -> list[str]:
    """Names the method's FeatureTaps read on ``network`` (in the method's order)."""
    names: list[str] = []
    for value in vars(distiller).values():
        taps = value if isinstance(value, list) else [value]
        for tap in taps:
            if isinstance(tap, FeatureTap) and tap.model is network:
                names += [n for n in tap.names if n not in names]
    return names


def method_step(
    name: str,
    teacher_name: str,
    student_name: str,
    classes: int,
    batch: Batch,
    shape,
    defaults=False,
    compiled=False,
    teacher_bf16=False,
):
    """The method's full step; ``defaults``: as ``kdforge train`` runs it (teacher BatchNorm folded,
    networks and images channels_last)."""
    torch.manual_seed(0)
    student = create(student_name, num_classes=classes)
    teacher = create(teacher_name, num_classes=classes)
    method = METHODS.get(name)
    accepted = inspect.signature(method.__init__).parameters
    extra = {}
    if "input_shape" in accepted:
        extra["input_shape"] = shape
    if "num_samples" in accepted:
        extra["num_samples"] = NUM_SAMPLES
    params = {"num_negatives": 4096} if name == "crd" else {}
    distiller = method(student, [teacher] if method.teachers_required[1] != 0 else [], params, **extra)
    distiller.train()
    if defaults:
        fold_frozen_teachers([teacher], trained=[p for n, p in distiller.named_parameters() if "teachers." not in n])
        distiller.to(memory_format=torch.channels_last)
        batch = Batch(
            inputs={"image": batch.image.contiguous(memory_format=torch.channels_last)},
            targets=batch.targets,
            index=batch.index,
        )
    if teacher_bf16:  # train.teacher_precision: bf16
        run_in_bfloat16(teacher, "cpu")
    if compiled:  # as train.compile does for a long run: the student compiled in place
        student.compile()
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    step = Step(epoch=30, epochs=240, global_step=1000, total_steps=100_000)

    def run() -> None:
        out = distiller(batch, step)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run, _taps_of(distiller, student), _taps_of(distiller, teacher)


def limit_step(teacher_name: str, student_name: str, classes: int, batch: Batch, student_taps, teacher_taps):
    torch.manual_seed(0)
    student = create(student_name, num_classes=classes).train()
    teacher = create(teacher_name, num_classes=classes).eval().requires_grad_(False)
    s_tap = FeatureTap(student, student_taps) if student_taps else None
    t_tap = FeatureTap(teacher, teacher_taps, detach=True) if teacher_taps else None
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    images, targets = batch.image, batch.targets

    def run() -> None:
        with torch.inference_mode():
            teacher(images)
        logits = student(images)
        F.cross_entropy(logits, targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    run.taps = (s_tap, t_tap)  # type: ignore[attr-defined]  # keep the hooks alive
    return run


def mdistiller_step(name: str, path: str | None, teacher_name: str, student_name: str, classes: int, batch: Batch):
    """mdistiller's distiller for ``name`` on its own models, or None when unavailable."""
    if path:
        sys.path.insert(0, path)
    try:
        from mdistiller.distillers import distiller_dict  # type: ignore[import-not-found]
        from mdistiller.engine.cfg import CFG  # type: ignore[import-not-found]
        from mdistiller.models import cifar_model_dict  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - mdistiller absent or broken: skip the column
        return None
    key = {"kd": "KD", "dkd": "DKD", "at": "AT", "sp": "SP", "pkt": "PKT", "rkd": "RKD", "fitnet": "FITNET"}
    key |= {"crd": "CRD", "review_kd": "REVIEWKD"}
    if name not in key or teacher_name not in cifar_model_dict or student_name not in cifar_model_dict:
        return None
    torch.manual_seed(0)
    student = cifar_model_dict[student_name][0](num_classes=classes)
    teacher = cifar_model_dict[teacher_name][0](num_classes=classes)
    cfg = CFG.clone()
    cfg.DISTILLER.TYPE = key[name]
    cfg.CRD.NCE.K = 4096  # the same number of negatives as kdforge's run here
    args = (student, teacher, cfg) + ((NUM_SAMPLES,) if name == "crd" else ())
    try:
        distiller = distiller_dict[key[name]](*args)
    except (AssertionError, RuntimeError) as exc:  # e.g. mdistiller's CRD moves its sampler to CUDA
        print(f"mdistiller {key[name]} unavailable here: {exc}", file=sys.stderr)
        return None
    distiller.train()
    optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), lr=0.01, momentum=0.9)
    kwargs = {"epoch": 30}
    if name == "crd":
        kwargs |= {"index": batch.index, "contrastive_index": torch.randint(0, NUM_SAMPLES, (len(batch), 4097))}

    def run() -> None:
        _, losses = distiller(image=batch.image, target=batch.targets, **kwargs)
        sum(v.mean() for v in losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def cpu_seconds(fn, repeats: int) -> float:
    started = time.thread_time()
    for _ in range(repeats):
        fn()
    return (time.thread_time() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--teacher", default="resnet20")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mdistiller", help="path of an mdistiller checkout (optional)")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument(
        "--teacher-bf16",
        action="store_true",
        help="the 'kdforge defaults' column with train.teacher_precision: bf16 (teacher forward in bfloat16)",
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also time the defaults with the student compiled (train.compile's choice for long runs; slow warm-up)",
    )
    parser.add_argument(
        "--allocator",
        choices=("auto", "system"),
        default="auto",
        help="the C allocator for the whole process, as train.allocator (auto: kdforge train's default; "
        "it applies to every column, mdistiller's included)",
    )
    args = parser.parse_args()
    allocator = tune_allocator(args.allocator, "cpu")
    print(f"allocator: {allocator['reason']}", file=sys.stderr)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    shape = (3, 32, 32)
    batch = Batch(
        inputs={"image": torch.randn(args.batch_size, *shape, generator=generator)},
        targets=torch.randint(0, args.classes, (args.batch_size,), generator=generator),
        index=torch.randperm(NUM_SAMPLES, generator=generator)[: args.batch_size],
    )
    runs: dict[str, dict[str, object]] = {}
    for name in args.methods.split(","):
        step, s_taps, t_taps = method_step(name, args.teacher, args.student, args.classes, batch, shape)
        defaults_step, _, _ = method_step(
            name, args.teacher, args.student, args.classes, batch, shape, defaults=True, teacher_bf16=args.teacher_bf16
        )
        runs[name] = {
            "kdforge": step,
            "defaults": defaults_step,
            **(
                {"compiled": method_step(name, args.teacher, args.student, args.classes, batch, shape, True, True)[0]}
                if args.compiled
                else {}
            ),
            "limit": limit_step(args.teacher, args.student, args.classes, batch, s_taps, t_taps),
            "taps": (s_taps, t_taps),
        }
        other = mdistiller_step(name, args.mdistiller, args.teacher, args.student, args.classes, batch)
        if other is not None:
            runs[name]["mdistiller"] = other
        for key in ("kdforge", "defaults", "compiled", "limit", "mdistiller"):
            if key in runs[name]:
                runs[name][key]()  # warm-up (lazy buffers, CRD's normaliser)
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for name, variants in runs.items():
            for key in ("kdforge", "defaults", "compiled", "limit", "mdistiller"):
                if key in variants:
                    times.setdefault((name, key), []).append(cpu_seconds(variants[key], args.repeats))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    rows = [
        "| method | taps (student / teacher) | kdforge ms | limit ms | kdforge / limit | mdistiller ms "
        "| kdforge / mdistiller | kdforge defaults ms | defaults / mdistiller |"
        + (" defaults + compiled student ms | compiled / mdistiller |" if args.compiled else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.compiled else ""),
    ]
    for name, variants in runs.items():
        ours = 1000 * statistics.median(times[(name, "kdforge")])
        limit = 1000 * statistics.median(times[(name, "limit")])
        s_taps, t_taps = variants["taps"]  # type: ignore[misc]
        taps = f"{len(s_taps)} / {len(t_taps)}"
        fast = 1000 * statistics.median(times[(name, "defaults")])
        if (name, "mdistiller") in times:
            theirs = 1000 * statistics.median(times[(name, "mdistiller")])
            other = f"{theirs:.0f} | {ours / theirs:.2f} | {fast:.0f} | {fast / theirs:.2f}"
        else:
            other = f"- | - | {fast:.0f} | -"
        if (name, "compiled") in times:
            compiled = 1000 * statistics.median(times[(name, "compiled")])
            theirs_text = (
                f"{compiled / (1000 * statistics.median(times[(name, 'mdistiller')])):.2f}"
                if (name, "mdistiller") in times
                else "-"
            )
            other += f" | {compiled:.0f} | {theirs_text}"
        rows.append(f"| {name} | {taps} | {ours:.0f} | {limit:.0f} | {ours / limit:.2f} | {other} |")
    note = (
        f"{args.teacher} -> {args.student}, {args.classes} classes, batch {args.batch_size}, 1 thread, thread CPU "
        f"time, median of {args.rounds} interleaved rounds x {args.repeats} steps, torch {torch.__version__}, "
        f"allocator {args.allocator} ({'tuned' if allocator['tuned'] else 'as the system has it'})"
        + ("; 'kdforge defaults' with the teacher's forward in bfloat16" if args.teacher_bf16 else "")
    )
    table = "\n".join([note, "", *rows])
    print(table)
    if args.record:
        with (HERE / "RESULTS.md").open("a") as f:
            f.write(f"\n### Feature-path overhead ({time.strftime('%Y-%m-%d')})\n\n{table}\n")


if __name__ == "__main__":
    main()

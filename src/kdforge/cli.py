"""The ``kdforge`` command. It only wires: parse arguments, call the library, print results."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from kdforge.errors import KDForgeError


def _quiet_libraries() -> None:
    """Lightning prints hints meant for GPU users; keep the terminal for our own messages."""
    import logging

    for name in ("lightning", "lightning.fabric", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", module="lightning_fabric")


# ----------------------------------------------------------------------------- train
def train_run(config, out_dir: Path, resume: bool = False) -> dict[str, Any]:
    from kdforge.engine.trainer import Trainer

    return Trainer(config, out_dir, resume=resume).fit()


def cmd_train(args: argparse.Namespace) -> int:
    from kdforge.config import build_config, read_yaml
    from kdforge.engine.pipeline import is_pipeline, run_pipeline

    recipe = read_yaml(args.config)
    overrides = [item for group in args.set for item in group]
    if is_pipeline(recipe):
        out = Path(args.out or Path("runs") / Path(args.config).stem)
        summaries = run_pipeline(recipe, Path(args.config).parent, out, overrides, train_run)
        _print_table(summaries, out)
        return 0
    config = build_config(recipe, overrides)
    out = Path(args.out or Path("runs") / config.name)
    summary = train_run(config, out, resume=args.resume)
    _print_table({config.name: summary}, out)
    return 0


def _print_table(summaries: dict[str, dict[str, Any]], out: Path) -> None:
    rows = []
    for name, s in summaries.items():
        test = (s.get("final") or {}).get("test") or {}
        rows.append(
            (
                name,
                s.get("method", ""),
                s.get("student", ""),
                f"{test.get('top1', float('nan')):.2f}",
                f"{s.get('student_parameters', 0):,}",
                f"{s.get('train_seconds', 0):.1f}",
            )
        )
    header = ("run", "method", "network", "top-1 (%)", "parameters", "train s")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    print(line(header))
    for row in rows:
        print(line(row))
    print(f"run directories: {out}")


# ----------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from kdforge.config import DataConfig
    from kdforge.engine.build import build_augmentation, build_data
    from kdforge.engine.checkpoint import load_weights, read_model_file
    from kdforge.engine.trainer import evaluate_model
    from kdforge.errors import CheckpointError, ConfigError
    from kdforge.models import create

    record = read_model_file(args.checkpoint)
    spec = record.get("model") or {}
    if not spec.get("name"):
        raise CheckpointError(f"'{args.checkpoint}' is a plain state dict; evaluate a kdforge model file")
    dataset = args.data or (record.get("dataset") or {}).get("name")
    if not dataset:
        raise ConfigError("the checkpoint does not say its dataset; pass --data NAME")
    data_cfg = DataConfig(name=dataset, root=args.root, augment=False)
    data = build_data(data_cfg)
    if data.info.num_classes != spec["num_classes"]:
        raise CheckpointError(
            f"'{args.checkpoint}' predicts {spec['num_classes']} classes; dataset '{dataset}' has {data.info.num_classes}"
        )
    model = create(spec["name"], num_classes=spec["num_classes"], in_channels=spec["in_channels"],
                   input_size=tuple(spec["input_size"]) if spec.get("input_size") else None, **spec.get("kwargs", {}))
    load_weights(model, record["state_dict"], str(args.checkpoint))
    split = data.test if args.split == "test" else data.train
    result = evaluate_model(model, split, build_augmentation(data_cfg, data.info), args.batch_size)
    result = {"checkpoint": str(args.checkpoint), "model": spec["name"], "dataset": dataset,
              "split": args.split, "images": len(split), **result}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{spec['name']} on {dataset} {args.split} ({len(split)} images): "
              f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}")
    return 0


# ----------------------------------------------------------------------------- list / profile
def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "models":
        from kdforge.models import MODELS as registry
    elif args.what == "methods":
        from kdforge.methods import METHODS as registry
    else:
        from kdforge.data import DATASETS as registry
    width = max(len(n) for n in registry.names())
    for name in registry.names():
        print(f"{name.ljust(width)}  {registry.describe(name)}")
    return 0


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise KDForgeError(f"--input '{text}' must be CxHxW, e.g. 3x32x32")
    return parts  # type: ignore[return-value]


def cmd_profile(args: argparse.Namespace) -> int:
    from kdforge.models import create
    from kdforge.models.profile import profile_model

    channels, height, width = _parse_shape(args.input)
    model = create(args.model, num_classes=args.classes, in_channels=channels, input_size=(height, width))
    report = profile_model(model, (channels, height, width), batch_sizes=tuple(args.batch_sizes),
                           num_threads=args.threads)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.model}: {args.classes} classes, input {channels}x{height}x{width}, "
          f"{report['device']}, {report['threads']} threads")
    print(f"  parameters  {report['parameters']:,} ({report['parameters'] / 1e6:.2f}M)")
    print(f"  FLOPs       {report['flops']:,} per image ({report['macs'] / 1e6:.1f}M MACs)")
    for row in report["latency"]:
        print(f"  latency     batch {row['batch_size']:>4}: {row['seconds'] * 1000:8.2f} ms "
              f"({row['samples_per_second']:,.0f} images/s)")
    return 0


# ----------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from kdforge.config import read_yaml
    from kdforge.engine.pipeline import run_pipeline

    recipe_path = Path(__file__).parent / "recipes" / "demo.yaml"
    out = Path(args.out)
    started = time.perf_counter()
    print("kdforge demo: bundled 8x8 digits; a CNN teacher, then an MLP student alone and with KD")
    summaries = run_pipeline(read_yaml(recipe_path), recipe_path.parent, out, [], train_run)
    _print_table(summaries, out)
    print(f"finished in {time.perf_counter() - started:.0f} s")
    return 0


# ----------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from kdforge.suite import run_suite

    result = run_suite(args.suite, args.out, jobs=args.jobs)
    if not args.no_report:
        from kdforge.report import write_report

        if result["finished"]:
            written = write_report([result["out"]], result["out"])
            print(f"report: {written.get('markdown', result['out'])}")
    return 1 if result["failed"] else 0


def cmd_teacher_bank(args: argparse.Namespace) -> int:
    from kdforge.config import build_config, read_yaml
    from kdforge.engine.bank import TeacherBank
    from kdforge.engine.build import build_augmentation, build_data, build_distiller

    overrides = [item for group in args.set for item in group]
    config = build_config(read_yaml(args.config), overrides)
    data = build_data(config.data)
    distiller, _ = build_distiller(config, data.info, data.train)
    if not len(distiller.teachers):
        raise KDForgeError(f"recipe '{args.config}' has no teachers; a teacher bank stores teachers' outputs")
    bank = TeacherBank(
        args.directory or config.teacher_bank.directory,
        list(distiller.teachers),
        [t.checkpoint for t in config.teachers],
        data.train,
        data.info.name,
        build_augmentation(config.data, data.info),
        config.seed,
        top_k=config.teacher_bank.top_k,
    )
    epochs = args.epochs or config.train.epochs
    started = time.perf_counter()
    bank.precompute(epochs, progress=True)
    print(f"teacher bank {bank.key[:12]}: {epochs} epochs for {len(data.train)} images, "
          f"{bank.bytes_per_epoch() / 1e6:.1f} MB per stored epoch, in {bank.path} "
          f"({time.perf_counter() - started:.0f} s)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from kdforge.report import main as report_main

    return report_main(args.dirs, args.out)


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdforge", description="Knowledge distillation for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a recipe (or a pipeline of recipes)")
    train.add_argument("config", help="YAML recipe (see configs/)")
    train.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                       help="override recipe values, e.g. --set train.epochs=5 method.temperature=2")
    train.add_argument("--out", help="run directory (default runs/<name>)")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a model checkpoint")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--data", help="dataset name (default: the one the model was trained on)")
    evaluate.add_argument("--root", help="folder holding the dataset's files")
    evaluate.add_argument("--split", choices=["test", "train"], default="test")
    evaluate.add_argument("--batch-size", type=int, default=512)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_eval)

    listing = sub.add_parser("list", help="list registered models, methods or datasets")
    listing.add_argument("what", choices=["models", "methods", "datasets"])
    listing.set_defaults(func=cmd_list)

    profile = sub.add_parser("profile", help="parameters, FLOPs and CPU latency of a model")
    profile.add_argument("model")
    profile.add_argument("--input", default="3x32x32", help="CxHxW (default 3x32x32)")
    profile.add_argument("--classes", type=int, default=100)
    profile.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    profile.add_argument("--threads", type=int, help="torch threads for the latency measurement")
    profile.add_argument("--json", action="store_true")
    profile.set_defaults(func=cmd_profile)

    bench = sub.add_parser("bench", help="run a suite: methods x pairs x seeds, then a report")
    bench.add_argument("suite", help="suite YAML (see configs/suites/)")
    bench.add_argument("--out", help="suite folder (default runs/suites/<name>)")
    bench.add_argument("--jobs", type=int, default=1, help="runs at once, as separate processes")
    bench.add_argument("--no-report", action="store_true")
    bench.set_defaults(func=cmd_bench)

    bank = sub.add_parser("teacher-bank", help="store a recipe's teacher outputs for every epoch, once")
    bank.add_argument("config", help="a recipe with teachers (its seed and augmentation key the bank)")
    bank.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE")
    bank.add_argument("--epochs", type=int, help="epochs to store (default: the recipe's)")
    bank.add_argument("--directory", help="bank folder (default $KDFORGE_BANK or ~/.cache/kdforge/teacher-bank)")
    bank.set_defaults(func=cmd_teacher_bank)

    report = sub.add_parser("report", help="aggregate run directories into report.md, results.csv, report.html")
    report.add_argument("dirs", nargs="+", help="run directories or folders holding them")
    report.add_argument("--out", help="folder for the report files (default: the first DIR)")
    report.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo", help="teacher, student alone and KD student on the bundled digits (<3 min)")
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from kdforge.engine.trainer import RunInterrupted

    try:
        return args.func(args)
    except RunInterrupted as exc:
        print(f"kdforge: {exc}", file=sys.stderr)
        return 130
    except KDForgeError as exc:
        print(f"kdforge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

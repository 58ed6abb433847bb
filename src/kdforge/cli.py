"""The ``kdforge`` command. It only wires: parse arguments, call the library, print results."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from kdforge.core.errors import KDForgeError


def _quiet_libraries() -> None:
    """Lightning prints hints meant for GPU users; keep the terminal for our own messages."""
    import logging

    for name in ("lightning", "lightning.fabric", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", module="lightning_fabric")


# ----------------------------------------------------------------------------- train
def train_run(config, out_dir: Path, resume: bool = False) -> dict[str, Any]:
    from kdforge.engine.runs import run_any  # a training run, a GAN (kind: gan) or a generation step

    return run_any(config, out_dir, resume=resume)


def cmd_train(args: argparse.Namespace) -> int:
    from kdforge.config import read_yaml
    from kdforge.core.recipes import find_recipe
    from kdforge.engine.pipeline import is_pipeline, run_pipeline
    from kdforge.engine.runs import build_any_config

    args.config = find_recipe(args.config)  # a file, or a packaged recipe's name (kdforge list recipes)
    recipe = read_yaml(args.config)
    overrides = [item for group in args.set for item in group]
    if is_pipeline(recipe):
        out = Path(args.out or Path("runs") / Path(args.config).stem)
        summaries = run_pipeline(recipe, Path(args.config).parent, out, overrides, train_run)
        _print_table(summaries, out)
        return 0
    config = build_any_config(recipe, overrides)
    out = Path(args.out or Path("runs") / config.name)
    summary = train_run(config, out, resume=args.resume)
    _print_table({config.name: summary}, out)
    return 0


def _print_table(summaries: dict[str, dict[str, Any]], out: Path) -> None:
    from kdforge.data.tasks import TASKS

    rows = []
    for name, s in summaries.items():
        test = (s.get("final") or {}).get("test") or {}
        task = s.get("task") or "classification"
        if task == "regression":
            shown = f"{test.get('mae', float('nan')):.3f}"
        elif task == "classification" or task not in TASKS or not test:
            shown = f"{test.get('top1', float('nan')):.2f}"
        else:  # e.g. "rank-1 92.00% mAP 65.81%"
            shown = TASKS.get(task)().describe(test)
        rows.append(
            (
                name,
                s.get("method", ""),
                s.get("student", ""),
                shown,
                f"{s.get('student_parameters', 0):,}",
                f"{s.get('train_seconds', 0):.1f}",
            )
        )
    tasks = {s.get("task") or "classification" for s in summaries.values()}
    names = {"classification": "top-1 (%)", "regression": "MAE"}
    scored = " / ".join(names[t] for t in sorted(tasks)) if tasks <= set(names) else "test"
    header = ("run", "method", "network", scored, "parameters", "train s")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    print(line(header))
    for row in rows:
        print(line(row))
    print(f"run directories: {out}")


# ----------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from kdforge.core.checkpoint import read_model_file
    from kdforge.core.errors import CheckpointError, ConfigError
    from kdforge.engine.build import build_command_data, recorded_augmentation, recorded_data_config
    from kdforge.engine.trainer import evaluate_model

    record = read_model_file(args.checkpoint)
    spec = record.get("model") or {}
    if not spec.get("name"):
        raise CheckpointError(f"'{args.checkpoint}' is a plain state dict; evaluate a kdforge model file")
    data_cfg = recorded_data_config(record, args.checkpoint, args.data, args.root)  # the run's root and options
    dataset = data_cfg.name
    data = build_command_data(data_cfg, record)
    from kdforge.data.tasks import task_for

    task = task_for(data.info)
    if data.info.num_classes != spec["num_classes"]:
        what = "classes" if task.name == "classification" else "values"
        raise CheckpointError(
            f"'{args.checkpoint}' predicts {spec['num_classes']} {what}; dataset '{dataset}' has {data.info.num_classes}"  # noqa: E501
        )
    if args.attack and task.name != "classification":
        raise ConfigError(f"--attack measures robust top-1 of a classifier; '{dataset}' is a {task.name} task")
    from kdforge.compress.arch import load_model_file  # zoo, LMA, pruned and QAT networks

    model, _ = load_model_file(args.checkpoint)
    split = data.test if args.split == "test" else data.train
    if args.limit is not None:
        from kdforge.data.splits import evaluation_subset

        split = split.select(evaluation_subset(split.labels, args.limit))
    augmentation = recorded_augmentation(record, data_cfg, data.info)  # the run's standardisation
    metrics = evaluate_model(model, split, augmentation, args.batch_size, num_workers=data_cfg.num_workers, task=task)
    result: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "model": spec["name"],
        "dataset": dataset,
        "split": args.split,
        "images": len(split),
        **metrics,
    }
    if args.attack:
        from kdforge.robust import robust_evaluate

        result["robust"] = robust_evaluate(
            model,
            split,
            data.info.mean,
            data.info.std,
            attack=args.attack,
            eps=args.eps,
            steps=args.steps,
            step_size=args.step_size,
            norm=args.norm,
            restarts=args.restarts,
            batch_size=args.batch_size,
        )
    if args.json:
        print(json.dumps(result))
    elif task.name not in ("classification", "regression"):
        print(f"{spec['name']} on {dataset} {args.split} ({len(split)} images): {task.describe(metrics)}")
    else:
        if task.name == "classification":
            scores = f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}"
        else:  # regression: errors in the target's units, the loss (MSE) in training units
            unit = data.info.target_unit
            scores = f"MAE {result['mae']:.4g}{unit}  RMSE {result['rmse']:.4g}{unit}  loss {result['loss']:.4g}"
        print(f"{spec['name']} on {dataset} {args.split} ({len(split)} images): {scores}")
        if args.attack:
            robust, attack = result["robust"], result["robust"]["attack"]
            label = f"PGD-{args.steps}" if args.attack == "pgd" else "FGSM"
            extra = f", step {attack['step_size']:.4g}, restarts {args.restarts}" if args.attack == "pgd" else ""
            print(
                f"{label} ({args.norm}, eps {args.eps:.4g}{extra}): clean top-1 {robust['clean_top1']:.2f}%  "
                f"robust top-1 {robust['robust_top1']:.2f}%"
            )
    return 0


def _fraction(text: str) -> float:
    """A number or a fraction such as 8/255 (for --eps and --step-size)."""
    from fractions import Fraction

    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 8/255, got {text!r}") from None


# ----------------------------------------------------------------------------- list / profile
def cmd_list(args: argparse.Namespace) -> int:
    if args.what in ("recipes", "suites"):  # the packaged YAML files, by the names train and bench take
        from kdforge.core.recipes import packaged

        listing = packaged(args.what)
        width = max((len(n) for n in listing), default=0)
        for name, about in listing.items():
            print(f"{name.ljust(width)}  {about}")
        return 0
    if args.what == "models":
        from kdforge.models import MODELS as registry
    elif args.what == "methods":
        from kdforge.methods import METHODS as registry
    else:
        from kdforge.data import DATASETS as registry
    width = max(len(n) for n in registry.names())
    for name in registry.names():
        print(f"{name.ljust(width)}  {registry.describe(name)}")
    if args.what == "datasets":  # besides the names: any Dataset the user builds (docs/data.md)
        print("or data.name: 'module:function' / 'file.py:function' returning a torch Dataset (docs/data.md)")
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
    """Parameters, FLOPs, size on disk, CPU latency; rates against --teacher (kdforge.commands.profile)."""
    from kdforge.commands.profile import format_report, profile_networks

    shape = _parse_shape(args.input) if args.input else None
    report, names = profile_networks(
        args.model, args.teacher, shape, args.classes, tuple(args.batch_sizes), args.threads
    )
    if args.json:
        print(json.dumps(report))
        return 0
    channels, height, width = report["input_shape"]
    print(
        f"{names[0]}: {report['classes']} classes, input {channels}x{height}x{width}, cpu, "
        f"{report['student']['threads']} threads"
    )
    print(format_report(report, *names))
    return 0


# ----------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    """Write a model file's network as ONNX (optionally int8) or TorchScript (kdforge.commands.export)."""
    from kdforge.commands.export import export_checkpoint

    result = export_checkpoint(
        args.checkpoint,
        args.format,
        args.out,
        int8=args.int8,
        data=args.data,
        root=args.root,
        batches=args.calibration_batches,
        check=not args.no_check,
    )
    if args.json:
        print(json.dumps(result))
        return 0
    check = f" (max |difference| vs PyTorch {result['max_abs_diff']:.2e})" if "max_abs_diff" in result else ""
    print(f"{args.format}: {result['path']}{check}")
    if args.int8:
        agree = (
            f", top-1 agreement with float {100 * result['int8_agreement']:.1f}%" if "int8_agreement" in result else ""
        )
        if "int8_mae_vs_float" in result:  # a regression network: the drift of its outputs
            agree = f", mean |int8 - float| {result['int8_mae_vs_float']:.4g}{result.get('target_unit', '')}"
        print(f"int8 (ONNX Runtime static, per-channel): {result['int8_path']}{agree}")
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
    from kdforge.core.recipes import find_recipe
    from kdforge.suite import run_suite

    result = run_suite(
        find_recipe(args.suite, "suites"),
        args.out,
        jobs=args.jobs,
        threads=args.threads,
        methods=args.methods,
        seeds=args.seeds,
    )
    if not args.no_report:
        from kdforge.report import write_report

        if result["finished"]:
            written = write_report([result["out"]], result["out"])
            print(f"report: {written.get('markdown', result['out'])}")
    return 1 if result["failed"] else 0


def cmd_teacher_bank(args: argparse.Namespace) -> int:
    from kdforge.config import build_config, read_yaml
    from kdforge.core.recipes import find_recipe
    from kdforge.engine.bank import TeacherBank
    from kdforge.engine.build import build_augmentation, build_data, build_distiller

    overrides = [item for group in args.set for item in group]
    config = build_config(read_yaml(find_recipe(args.config)), overrides)
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
    print(
        f"teacher bank {bank.key[:12]}: {epochs} epochs for {len(data.train)} images, "
        f"{bank.bytes_per_epoch() / 1e6:.1f} MB per stored epoch, in {bank.path} "
        f"({time.perf_counter() - started:.0f} s)"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from kdforge.report import main as report_main

    return report_main(args.dirs, args.out)


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from kdforge import __version__

    parser = argparse.ArgumentParser(prog="kdforge", description="Knowledge distillation for PyTorch")
    parser.add_argument("--version", action="version", version=f"kdforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a recipe (or a pipeline of recipes)")
    train.add_argument("config", help="YAML recipe, or a packaged recipe's name (kdforge list recipes)")
    train.add_argument(
        "--set",
        nargs="+",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override recipe values, e.g. --set train.epochs=5 method.temperature=2",
    )
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
    evaluate.add_argument(
        "--limit",
        type=int,
        help="evaluate N images of the split only: a seeded class-balanced subset, the same every time",
    )
    evaluate.add_argument("--attack", choices=["fgsm", "pgd"], help="also report robust top-1 under this attack")
    evaluate.add_argument("--eps", type=_fraction, default=8 / 255, help="attack radius in [0, 1] pixel units (8/255)")
    evaluate.add_argument("--steps", type=int, default=20, help="PGD steps (default 20)")
    evaluate.add_argument("--step-size", type=_fraction, help="PGD step (default 2.5 * eps / steps)")
    evaluate.add_argument("--norm", choices=["linf", "l2"], default="linf")
    evaluate.add_argument("--restarts", type=int, default=1, help="PGD random restarts (per-sample worst kept)")
    evaluate.set_defaults(func=cmd_eval)

    listing = sub.add_parser("list", help="list registered models, methods, datasets; packaged recipes, suites")
    listing.add_argument("what", choices=["models", "methods", "datasets", "recipes", "suites"])
    listing.set_defaults(func=cmd_list)

    profile = sub.add_parser("profile", help="parameters, FLOPs, size, CPU latency; rates against a teacher")
    profile.add_argument("model", help="zoo name, model spec or model file (e.g. checkpoints/model_last.pt)")
    profile.add_argument("--teacher", help="zoo name, model spec or model file: adds compression and computation rates")
    profile.add_argument("--input", help="CxHxW (default: the model file's, else 3x32x32)")
    profile.add_argument(
        "--classes", type=int, help="classes of zoo-name models (default: the teacher file's, else 100)"
    )
    profile.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    profile.add_argument("--threads", type=int, help="torch threads for the latency measurement")
    profile.add_argument("--json", action="store_true")
    profile.set_defaults(func=cmd_profile)

    bench = sub.add_parser("bench", help="run a suite: methods x pairs x seeds, then a report")
    bench.add_argument("suite", help="suite YAML, or a packaged suite's name (kdforge list suites)")
    bench.add_argument("--out", help="suite folder (default runs/suites/<name>)")
    bench.add_argument("--jobs", type=int, default=1, help="runs at once, as separate processes")
    bench.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    bench.add_argument("--no-report", action="store_true")
    bench.add_argument(
        "--methods",
        nargs="+",
        metavar="LABEL",
        help="run only these method labels of the suite (and the teachers they need)",
    )
    bench.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="run only these seeds of the suite")
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

    exporter = sub.add_parser("export", help="write a model file's network as ONNX (optionally int8) or TorchScript")
    exporter.add_argument("checkpoint", help="a kdforge model file (checkpoints/model_last.pt)")
    exporter.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    exporter.add_argument("--out", help="output file (default: beside the checkpoint)")
    exporter.add_argument("--int8", action="store_true", help="also quantize: ONNX Runtime static int8, per-channel")
    exporter.add_argument("--data", help="calibration dataset (default: the model file's)")
    exporter.add_argument("--root", help="folder holding the dataset's files")
    exporter.add_argument("--calibration-batches", type=int, default=8, help="training batches of 64 (default 8)")
    exporter.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime comparison")
    exporter.add_argument("--json", action="store_true")
    exporter.set_defaults(func=cmd_export)

    demo = sub.add_parser("demo", help="teacher, student alone and KD student on the bundled digits (<3 min)")
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=cmd_demo)

    from kdforge.commands.nonn import add_commands as add_nonn_commands  # nonn-partition, serve-nonn

    add_nonn_commands(sub)
    from kdforge.commands.search import add_commands as add_search_commands  # search (KD-guided DARTS)

    add_search_commands(sub)
    for command in sub.choices.values():  # every command can load the user's own code
        command.add_argument(
            "--import",
            dest="imports",
            action="append",
            default=[],
            metavar="MODULE",
            help="import a module or .py file first (the user's models, methods, datasets); repeatable",
        )
        command.add_argument(
            "--allow-model-code",
            action="store_true",
            help="let model files import the module or .py file that built their network (recorded in the file)",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from kdforge.core.plugins import allow_model_code, import_all
    from kdforge.engine.trainer import RunInterrupted

    previous = _stop_on_sigterm()
    from kdforge.core.signals import die_with_parent

    die_with_parent()  # a suite's run or a NoNN device started with KDFORGE_PARENT_PID stops with its parent
    try:
        import_all(args.imports)  # the user's models, methods and datasets (kdforge.core.plugins)
        allow_model_code(args.allow_model_code)
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
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _stop_on_sigterm() -> Any:
    """Treat SIGTERM (``kill``, a scheduler's preemption) like Ctrl-C: a run saves its state as
    'interrupted' and resumes with ``--resume``; a suite stops its runs the same way. Returns the
    handler it replaced (None when not on the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


if __name__ == "__main__":
    sys.exit(main())

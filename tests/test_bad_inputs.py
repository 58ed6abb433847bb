"""The bad-input corpus: every case is answered by one clear line or a correct refusal.

Generated programmatically where the space is regular (every numeric key of a recipe x
{negative, nan, inf, boolean, string, fraction}; every registered method's hyperparameters x
{nan, inf, negative temperature/weight, huge temperature, boolean/number mix-ups}), written out
where it is not (recipe files, ``base:`` cycles, pipelines, ``--out`` folders, checkpoints, run
names, divergence, signals, NoNN frames). Nothing here is accepted silently: a case passes only
when kdforge refuses it with one line (no traceback) or refuses it correctly in kind (an error
frame, a closed connection, a run marked failed).

In-process (``build_config`` or ``kdforge.cli.main`` with capsys) wherever possible; subprocesses
only for signals and parent death.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path

import pytest
import torch
import yaml

from kdforge.cli import main
from kdforge.config import RunConfig, build_config
from kdforge.core.errors import ConfigError, StorageError
from kdforge.core.schedules import Schedule
from kdforge.core.validation import _model_in, _scalar_kinds
from kdforge.methods import METHODS
from kdforge.methods.base import is_temperature_field, is_weight_field

ROOT = Path(__file__).resolve().parents[1]
BASE: dict[str, typing.Any] = {"name": "bad", "data": {"name": "digits"}, "student": {"name": "mlp"}}


def assert_one_line(message: str) -> None:
    assert message.strip(), "empty message"
    assert "\n" not in message.strip(), f"more than one line: {message!r}"
    assert "Traceback" not in message


def refused(recipe: dict, overrides: list[str] = ()) -> str:  # type: ignore[assignment]
    with pytest.raises(ConfigError) as info:
        build_config(recipe, list(overrides))
    message = str(info.value)
    assert_one_line(message)
    return message


def cli_error(argv: list[str], capsys, code: int = 2) -> str:
    """Run the CLI in-process; it must exit with ``code`` and print exactly one error line."""
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == code, (rc, captured.err[-2000:])
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    return lines[0]


# --------------------------------------------------------------------------- recipe keys
def _recipe_fields(model=RunConfig, prefix: str = ""):
    """(dotted path, scalar kinds) of every scalar field of the recipe models."""
    for name, field in model.model_fields.items():
        kinds = _scalar_kinds(field.annotation)
        sub = _model_in(field.annotation)
        if sub is not None and "model" in kinds and not kinds & {int, float}:
            yield from _recipe_fields(sub, f"{prefix}{name}.")
        if kinds and not kinds & {"other", "model", "container"}:
            yield prefix + name, kinds


NUMERIC_KEYS = [path for path, kinds in _recipe_fields() if kinds & {int, float} and bool not in kinds]
INT_KEYS = [path for path, kinds in _recipe_fields() if int in kinds and float not in kinds and bool not in kinds]
BOOL_KEYS = [path for path, kinds in _recipe_fields() if kinds == {bool}]
NUMERIC_BAD = {"negative": "-1", "nan": ".nan", "inf": ".inf", "boolean": "true", "string": "many"}


def _prepared(path: str) -> dict:
    """BASE plus whatever a key needs around it (prune needs its amount)."""
    recipe = json.loads(json.dumps(BASE))
    if path.startswith("student.prune.") and path != "student.prune.amount":
        recipe["student"]["prune"] = {"amount": 0.5}
    return recipe


def test_the_corpus_covers_every_numeric_and_boolean_recipe_key():
    assert {"seed", "train.epochs", "train.optimizer.lr", "data.augment.crop_padding"} <= set(NUMERIC_KEYS)
    assert {"train.drop_last", "data.augment.horizontal_flip", "data.download"} <= set(BOOL_KEYS)


@pytest.mark.parametrize("kind", list(NUMERIC_BAD))
@pytest.mark.parametrize("path", NUMERIC_KEYS)
def test_numeric_recipe_key_refuses(path, kind):
    if kind == "negative" and path == "student.prune.norm":
        pytest.skip("a Literal[1, 2]: -1 is covered by the literal check")
    message = refused(_prepared(path), [f"{path}={NUMERIC_BAD[kind]}"])
    assert path in message


@pytest.mark.parametrize("path", INT_KEYS)
def test_integer_recipe_key_refuses_a_fraction(path):
    assert path in refused(_prepared(path), [f"{path}=2.5"])


@pytest.mark.parametrize("value", ["'yes'", "1", "0", "0.5", "'true'"])
@pytest.mark.parametrize("path", BOOL_KEYS)
def test_boolean_recipe_key_refuses_a_non_boolean(path, value):
    assert path in refused(_prepared(path), [f"{path}={value}"])


@pytest.mark.parametrize(
    "override",
    [
        "train.optimizer.betas=[-0.1, 0.9]",
        "train.optimizer.betas=[.nan, 0.9]",
        "train.optimizer.betas=[0.9, true]",
        "train.optimizer.betas=[1.5, 0.9]",
        "train.scheduler.milestones=[-1]",
        "train.scheduler.milestones=[.inf]",
        "train.scheduler.milestones=[true]",
        "data.augment=3",
        "data.augment='yes'",
        "train.optimizer.name=lbfgs",
        "train.accelerator=tpu",
        "train.precision=8-bit",
        "train.epochs=0",
        "train.batch_size=0",
        "seed=4294967296",
        "data.val_fraction=1.0",
        "student.prune.amount=1.0",
        "student.qat.weight_bits=16",
        "student.lma.k=1",
        "method.name=kdd",
        "method.temperatur=4",
        "train.epoch=10",
        "dat.name=digits",
        "student.name=null",
        "train.optimizer.lr=0",
        "imports=5",
        "noequals",
        "=5",
        "teachers.3.name=mlp",
        "train.epochs.x=1",
    ],
)
def test_misc_recipe_override_refused(override):
    refused(BASE, [override])


# --------------------------------------------------------------------------- method hyperparameters
def _method_cases():
    """(method, field, value, why) for every registered method's Params."""
    cases = []
    for method in METHODS.names():
        params = METHODS.get(method).Params
        for name, field in params.model_fields.items():
            kinds = _scalar_kinds(field.annotation)
            schedule = _model_in(field.annotation) is Schedule
            numeric = bool(kinds & {float}) or schedule
            if numeric:
                cases += [(method, name, float("nan"), "nan"), (method, name, float("inf"), "inf")]
            if numeric and (is_temperature_field(name) or is_weight_field(name)):
                cases.append((method, name, -1.0, "negative"))
            if numeric and is_temperature_field(name):
                cases.append((method, name, 1e6, "huge temperature"))
            if numeric or (int in kinds and bool not in kinds):
                cases.append((method, name, True, "boolean for a number"))
            if bool in kinds and not kinds & {int, float, str}:
                cases += [(method, name, "yes", "string for a boolean"), (method, name, 1, "number for a boolean")]
            if int in kinds and not kinds & {float, bool}:
                cases.append((method, name, 2.5, "fraction for an integer"))
    return cases


METHOD_CASES = _method_cases()


def test_every_method_has_float_and_temperature_or_weight_cases():
    covered = {m for m, _, _, why in METHOD_CASES if why == "nan"}
    assert covered == set(METHODS.names())
    assert {m for m, _, _, why in METHOD_CASES if why == "negative"} >= {"kd", "dkd", "crd", "fitnet", "at", "dml"}


@pytest.mark.parametrize(
    ("method", "name", "value", "why"), METHOD_CASES, ids=[f"{m}.{n}-{w}" for m, n, _, w in METHOD_CASES]
)
def test_method_hyperparameter_refuses(method, name, value, why):
    message = refused({**BASE, "method": {"name": method, name: value}})
    assert f"method.{name}" in message


@pytest.mark.parametrize(
    "method",
    [
        {"name": "kd", "temperature": -4},
        {"name": "kd", "kd_weight": -1},
        {"name": "kd", "temperature": 1e6},
        {"name": "kd", "temperature": "1e6"},
        {"name": "kd", "temperature": {"kind": "linear", "start": 4, "end": -1}},
        {"name": "kd", "kd_weight": {"kind": "cosine", "start": 0.9, "end": -0.1}},
        {"name": "kd", "temperature": {"kind": "linear", "start": True, "end": 1}},
        {"name": "kd", "temperature": "hot"},
        {"name": "kd", "temperature": [4]},
        {"name": "kd", "ce_weight": "half"},
        {"name": "ensemble_kd", "teacher_weights": [0.5, -0.5]},
        {"name": "ensemble_kd", "teacher_weights": [0.5, float("nan")]},
        {"name": "nonexistent"},
        {"name": "kd", "temprature": 4},
    ],
)
def test_named_method_nonsense_refused(method):
    refused({**BASE, "method": method})


def test_sensible_method_values_still_accepted():
    for method in (
        {"name": "kd", "temperature": 4, "kd_weight": 0.9, "ce_weight": 0.1},
        {"name": "kd", "temperature": {"kind": "exponential", "start": 10, "end": 1}, "ce_weight": "complement"},
        {"name": "ard", "temperature": 30},
        {"name": "pkt", "weight": 30000},
    ):
        assert build_config({**BASE, "method": method}).method.name == method["name"]


# --------------------------------------------------------------------------- run names
@pytest.mark.parametrize(
    "name", ["../escape", "a/b", "a\\b", ".", "..", "", " ", "tab\there", "nl\nx", "x" * 121, "\x00"]
)
def test_bad_run_name_refused(name):
    assert "name" in refused({**BASE, "name": name})


# --------------------------------------------------------------------------- recipe files
def _write(folder: Path, name: str, content) -> Path:
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


RECIPE_FILES = {
    "base-self": {"r.yaml": "base: r.yaml\nstudent: {name: mlp}\n"},
    "base-cycle-2": {"r.yaml": "base: a.yaml\n", "a.yaml": "base: r.yaml\nstudent: {name: mlp}\n"},
    "base-cycle-3": {"r.yaml": "base: a.yaml\n", "a.yaml": "base: b.yaml\n", "b.yaml": "base: r.yaml\n"},
    "base-missing": {"r.yaml": "base: nowhere.yaml\n"},
    "base-number": {"r.yaml": "base: 5\nstudent: {name: mlp}\n"},
    "base-list": {"r.yaml": "base: [a.yaml]\nstudent: {name: mlp}\n"},
    "binary": {"r.yaml": bytes(range(128, 256)) * 4},
    "png": {"r.yaml": b"\x89PNG\r\n\x1a\n" + bytes(200)},
    "nul-bytes": {"r.yaml": "student: {name: mlp}\n\x00\x00\n"},
    "empty": {"r.yaml": ""},
    "list": {"r.yaml": "- student\n- mlp\n"},
    "scalar": {"r.yaml": "42\n"},
    "bad-yaml": {"r.yaml": "student: {name: mlp\n"},
    "tabs": {"r.yaml": "student:\n\tname: mlp\n"},
    "epochs-true": {"r.yaml": "student: {name: mlp}\ntrain: {epochs: true}\n"},
    "epochs-fraction": {"r.yaml": "student: {name: mlp}\ntrain: {epochs: 2.5}\n"},
    "flip-yes": {"r.yaml": 'student: {name: mlp}\ndata: {augment: {horizontal_flip: "yes"}}\n'},
    "temperature-negative": {"r.yaml": "student: {name: mlp}\nmethod: {name: kd, temperature: -4}\n"},
    "kd-weight-negative": {"r.yaml": "student: {name: mlp}\nmethod: {name: kd, kd_weight: -1}\n"},
    "temperature-huge": {"r.yaml": "student: {name: mlp}\nmethod: {name: kd, temperature: 1e6}\n"},
    "unknown-key": {"r.yaml": "student: {name: mlp}\ntrian: {epochs: 1}\n"},
    "pipeline-not-mapping": {"r.yaml": "pipeline: [a, b]\n"},
    "pipeline-empty": {"r.yaml": "pipeline: {}\n"},
    "pipeline-stage-scalar": {"r.yaml": "pipeline: {a: 5}\n"},
    "pipeline-extra-key": {"r.yaml": "pipeline: {a: {student: {name: mlp}}}\nseed: 3\n"},
    "pipeline-stage-base-number": {"r.yaml": "pipeline: {a: {base: 7}}\n"},
    "pipeline-imports-number": {"r.yaml": "imports: 5\npipeline: {a: {student: {name: mlp}}}\n"},
    "pipeline-unknown-ref": {
        "r.yaml": "pipeline:\n  a: {student: {name: mlp}, train: {epochs: 1}}\n"
        "  b: {student: {name: mlp}, teachers: [{checkpoint: '{nope}/checkpoints/model_last.pt'}]}\n"
    },
    "pipeline-forward-ref": {
        "r.yaml": "pipeline:\n  a: {student: {name: mlp}, teachers: [{checkpoint: '{b}/checkpoints/model_last.pt'}]}\n"
        "  b: {student: {name: mlp}}\n"
    },
}


@pytest.mark.parametrize("case", list(RECIPE_FILES))
def test_bad_recipe_file_is_one_line(case, tmp_path, capsys):
    for name, content in RECIPE_FILES[case].items():
        _write(tmp_path, name, content)
    cli_error(["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_directory_or_a_missing_file_as_recipe(tmp_path, capsys):
    cli_error(["train", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    cli_error(["train", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")], capsys)


@pytest.mark.parametrize(
    "last_stage",
    [
        {"student": {"name": "mlp"}, "train": {"epocs": 1}},
        {"student": {"name": "mlp"}, "method": {"name": "kd", "temperature": -4}},
        {"student": {"name": "mlp"}, "train": {"epochs": True}},
        {"student": {"name": "mlp"}, "teachers": [{"checkpoint": "{later}/checkpoints/model_last.pt"}]},
        {"base": "missing.yaml"},
    ],
)
def test_a_bad_last_stage_fails_before_the_first_stage_trains(last_stage, tmp_path, capsys):
    """A pipeline validates every stage first: the first stage never starts (no run folder)."""
    first = {"data": {"name": "digits", "train_subset": 100}, "student": {"name": "mlp"}, "train": {"epochs": 1}}
    _write(tmp_path, "p.yaml", {"pipeline": {"first": first, "last": last_stage}})
    line = cli_error(["train", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "out")], capsys)
    assert "stage 'last'" in line
    assert not (tmp_path / "out" / "first").exists()


def test_an_override_naming_no_stage_fails_before_training(tmp_path, capsys):
    _write(tmp_path, "p.yaml", {"pipeline": {"a": {"student": {"name": "mlp"}}}})
    line = cli_error(
        ["train", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "o"), "--set", "b:train.epochs=1"], capsys
    )
    assert "stage 'b'" in line and not (tmp_path / "o" / "a").exists()


# --------------------------------------------------------------------------- data files
def _data_case(folder: Path, case: str) -> dict:
    """The ``data:`` section of a recipe for one bad data case (files made in ``folder``)."""
    junk = folder / "junk"
    junk.mkdir(exist_ok=True)
    idx = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if case == "unknown-name":
        return {"name": "imagenett"}
    if case in ("mnist-missing", "cifar10-missing", "cifar100-missing", "fashion_mnist-missing"):
        return {"name": case.split("-")[0], "root": str(folder / "nowhere")}
    if case == "mnist-random-bytes":
        for name in idx:
            (junk / name).write_bytes(os.urandom(1000))
        return {"name": "mnist", "root": str(junk)}
    if case == "mnist-truncated":
        for name in idx:  # right magic number and counts, the pixels missing
            ndim = 3 if "images" in name else 1
            dims = [60000, 28, 28][:ndim] if "train" in name else [10000, 28, 28][:ndim]
            (junk / name).write_bytes(struct.pack(">HBB", 0, 0x08, ndim) + struct.pack(f">{ndim}I", *dims) + bytes(10))
        return {"name": "mnist", "root": str(junk)}
    if case == "cifar10-random-bytes":
        batches = junk / "cifar-10-batches-py"
        batches.mkdir(exist_ok=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
            (batches / name).write_bytes(os.urandom(500))
        return {"name": "cifar10", "root": str(junk)}
    if case == "npz-missing":
        return {"name": "npz", "options": {"path": str(folder / "none.npz")}}
    if case == "npz-garbage":
        (junk / "x.npz").write_bytes(os.urandom(300))
        return {"name": "npz", "options": {"path": str(junk / "x.npz")}}
    if case == "imagefolder-empty":
        (junk / "empty").mkdir(exist_ok=True)
        return {"name": "imagefolder", "root": str(junk / "empty")}
    if case == "unknown-option":
        return {"name": "digits", "options": {"colour": True}}
    raise AssertionError(case)


DATA_CASES = [
    "unknown-name",
    "mnist-missing",
    "cifar10-missing",
    "cifar100-missing",
    "fashion_mnist-missing",
    "mnist-random-bytes",
    "mnist-truncated",
    "cifar10-random-bytes",
    "npz-missing",
    "npz-garbage",
    "imagefolder-empty",
    "unknown-option",
]


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_is_one_line(case, tmp_path, capsys):
    recipe = _write(tmp_path, "r.yaml", {"data": _data_case(tmp_path, case), "student": {"name": "mlp"}})
    cli_error(["train", str(recipe), "--out", str(tmp_path / "out")], capsys)


# --------------------------------------------------------------------------- output folders
def _slow_data_recipe(folder: Path) -> Path:
    """A recipe whose data loading would fail (missing files): an --out error must come first."""
    return _write(
        folder, "r.yaml", {"data": {"name": "mnist", "root": str(folder / "no-data")}, "student": {"name": "mlp"}}
    )


def test_out_is_an_existing_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    line = cli_error(["train", str(_slow_data_recipe(tmp_path)), "--out", str(tmp_path / "file")], capsys)
    assert "is an existing file" in line and (tmp_path / "file").read_text() == "x"


def test_out_below_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    line = cli_error(["train", str(_slow_data_recipe(tmp_path)), "--out", str(tmp_path / "file" / "run")], capsys)
    assert "not a folder" in line


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a read-only /sys (Linux)")
def test_out_in_an_unwritable_place(tmp_path, capsys):
    line = cli_error(["train", str(_slow_data_recipe(tmp_path)), "--out", "/sys/kdforge-test-run"], capsys)
    assert "/sys/kdforge-test-run" in line and "data" not in line.split(":")[-1]


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root ignores permissions")
def test_out_in_a_read_only_folder(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = cli_error(["train", str(_slow_data_recipe(tmp_path)), "--out", str(locked / "run")], capsys)
        assert "permission denied" in line
    finally:
        locked.chmod(0o700)


def test_bench_out_is_an_existing_file(tmp_path, capsys):
    suite = _write(
        tmp_path,
        "s.yaml",
        {
            "name": "s",
            "base": {"data": {"name": "digits"}, "student": {"name": "mlp"}},
            "pairs": [{"student": {"name": "mlp"}}],
            "methods": {"ce": {}},
        },
    )
    (tmp_path / "file").write_text("x")
    assert "existing file" in cli_error(["bench", str(suite), "--out", str(tmp_path / "file")], capsys)


@pytest.mark.parametrize("writer", ["atomic_save", "atomic_write_text"])
def test_a_full_disk_at_save_time_is_one_line_and_keeps_the_old_file(writer, tmp_path, monkeypatch):
    from kdforge.core import checkpoint

    target = tmp_path / "file"
    target.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    with pytest.raises(StorageError) as info:
        getattr(checkpoint, writer)({"a": torch.ones(2)} if writer == "atomic_save" else "new", target)
    assert_one_line(str(info.value))
    assert "no space left" in str(info.value)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["file"]


# --------------------------------------------------------------------------- checkpoints
class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _checkpoint_cases(folder: Path) -> dict[str, Path]:
    from kdforge.core.checkpoint import STATE_FORMAT, model_record
    from kdforge.models import create

    model = create("mlp", num_classes=10, in_channels=1, input_size=(8, 8))
    record = model_record(model, name="mlp", kwargs={}, num_classes=10, in_channels=1, input_size=(8, 8))
    good = folder / "good.pt"
    torch.save(record, good)
    cases = {}

    def save(name, obj):
        cases[name] = folder / f"{name}.pt"
        torch.save(obj, cases[name])

    with open(folder / "unsafe.pt", "wb") as handle:
        pickle.dump({"x": _Payload()}, handle)
    cases["unsafe"] = folder / "unsafe.pt"
    cases["garbage"] = _write(folder, "garbage.pt", os.urandom(512))
    cases["truncated"] = _write(folder, "truncated.pt", good.read_bytes()[:300])
    cases["empty"] = _write(folder, "empty.pt", b"")
    cases["text"] = _write(folder, "text.pt", "student: {name: mlp}\n")
    cases["missing"] = folder / "missing.pt"
    cases["directory"] = folder
    save("state", {"format": STATE_FORMAT, "distiller": {}})
    save("list", [torch.ones(2)])
    save("mixed", {"a": torch.ones(2), "b": "text"})
    for bad in ("nan", "inf"):
        broken = json.loads(json.dumps({k: v for k, v in record.items() if k != "state_dict"}))
        state = {k: v.clone() for k, v in record["state_dict"].items()}
        first = next(k for k, v in state.items() if v.is_floating_point())
        state[first].view(-1)[0] = float(bad)
        save(f"weights-{bad}", {**broken, "state_dict": state})
    save("plain-state-dict", dict(model.state_dict()))  # refused by eval: no model spec
    return cases


CHECKPOINT_CASES = [
    "unsafe",
    "garbage",
    "truncated",
    "empty",
    "text",
    "missing",
    "directory",
    "state",
    "list",
    "mixed",
    "weights-nan",
    "weights-inf",
    "plain-state-dict",
]


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_bad_checkpoint_for_eval_is_one_line(case, tmp_path, capsys):
    cases = _checkpoint_cases(tmp_path)
    line = cli_error(["eval", str(cases[case])], capsys)
    if case == "unsafe":
        assert "refuses to unpickle" in line
    if case.startswith("weights-"):
        assert "non-finite" in line


@pytest.mark.parametrize("case", ["unsafe", "garbage", "weights-nan", "state"])
def test_bad_teacher_checkpoint_in_a_recipe_is_one_line(case, tmp_path, capsys):
    cases = _checkpoint_cases(tmp_path)
    recipe = _write(
        tmp_path,
        "r.yaml",
        {
            "data": {"name": "digits", "train_subset": 100},
            "student": {"name": "mlp"},
            "teachers": [{"checkpoint": str(cases[case])}],
            "method": {"name": "kd"},
            "train": {"epochs": 1, "progress": "none"},
        },
    )
    cli_error(["train", str(recipe), "--out", str(tmp_path / "out")], capsys)


# --------------------------------------------------------------------------- divergence
def _digits_recipe(folder: Path, **train) -> dict:
    return {
        "name": "diverge",
        "data": {"name": "digits", "augment": False, "train_subset": 200},
        "student": {"name": "mlp", "kwargs": {"hidden": [32]}},
        "method": {"name": "ce"},
        "train": {"epochs": 3, "batch_size": 32, "progress": "none", "scheduler": {"name": "constant"}, **train},
    }


def _teacher_file(folder: Path, scale: float = 1.0) -> Path:
    from kdforge.core.checkpoint import atomic_save, model_record
    from kdforge.models import create

    torch.manual_seed(0)
    model = create("mlp", num_classes=10, in_channels=1, input_size=(8, 8), hidden=[32])
    with torch.no_grad():
        for weight in [p for p in model.parameters() if p.ndim == 2]:
            weight.mul_(scale)
    record = model_record(model, name="mlp", kwargs={"hidden": [32]}, num_classes=10, in_channels=1, input_size=(8, 8))
    path = folder / f"teacher-{scale:g}.pt"
    atomic_save(record, path)
    return path


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _assert_failed_run(out: Path, line: str, culprit: str) -> None:
    from kdforge.core.checkpoint import read_model_file

    summary = _summary(out)
    assert summary["status"] == "failed" and culprit in summary["error"] and culprit in line
    last = out / "checkpoints" / "model_last.pt"
    if last.exists():
        read_model_file(last)  # refuses non-finite weights: the kept model is finite


def test_exploding_loss_under_grad_clip_fails_and_names_the_learning_rate(tmp_path, capsys):
    recipe = _write(tmp_path, "r.yaml", _digits_recipe(tmp_path, optimizer={"name": "sgd", "lr": 1e4}, grad_clip=1.0))
    # a stale temporary file of a killed atomic write is removed when the run starts
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    stale = tmp_path / "out" / "checkpoints" / ".state.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    line = cli_error(["train", str(recipe), "--out", str(tmp_path / "out")], capsys)
    assert "exploded" in line
    _assert_failed_run(tmp_path / "out", line, "train.optimizer.lr")
    assert "grad_clip" not in line.split("likely cause")[1]  # it is set already: not suggested
    assert not stale.exists()


def test_huge_loss_weight_is_named(tmp_path, capsys):
    teacher = _teacher_file(tmp_path)
    data = _digits_recipe(tmp_path, optimizer={"name": "sgd", "lr": 5.0})
    data.update(teachers=[{"checkpoint": str(teacher)}], method={"name": "kd", "kd_weight": 90000})
    line = cli_error(["train", str(_write(tmp_path, "r.yaml", data)), "--out", str(tmp_path / "out")], capsys)
    _assert_failed_run(tmp_path / "out", line, "method.kd_weight")


def test_non_finite_teacher_outputs_name_the_teacher_checkpoint(tmp_path, capsys):
    teacher = _teacher_file(tmp_path, scale=1e30)  # finite weights whose outputs overflow
    data = _digits_recipe(tmp_path, optimizer={"name": "sgd", "lr": 0.01})
    data.update(teachers=[{"checkpoint": str(teacher)}], method={"name": "kd"})
    line = cli_error(["train", str(_write(tmp_path, "r.yaml", data)), "--out", str(tmp_path / "out")], capsys)
    _assert_failed_run(tmp_path / "out", line, str(teacher))


def test_weights_that_turn_nan_never_overwrite_model_last(tmp_path):
    from kdforge.engine.divergence import RunDiverged
    from kdforge.engine.trainer import Trainer

    config = build_config(_digits_recipe(tmp_path, optimizer={"name": "sgd", "lr": 0.05}, epochs=3))
    out = tmp_path / "out"
    trainer = Trainer(config, out)
    kept: dict[str, bytes] = {}

    def poison_after_first_epoch(t, epoch, record):
        if epoch == 0:
            kept["last"] = (out / "checkpoints" / "model_last.pt").read_bytes()
            original = t.distiller.after_optimizer_step

            def step_then_poison(step):
                original(step)
                if t.global_step == 2 * t.steps_per_epoch - 1:  # the last step of epoch 2: loss was finite
                    with torch.no_grad():
                        next(t.distiller.parameters()).fill_(float("nan"))

            t.distiller.after_optimizer_step = step_then_poison

    trainer.callbacks.append(poison_after_first_epoch)
    with pytest.raises(RunDiverged) as info:
        trainer.fit()
    assert_one_line(str(info.value))
    assert "weights became non-finite" in str(info.value) and "learning rate" in str(info.value)
    assert (out / "checkpoints" / "model_last.pt").read_bytes() == kept["last"]
    summary = _summary(out)
    assert summary["status"] == "failed" and summary["epochs_done"] == 1


def test_an_unexpected_crash_is_recorded_as_failed_not_left_running(tmp_path):
    from kdforge.engine.trainer import Trainer

    def crash(trainer, epoch, record):
        raise RuntimeError("CUDA out of memory (simulated)\nsecond line")

    config = build_config(_digits_recipe(tmp_path, optimizer={"name": "sgd", "lr": 0.05}, epochs=2))
    with pytest.raises(RuntimeError):
        Trainer(config, tmp_path / "out", callbacks=[crash]).fit()
    summary = _summary(tmp_path / "out")
    assert summary["status"] == "failed"
    assert summary["error"] == "crashed with RuntimeError: CUDA out of memory (simulated)"


def test_bench_reports_a_failed_run_and_does_not_retry_it(tmp_path):
    from kdforge.suite import run_suite

    suite = _write(
        tmp_path,
        "s.yaml",
        {
            "name": "s",
            "base": {"data": {"name": "digits"}, "train": {"epochs": 1}},
            "pairs": [{"student": {"name": "mlp"}, "label": "p"}],
            "methods": {"ce": {"method": {"name": "ce"}}},
        },
    )
    run = tmp_path / "out" / "p" / "ce" / "seed0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"status": "failed", "error": "run diverged at epoch 2: boom"}))
    lines: list[str] = []
    result = run_suite(suite, tmp_path / "out", echo=lines.append)
    assert result["failed"] == {"p/ce/seed0": 1} and result["finished"] == 0
    assert any("FAILED p/ce/seed0" in line and "boom" in line for line in lines)
    assert not (tmp_path / "out" / "logs" / "p__ce__seed0.log").exists()  # never launched again


# --------------------------------------------------------------------------- signals
def test_a_signal_inside_a_save_waits_for_the_save(tmp_path):
    from kdforge.core.checkpoint import atomic_save
    from kdforge.core.signals import StopFlag

    flag = StopFlag()
    with pytest.raises(KeyboardInterrupt):
        with flag.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            atomic_save({"w": torch.ones(3)}, tmp_path / "f.pt")  # runs to the end
    assert torch.load(tmp_path / "f.pt", weights_only=True)["w"].sum() == 3


def test_sigterm_during_torch_save_stops_at_a_safe_point(tmp_path, capsys, monkeypatch):
    """A real SIGTERM delivered while the trainer writes its checkpoint: the write completes, the
    run stops after it with exit 130 and summary 'interrupted', and it resumes to the end."""
    from kdforge.engine import trainer as trainer_module

    real_save = trainer_module.atomic_save
    sent = []

    def save_with_a_signal(obj, path):
        if Path(path).name == "state.pt" and not sent:
            sent.append(path)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, inside the save
        real_save(obj, path)

    monkeypatch.setattr(trainer_module, "atomic_save", save_with_a_signal)
    recipe = _write(tmp_path, "r.yaml", _digits_recipe(tmp_path, optimizer={"name": "sgd", "lr": 0.05}))
    out = tmp_path / "out"
    assert main(["train", str(recipe), "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sent and _summary(out)["status"] == "interrupted" and _summary(out)["epochs_done"] == 1
    assert torch.load(out / "checkpoints" / "state.pt", weights_only=True)["epoch"] == 1
    assert main(["train", str(recipe), "--out", str(out), "--resume"]) == 0
    assert _summary(out)["status"] == "finished"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def test_a_child_dies_when_its_parent_is_killed(tmp_path):
    """kill -9 of a parent (a bench, serve-nonn) takes its children (runs, devices) down."""
    child_code = (
        "import time; from kdforge.core.signals import die_with_parent; die_with_parent(poll_seconds=0.2); "
        "print('up', flush=True); time.sleep(120)"
    )
    parent_code = (
        "import os, subprocess, sys; from kdforge.core.signals import PARENT_ENV; "
        f"env = {{**os.environ, PARENT_ENV: str(os.getpid())}}; "
        f"c = subprocess.Popen([sys.executable, '-c', {child_code!r}], env=env, stdout=subprocess.PIPE); "
        "print(c.pid, flush=True); c.stdout.readline(); print('ready', flush=True); c.wait()"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, env=_env(), text=True)
    child_pid = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "ready"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child_pid):
        time.sleep(0.1)
    assert not _alive(child_pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped by init) counts as dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


@pytest.mark.slow
def test_kill_9_of_bench_stops_its_training_run(tmp_path):
    suite = _write(
        tmp_path,
        "s.yaml",
        {
            "name": "s",
            "base": {"data": {"name": "digits"}, "train": {"epochs": 2000, "batch_size": 16}},
            "pairs": [{"student": {"name": "mlp"}, "label": "p"}],
            "methods": {"ce": {"method": {"name": "ce"}}},
        },
    )
    bench = subprocess.Popen(
        [sys.executable, "-m", "kdforge", "bench", str(suite), "--out", str(tmp_path / "o"), "--threads", "1"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lock = tmp_path / "o" / "p" / "ce" / "seed0" / ".kdforge.lock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (lock.parent / "summary.json").exists():  # training: epoch 1 done
        time.sleep(0.2)
    child = json.loads(lock.read_text())["pid"]
    assert _alive(child)
    bench.kill()
    bench.wait(timeout=10)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.2)
    assert not _alive(child)
    assert _summary(lock.parent)["status"] == "interrupted"


# --------------------------------------------------------------------------- NoNN serving
@pytest.fixture(scope="module")
def device(tmp_path_factory):
    """One real NoNN device (in-process, its own serving threads) of a tiny 2-student system."""
    from test_nonn import INFO, small_system

    from kdforge.core.checkpoint import atomic_save, model_record
    from kdforge.nonn import serve

    folder = tmp_path_factory.mktemp("device")
    torch.manual_seed(0)
    system = small_system([[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]])
    record = model_record(
        system,
        name="nonn",
        kwargs={"student": "lenet", "student_kwargs": {"width": 0.5}, **system.saved_kwargs},
        num_classes=10,
        in_channels=1,
        input_size=(8, 8),
        dataset={"name": INFO.name, "mean": list(INFO.mean), "std": list(INFO.std)},
    )
    atomic_save(record, folder / "system.pt")
    tracebacks: list = []
    previous = threading.excepthook
    threading.excepthook = lambda args: tracebacks.append(args)
    os.environ[serve.TOKEN_ENV] = "secret-token"
    try:
        dev = serve.Device(folder / "system.pt", 0)
    finally:
        del os.environ[serve.TOKEN_ENV]
    dev.model_path = folder / "system.pt"
    thread = threading.Thread(target=dev.serve_forever, daemon=True)
    thread.start()
    yield dev, tracebacks
    threading.excepthook = previous
    dev.stopping.set()
    dev.server.close()


def _frame(magic=b"NoNN", version=1, header: bytes = b'{"op":"ping","id":1}', payload=b"", lengths=None) -> bytes:
    head_len, payload_len = lengths or (len(header), len(payload))
    return struct.pack("!4sBII", magic, version, head_len, payload_len) + header + payload


def _exchange(address, data: bytes, timeout: float = 5.0):
    """Send raw bytes; the answer frame's header, or None when the device closed the connection."""
    from kdforge.nonn.serve import read_frame

    with socket.create_connection(address, timeout=timeout) as conn:
        conn.sendall(data)
        try:
            header, _, _ = read_frame(conn)
        except (ConnectionError, OSError):
            return None
    return header


def _ping(address) -> bool:
    header = _exchange(address, _frame())
    return header is not None and header.get("op") == "pong"


BAD_FRAMES = {
    "announces-2GiB": _frame(lengths=(20, 2 << 30)),
    "announces-4GiB-header": _frame(lengths=(0xFFFFFFFF, 0)),
    "bad-magic": _frame(magic=b"HTTP"),
    "bad-version": _frame(version=9),
    "http-request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "header-not-json": _frame(header=b"{not json"),
    "header-not-utf8": _frame(header=b"\xff\xfe\xfd"),
    "header-a-list": _frame(header=b"[1, 2]"),
    "shape-not-a-list": _frame(header=b'{"op":"infer","id":1,"dtype":"float32","shape":7}', payload=bytes(4)),
    "shape-negative": _frame(header=b'{"op":"infer","id":1,"dtype":"float32","shape":[-1]}', payload=bytes(4)),
    "shape-payload-mismatch": _frame(
        header=b'{"op":"infer","id":1,"dtype":"float32","shape":[1,1,8,8]}', payload=bytes(12)
    ),
    "unknown-dtype": _frame(header=b'{"op":"infer","id":1,"dtype":"complex128","shape":[1]}', payload=bytes(16)),
    "unknown-op": _frame(header=b'{"op":"rm -rf","id":1}'),
    "infer-without-tensor": _frame(header=b'{"op":"infer","id":1}'),
    "infer-wrong-shape": _frame(header=b'{"op":"infer","id":1,"dtype":"float32","shape":[1,3]}', payload=bytes(12)),
    "shutdown-without-token": _frame(header=b'{"op":"shutdown","id":1}'),
    "shutdown-wrong-token": _frame(header=b'{"op":"shutdown","id":1,"token":"guess"}'),
    "shutdown-token-not-a-string": _frame(header=b'{"op":"shutdown","id":1,"token":123}'),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_bad_frame_is_refused_counted_and_the_device_keeps_serving(case, device):
    dev, tracebacks = device
    errors = dev.errors + dev.refused
    header = _exchange(dev.address, BAD_FRAMES[case])
    assert header is None or header.get("op") == "error"
    deadline = time.monotonic() + 5
    while dev.errors + dev.refused == errors and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dev.errors + dev.refused > errors
    assert _ping(dev.address) and not dev.stopping.is_set()
    assert tracebacks == []


@pytest.fixture(scope="module")
def aggregator_server(device):
    """An aggregator server in front of the device (twice: the head takes two students' vectors)."""
    from kdforge.nonn.serve import Aggregator, AggregatorServer

    dev, tracebacks = device
    aggregator = Aggregator.from_model_file(dev.model_path, [dev.address, dev.address], deadline=5.0)
    server = AggregatorServer(aggregator)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, tracebacks
    server.close()
    aggregator.close()


AGGREGATOR_FRAMES = {k: v for k, v in BAD_FRAMES.items() if not k.startswith(("shutdown", "infer"))}


@pytest.mark.parametrize("case", list(AGGREGATOR_FRAMES))
def test_bad_frame_to_the_aggregator_is_refused_and_counted(case, aggregator_server):
    from kdforge.nonn.serve import classify_remote

    server, tracebacks = aggregator_server
    errors = server.errors
    header = _exchange(server.address, AGGREGATOR_FRAMES[case])
    assert header is None or header.get("op") == "error"
    deadline = time.monotonic() + 5
    while server.errors == errors and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.errors > errors and tracebacks == []
    logits, reply = classify_remote(server.address, torch.zeros(2, 1, 8, 8))  # still serving
    assert logits.shape == (2, 10) and reply["failed"] == []


def test_inputs_of_the_wrong_shape_are_answered_with_every_device_failed(aggregator_server):
    from kdforge.nonn.serve import classify_remote

    server, tracebacks = aggregator_server
    _, reply = classify_remote(server.address, torch.zeros(2, 3))
    assert reply["failed"] == [0, 1] and tracebacks == []


def test_connections_over_the_cap_are_refused(device):
    from kdforge.nonn.serve import MAX_CONNECTIONS

    dev, tracebacks = device
    held = [socket.create_connection(dev.address, timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        refused_before = dev.refused
        extra = socket.create_connection(dev.address, timeout=5)
        extra.sendall(_frame())
        try:
            closed = extra.recv(16) == b""
        except ConnectionResetError:
            closed = True
        extra.close()
        assert closed and dev.refused == refused_before + 1
    finally:
        for conn in held:
            conn.close()
    time.sleep(0.2)
    assert _ping(dev.address) and tracebacks == []


def test_shutdown_with_the_serving_runs_token_works(tmp_path):
    """Only the holder of the token can stop a device remotely."""
    from test_nonn import small_system

    from kdforge.core.checkpoint import atomic_save, model_record
    from kdforge.nonn import serve

    system = small_system([[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]])
    record = model_record(
        system,
        name="nonn",
        kwargs={"student": "lenet", "student_kwargs": {"width": 0.5}, **system.saved_kwargs},
        num_classes=10,
        in_channels=1,
        input_size=(8, 8),
    )
    atomic_save(record, tmp_path / "s.pt")
    for token in (None, "t0k3n"):
        if token:
            os.environ[serve.TOKEN_ENV] = token
        try:
            dev = serve.Device(tmp_path / "s.pt", 1)
        finally:
            os.environ.pop(serve.TOKEN_ENV, None)
        thread = threading.Thread(target=dev.serve_forever, daemon=True)
        thread.start()
        _exchange(dev.address, _frame(header=json.dumps({"op": "shutdown", "token": "t0k3n"}).encode()))
        thread.join(2)
        assert dev.stopping.is_set() == (token is not None)
        dev.stopping.set()
        dev.server.close()


def test_the_corpus_is_large():
    """At least 300 cases: the parametrised lists above, counted."""
    count = (
        len(NUMERIC_KEYS) * len(NUMERIC_BAD)
        + len(INT_KEYS)
        + len(BOOL_KEYS) * 5
        + len(METHOD_CASES)
        + len(RECIPE_FILES)
        + len(DATA_CASES)
        + len(CHECKPOINT_CASES)
        + len(BAD_FRAMES)
        + len(AGGREGATOR_FRAMES)
    )
    assert count >= 300, count


def test_math_is_finite_guard():  # the explosion rule as documented
    from kdforge.engine.divergence import EXPLOSION_FACTOR, LossWatch

    watch = LossWatch()
    assert watch.check(2.3) is None and watch.check(1e3) is None
    assert "exploded" in (watch.check(2.3 * EXPLOSION_FACTOR * 1.01) or "")
    assert "nan" in (LossWatch().check(math.nan) or "")
    small = LossWatch([0.01])  # a loss that starts near zero: the floor of 1.0 applies
    assert small.check(5000.0) is None and small.check(2e4) is not None


@pytest.mark.slow
def test_kill_9_of_serve_nonn_leaves_no_device_answering(tmp_path):
    from test_nonn import INFO, small_system

    from kdforge.core.checkpoint import atomic_save, model_record

    system = small_system([[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]])
    record = model_record(
        system,
        name="nonn",
        kwargs={"student": "lenet", "student_kwargs": {"width": 0.5}, **system.saved_kwargs},
        num_classes=10,
        in_channels=1,
        input_size=(8, 8),
        dataset={"name": INFO.name, "mean": list(INFO.mean), "std": list(INFO.std)},
    )
    atomic_save(record, tmp_path / "s.pt")
    serve = subprocess.Popen(
        [sys.executable, "-m", "kdforge", "serve-nonn", str(tmp_path / "s.pt")],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = serve.stdout.readline()  # "NoNN aggregator on H:P (...); devices 0@h:p, 1@h:p; Ctrl-C stops"
    devices = [(part.split("@")[1].rsplit(":", 1)) for part in line.split("devices ")[1].split(";")[0].split(", ")]
    addresses = [(host, int(port)) for host, port in devices]
    assert len(addresses) == 2 and all(_ping(a) for a in addresses)
    serve.kill()
    serve.wait(timeout=10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_answers(a) for a in addresses):
        time.sleep(0.2)
    assert not any(_answers(a) for a in addresses)


def _answers(address) -> bool:
    try:
        return _ping(address)
    except OSError:
        return False


@pytest.mark.slow
def test_kill_9_of_a_ddp_run_stops_its_other_rank(tmp_path):
    """Fabric starts rank 1 from rank 0's process; killing rank 0 before the ranks connect must not
    leave rank 1 waiting at the rendezvous (for the collectives' 30-minute timeout)."""
    recipe = _write(
        tmp_path,
        "r.yaml",
        {
            "data": {"name": "digits"},
            "student": {"name": "mlp"},
            "train": {"epochs": 2000, "batch_size": 16, "devices": 2, "strategy": "ddp", "progress": "none"},
        },
    )
    rank0 = subprocess.Popen(
        [sys.executable, "-m", "kdforge", "train", str(recipe), "--out", str(tmp_path / "o")],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    children: list[str] = []
    while time.monotonic() < deadline and not children:  # rank 1 exists: kill rank 0 before they connect
        children = subprocess.run(["pgrep", "-P", str(rank0.pid)], capture_output=True, text=True).stdout.split()
        time.sleep(0.05)
    assert children, "rank 0 started no other rank"
    time.sleep(1.0)  # rank 1 is importing or waiting at the rendezvous
    rank0.kill()
    rank0.wait(timeout=10)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(int(pid)) for pid in children):
        time.sleep(0.2)
    assert not any(_alive(int(pid)) for pid in children)

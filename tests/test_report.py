"""`kdforge report`: collecting run directories, grouping by seed, statistics, the three files."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from kdforge.methods.references import REFERENCES, lookup
from kdforge.report import collect, collect_all, group_runs, main, table_rows, write_report
from kdforge.report.collect import strip_seed
from kdforge.report.table import FINAL_HEADER, Stat, best_header

DELTA = "Δ final vs student alone"
TIME = "time/batch vs KD"
PAPER = "paper top-1 (%)"


def make_run(
    root: Path,
    directory: str,
    *,
    name: str,
    method: str = "kd",
    seed: int = 0,
    dataset: str = "cifar100",
    student: str = "resnet20",
    teachers: tuple = ("resnet56",),
    final: float = 70.0,
    best: float | None = None,
    best_epoch: int = 1,
    epochs: int = 3,
    split: str = "test",
    seconds_per_batch: float = 0.01,
    train_seconds: float = 120.0,
    extra_parameters: int = 0,
    params: dict | None = None,
    data: dict | None = None,
    status: str = "finished",
    device: str = "cpu: x86_64, 2 threads",
    commit: str = "abc123def4567890",
    curve: list[float] | None = None,
    student_options: dict | None = None,
) -> Path:
    """Write a run directory as the trainer would (config.yaml, metrics.jsonl, summary.json)."""
    run_dir = root / directory
    run_dir.mkdir(parents=True)
    best = final if best is None else best
    teacher_entries = []
    for teacher in teachers:
        teacher_entries.append(
            teacher if isinstance(teacher, dict) else {"name": teacher, "kwargs": {}, "checkpoint": None}
        )
    config = {
        "name": name,
        "seed": seed,
        "data": {
            "name": dataset,
            "root": "data",
            "download": False,
            "val_fraction": 0.1 if split == "val" else 0.0,
            "train_subset": None,
            "seed": 0,
            "augment": True,
            "options": {},
            **(data or {}),
        },
        "student": {
            "name": student,
            "kwargs": {},
            "checkpoint": None,
            "lma": None,
            "prune": None,
            "qat": None,
            **(student_options or {}),
        },
        "teachers": teacher_entries,
        "method": {"name": method, **(params or {})},
        "train": {"epochs": epochs, "batch_size": 64, "progress": "none"},
        "teacher_bank": {"enabled": False, "directory": None, "top_k": None},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    curve = curve or [final - 5.0 + i for i in range(epochs - 1)] + [final]
    records = [
        {
            "epoch": e,
            "train": {"loss": 1.0, "seconds": 1.0},
            "lr": {"student": 0.1},
            "test": {"top1": top1, "top5": 99.0, "loss": 0.5},
        }
        for e, top1 in enumerate(curve)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    done = len(records) if status == "finished" else 1
    summary = {
        "name": name,
        "status": status,
        "method": method,
        "dataset": dataset,
        "student": student,
        "teachers": [t if isinstance(t, str) else (t.get("name") or "") for t in teachers],
        "seed": seed,
        "epochs_done": done,
        "epochs": epochs,
        "final": {"epoch": epochs - 1, "test": {"top1": final, "top5": 99.0, "loss": 0.5}, "val": None},
        "best": {
            "epoch": best_epoch,
            "top1": best + (3.0 if split == "val" else 0.0),
            "split": split,
            "test": {"top1": best, "top5": 99.0, "loss": 0.4},
        },
        "selection_split": split,
        "student_parameters": 278324,
        "extra_parameters": extra_parameters,
        "train_seconds": train_seconds,
        "wall_seconds": train_seconds + 10,
        "seconds_per_batch": seconds_per_batch,
        "global_step": 100,
        "world_size": 1,
        "record": {
            "kdforge_version": "0.1.0",
            "git_commit": commit,
            "git_dirty": False,
            "torch_version": "2.13.0+cpu",
            "device": device,
            "seed": seed,
        },
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def rows_by_name(groups):
    return {row["run"]: row for row in table_rows(groups)}


# --------------------------------------------------------------------------- grouping and statistics
def test_runs_differing_only_by_seed_form_one_group(tmp_path):
    for seed in range(3):
        make_run(
            tmp_path,
            f"kd-s{seed}",
            name=f"kd-s{seed}",
            seed=seed,
            final=70.0 + seed,
            data={"root": f"/elsewhere/{seed}"},
        )  # where the data lived does not split a group
    for seed in range(2):
        make_run(tmp_path, f"kdt2-{seed}", name="kd_t2", seed=seed, params={"temperature": 2})
    make_run(tmp_path / "nested" / "deeper", "ce", name="alone", method="ce", teachers=())
    runs = collect([tmp_path])
    assert len(runs) == 6
    groups = group_runs(runs)
    by_name = {g.name: g for g in groups}
    assert set(by_name) == {"kd", "kd_t2", "alone"}
    assert by_name["kd"].n == 3 and by_name["kd"].seeds == [0, 1, 2]
    assert by_name["kd_t2"].n == 2  # another temperature is another recipe
    assert by_name["kd"].config_hash != by_name["kd_t2"].config_hash
    assert [g.method for g in groups] == ["ce", "kd", "kd"]  # the student alone first, then plain KD


def test_student_variants_lma_prune_qat_are_separate_groups(tmp_path):
    """A ReLU and an LMA student of one architecture differ in more than the seed."""
    for seed in range(2):
        make_run(tmp_path, f"relu-{seed}", name="kd relu", seed=seed)
        make_run(tmp_path, f"lma-{seed}", name="kd lma", seed=seed, student_options={"lma": {"k": 8, "momentum": 0.99}})
    make_run(tmp_path, "qat", name="kd qat", student_options={"qat": {"bits": 8}})
    groups = {g.name: g for g in group_runs(collect([tmp_path]))}
    assert set(groups) == {"kd relu", "kd lma", "kd qat"}
    assert groups["kd relu"].n == 2 and groups["kd lma"].n == 2
    assert groups["kd relu"].student_arch == "resnet20"
    assert groups["kd lma"].student_arch == "resnet20+lma(k=8)" and groups["kd qat"].student_arch == "resnet20+qat"


def test_colliding_names_of_different_recipes_get_a_hash(tmp_path):
    make_run(tmp_path, "a", name="kd", params={"temperature": 4})
    make_run(tmp_path, "b", name="kd", params={"temperature": 8})
    names = sorted(g.name for g in group_runs(collect([tmp_path])))
    assert len(set(names)) == 2 and all(re.fullmatch(r"kd \[[0-9a-f]{6}\]", n) for n in names)


def test_mean_and_sample_std_by_hand(tmp_path):
    for seed, top1 in enumerate([70.0, 72.0, 74.0]):
        make_run(tmp_path, f"r{seed}", name="kd", seed=seed, final=top1)
    make_run(tmp_path, "single", name="single", method="fitnet", final=71.234)
    groups = group_runs(collect([tmp_path]))
    rows = rows_by_name(groups)
    # mean 72, sample std sqrt(((-2)^2 + 0 + 2^2) / (3 - 1)) = 2
    assert rows["kd"][FINAL_HEADER] == "72.00 ± 2.00"
    assert rows["single"][FINAL_HEADER] == "71.23 ± —"
    assert Stat.of([1.0, 2.0]).std == pytest.approx(0.5**0.5)
    assert Stat.of([None]).format() == "—"


def test_final_and_best_are_separate_columns_never_mixed(tmp_path):
    for seed, (final, best) in enumerate([(70.0, 75.0), (72.0, 77.0)]):
        make_run(tmp_path, f"t{seed}", name="on-test", seed=seed, final=final, best=best)
        make_run(
            tmp_path,
            f"v{seed}",
            name="on-val",
            method="fitnet",
            seed=seed,
            final=final - 10,
            best=best - 10,
            split="val",
        )
    groups = group_runs(collect([tmp_path]))
    rows = rows_by_name(groups)
    test_col, val_col = best_header("test"), best_header("val")
    assert "selected on test" in test_col and "selected on val" in val_col
    assert rows["on-test"][FINAL_HEADER] == "71.00 ± 1.41"
    assert rows["on-test"][test_col] == "76.00 ± 1.41"
    assert rows["on-test"][val_col] == "—"
    assert rows["on-val"][FINAL_HEADER] == "61.00 ± 1.41"
    # the val-selected column shows test accuracy at the val-chosen epoch, not the val accuracy
    assert rows["on-val"][val_col] == "66.00 ± 1.41"
    assert rows["on-val"][test_col] == "—"


def test_delta_over_the_student_alone(tmp_path):
    for seed, top1 in enumerate([69.0, 71.0]):
        make_run(tmp_path, f"ce{seed}", name="alone", method="ce", teachers=(), seed=seed, final=top1)
    make_run(tmp_path, "ce-long", name="alone-long", method="ce", teachers=(), epochs=5, final=80.0)
    make_run(tmp_path, "ce-other", name="alone-r8", method="ce", teachers=(), student="resnet8", final=60.0)
    for seed, top1 in enumerate([72.0, 73.0]):
        make_run(tmp_path, f"kd{seed}", name="kd", seed=seed, final=top1)
    make_run(tmp_path, "kd-long", name="kd-long", epochs=5, final=81.5)
    make_run(tmp_path, "kd-sub", name="kd-subset", data={"train_subset": 500}, final=60.0)
    groups = group_runs(collect([tmp_path]))
    rows = rows_by_name(groups)
    assert rows["kd"][DELTA] == "+2.50"  # 72.5 - 70.0
    assert rows["kd-long"][DELTA] == "+1.50"  # against the 5-epoch student alone only
    assert rows["kd-subset"][DELTA] == "—"  # no student alone trained on the same subset
    assert rows["alone"][DELTA] == "ref"
    by_name = {g.name: g for g in groups}
    assert by_name["kd"].student_alone.name == "alone"
    assert by_name["kd"].delta == pytest.approx(2.5)


def test_time_per_batch_relative_to_plain_kd(tmp_path):
    for seed, spb in enumerate([0.010, 0.012]):
        make_run(tmp_path, f"kd{seed}", name="kd", seed=seed, seconds_per_batch=spb)
    make_run(tmp_path, "crd", name="crd", method="crd", seconds_per_batch=0.0165, extra_parameters=12345)
    make_run(
        tmp_path,
        "crd-gpu",
        name="crd-gpu",
        method="crd",
        seconds_per_batch=0.001,
        device="cuda: H100",
        params={"tag": 1},
    )
    make_run(tmp_path, "at-r110", name="at-r110", method="at", teachers=("resnet110",), seconds_per_batch=0.02)
    make_run(tmp_path, "ce", name="alone", method="ce", teachers=(), seconds_per_batch=0.005)
    rows = rows_by_name(group_runs(collect([tmp_path])))
    assert rows["kd"][TIME] == "1.00×"
    assert rows["crd"][TIME] == "1.50×"  # 0.0165 / mean(0.010, 0.012)
    assert rows["crd"]["extra params"] == "12,345"
    assert rows["crd-gpu"][TIME] == "—"  # no KD timing on that device
    assert rows["at-r110"][TIME] == "—"  # no KD run with that teacher
    assert rows["alone"][TIME] == "—"
    assert rows["kd"]["train min/run"] == "2.0"


# --------------------------------------------------------------------------- published numbers
def test_reference_registry_lookup():
    assert lookup("kd", "cifar100", "resnet56", "resnet20").top1 == 70.66
    assert lookup("ce", "cifar100", None, "resnet20").top1 == 69.06
    assert lookup("dkd", "cifar100", "resnet32x4", "resnet8x4").top1 == 76.32
    assert lookup("crd", "cifar100", "wrn_40_2", "wrn_16_2").top1 == 75.48
    assert lookup("fsp", "cifar100", "vgg13", "vgg8").top1 == 70.23
    assert lookup("kd", "cifar10", "resnet56", "resnet20") is None
    assert lookup("kd", "cifar100", "resnet110", "resnet20") is None
    assert lookup("ce", "cifar100", "resnet56", "resnet20") is None
    keys = [(r.method, r.dataset, r.teacher, r.student) for r in REFERENCES]
    assert len(keys) == len(set(keys))
    assert all(r.source for r in REFERENCES)


def test_paper_column_only_for_a_matching_setting(tmp_path):
    make_run(tmp_path, "full", name="kd-full", epochs=240, final=70.1)
    make_run(tmp_path, "short", name="kd-short", epochs=3)
    make_run(tmp_path, "alone", name="alone", method="ce", teachers=(), epochs=240)
    make_run(tmp_path, "c10", name="kd-cifar10", dataset="cifar10")
    make_run(tmp_path, "other-pair", name="kd-r110", teachers=("resnet110",))
    make_run(tmp_path, "two", name="kd-two", method="ensemble_kd", teachers=("resnet56", "resnet56"))
    make_run(tmp_path, "coarse", name="kd-coarse", data={"options": {"label_type": "coarse"}}, epochs=240)
    rows = rows_by_name(group_runs(collect([tmp_path])))
    assert rows["kd-full"][PAPER] == "70.66"
    assert rows["kd-short"][PAPER] == "70.66†"  # context only: the budget differs
    assert rows["alone"][PAPER] == "69.06"
    for name in ("kd-cifar10", "kd-r110", "kd-two", "kd-coarse"):
        assert rows[name][PAPER] == "—", name


# --------------------------------------------------------------------------- teachers named by checkpoint
def test_teacher_named_from_checkpoint_run_and_seeds_of_a_pipeline_group(tmp_path):
    for seed in range(2):  # a pipeline per seed: teacher stage, then a student reading its checkpoint
        base = tmp_path / f"seed{seed}"
        make_run(base, "teacher", name="teacher", method="ce", teachers=(), student="resnet56", seed=seed)
        ckpt = str(base / "teacher" / "checkpoints" / "model_last.pt")  # the file itself is absent
        make_run(
            base,
            "kd",
            name="kd",
            seed=seed,
            final=70.0 + seed,
            teachers=({"name": None, "kwargs": {}, "checkpoint": ckpt},),
        )
    make_run(
        tmp_path,
        "lost",
        name="kd-lost",
        teachers=({"name": None, "kwargs": {}, "checkpoint": "gone/checkpoints/model_last.pt"},),
    )
    groups = {g.name: g for g in group_runs(collect([tmp_path]))}
    assert groups["kd"].teachers == ("resnet56",)
    assert groups["kd"].n == 2  # different teacher files of the same teacher recipe: one group
    assert groups["teacher"].n == 2
    assert groups["kd-lost"].teachers == ("?",)


# --------------------------------------------------------------------------- files
@pytest.fixture()
def suite(tmp_path):
    runs = tmp_path / "runs"
    for seed in range(2):
        make_run(
            runs, f"alone-{seed}", name=f"alone-seed{seed}", method="ce", teachers=(), seed=seed, final=69.0 + seed
        )
        make_run(
            runs,
            f"kd-{seed}",
            name=f"kd-seed{seed}",
            seed=seed,
            final=71.0 + seed,
            best=72.0 + seed,
            commit="1111111111111111" if seed else "2222222222222222",
        )
    make_run(
        runs,
        "odd",
        name='<b>odd & "quoted"</b>',
        method="fitnet",
        final=70.0,
        extra_parameters=4096,
        seconds_per_batch=0.02,
    )
    make_run(runs, "half", name="half-done", status="running")
    make_run(runs, "stopped", name="stopped", status="interrupted")
    return runs


def test_unfinished_runs_are_skipped_and_listed(suite):
    runs, skipped = collect_all([suite])
    assert {r.name for r in runs}.isdisjoint({"half-done", "stopped"})
    assert sorted(s.name for s in skipped) == ["half-done", "stopped"]
    result = write_report([suite], suite / "report")
    text = result["markdown"].read_text()
    assert "2 runs unfinished: half-done (running, 1/3 epochs), stopped (interrupted, 1/3 epochs)" in text
    assert "half-done" not in "".join(row["run"] for row in result["rows"])


def test_report_files(suite):
    out = suite / "report"
    result = write_report([suite], out)
    assert {p.name for p in out.iterdir()} == {"report.md", "results.csv", "report.html"}
    markdown = result["markdown"].read_text()
    assert "| run | method |" in markdown and "selected on test" in markdown
    assert "2222222222" in markdown and "1111111111" in markdown  # provenance: both commits
    assert "torch versions: 2.13.0+cpu (5 runs)" in markdown

    page = result["html"].read_text()
    assert "data:image/png;base64," in page
    assert "href=" not in page.lower()
    sources = re.findall(r"""src\s*=\s*["']?([^"'\s>]+)""", page, flags=re.IGNORECASE)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page.lower() and "<script" not in page.lower()
    assert "&lt;b&gt;odd &amp; &quot;quoted&quot;&lt;/b&gt;" in page
    assert "<b>odd" not in page

    with result["csv"].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5
    kd = sorted((r for r in rows if r["group"] == "kd"), key=lambda r: r["seed"])
    assert [float(r["final_top1"]) for r in kd] == [71.0, 72.0]
    assert [float(r["best_top1"]) for r in kd] == [72.0, 73.0]
    assert float(kd[0]["group_final_top1_mean"]) == pytest.approx(71.5)
    assert float(kd[0]["group_delta_vs_student_alone"]) == pytest.approx(2.0)
    assert kd[0]["student_alone_group"] == "alone" and kd[0]["best_selected_on"] == "test"
    odd = next(r for r in rows if r["method"] == "fitnet")
    assert odd["run_name"] == '<b>odd & "quoted"</b>' and odd["group_final_top1_std"] == ""


def test_main_prints_the_table_and_defaults_to_the_first_folder(suite, capsys):
    assert main([str(suite)], None) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| run | method |")
    assert "2 runs unfinished" in printed
    assert (suite / "report.md").is_file() and (suite / "report.html").is_file()


def test_errors_name_the_problem(tmp_path):
    from kdforge.core.errors import KDForgeError

    with pytest.raises(KDForgeError, match="does not exist"):
        write_report([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(KDForgeError, match="no run directories"):
        write_report([tmp_path / "empty"])


def test_strip_seed():
    assert strip_seed("kd-seed3", 3) == "kd"
    assert strip_seed("kd_s0", 0) == "kd"
    assert strip_seed("resnet20", 20) == "resnet20"
    assert strip_seed("kd-2", 1) == "kd-2"


# --------------------------------------------------------------------------- a real run
def test_real_run_with_a_teacher_known_only_by_its_checkpoint(tmp_path):
    from kdforge.config import build_config
    from kdforge.core.checkpoint import atomic_save, model_record
    from kdforge.engine.trainer import Trainer
    from kdforge.models import create

    # a teacher file as `kdforge train` writes it (untrained: only its name matters here)
    teacher = create("lenet", num_classes=10, in_channels=1, input_size=(8, 8), width=2)
    checkpoint = tmp_path / "zoo" / "teacher.pt"
    atomic_save(
        model_record(teacher, name="lenet", kwargs={"width": 2}, num_classes=10, in_channels=1, input_size=(8, 8)),
        checkpoint,
    )
    recipe = {
        "name": "kd",
        "data": {"name": "digits", "augment": False, "train_subset": 100},
        "student": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "teachers": [{"checkpoint": str(checkpoint)}],
        "method": {"name": "kd"},
        "train": {"epochs": 2, "batch_size": 50, "progress": "none", "scheduler": {"name": "constant"}},
    }
    Trainer(build_config(recipe), tmp_path / "runs" / "kd").fit()
    result = write_report([tmp_path / "runs"], tmp_path / "report")
    (row,) = result["rows"]
    assert row["teacher"] == "lenet(width=2)" and row["student"] == "mlp(hidden=[16])"
    assert row["seeds"] == "1" and row[TIME] == "1.00×"
    assert re.fullmatch(r"\d+\.\d\d ± —", row[FINAL_HEADER])
    assert "data:image/png;base64," in result["html"].read_text()

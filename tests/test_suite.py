"""Suites: expansion into runs, validation, and the digits-smoke suite end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdforge.core.errors import ConfigError
from kdforge.suite import load_suite, plan

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "suites" / "digits-smoke.yaml"


def write_suite(tmp_path, **changes):
    data = yaml.safe_load(SMOKE.read_text())
    data.update(changes)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_plan_expands_pairs_methods_and_seeds(tmp_path):
    spec, folder = load_suite(SMOKE)
    runs = plan(spec, folder, tmp_path)
    labels = [r.label for r in runs]
    assert labels[0] == "teachers/lenet4"
    assert len(runs) == 1 + len(spec.methods) * len(spec.seeds)
    kd = next(r for r in runs if r.label == "lenet4-mlp64/kd/seed1")
    assert kd.recipe["seed"] == 1 and kd.recipe["teachers"][0]["checkpoint"].endswith(
        "teachers/lenet4/checkpoints/model_last.pt"
    )
    assert kd.depends_on == ["teachers/lenet4"] and kd.recipe["teacher_bank"]["enabled"] is True
    alone = next(r for r in runs if r.label == "lenet4-mlp64/student_alone/seed0")
    assert alone.recipe["teachers"] == [] and alone.depends_on == []
    assert kd.recipe["name"] == "kd (lenet4-mlp64)"


def test_suite_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="not defined under 'teachers'"):
        load_suite(write_suite(tmp_path, pairs=[{"teacher": "lenet5", "student": {"name": "mlp"}}]))
    with pytest.raises(ConfigError, match="suite run .*unknown key"):
        spec, folder = load_suite(write_suite(tmp_path, methods={"kd": {"method": {"name": "kd", "temprature": 2}}}))
        plan(spec, folder, tmp_path)
    with pytest.raises(ConfigError, match="unknown key 'sedes'"):
        load_suite(write_suite(tmp_path, sedes=[0]))


def test_digits_smoke_suite_end_to_end(tmp_path):
    """`kdforge bench` runs every run, a second call skips them all, and the report is written."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [
        sys.executable,
        "-m",
        "kdforge",
        "bench",
        str(SMOKE),
        "--out",
        str(tmp_path / "s"),
        "--jobs",
        "2",
        "--threads",
        "1",
    ]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "s").rglob("summary.json")]
    assert len(summaries) == 7 and all(s["status"] == "finished" for s in summaries)
    configs = [yaml.safe_load(p.read_text()) for p in (tmp_path / "s").rglob("config.yaml")]
    assert configs and all(c["train"]["num_threads"] == 1 for c in configs)
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0 and "7 already finished" in second.stdout


def test_runs_are_seed_major_and_assistants_name_earlier_teachers(tmp_path):
    data = yaml.safe_load(SMOKE.read_text())
    lenet = data["teachers"]["lenet4"]["recipe"]
    data["teachers"]["assistant"] = {
        "recipe": {**lenet, "method": {"name": "kd"}, "teachers": ["lenet4"], "student": {"name": "mlp"}}
    }
    data["methods"]["via_assistant"] = {"method": {"name": "kd"}, "teachers": ["assistant"]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    spec, folder = load_suite(path)
    runs = plan(spec, folder, tmp_path / "out")
    assert {r.label for r in runs[:2]} == {"teachers/lenet4", "teachers/assistant"}
    assistant = next(r for r in runs if r.label == "teachers/assistant")
    assert assistant.depends_on == ["teachers/lenet4"]
    assert assistant.recipe["teachers"][0]["checkpoint"].endswith("teachers/lenet4/checkpoints/model_last.pt")
    seeds = [r.recipe["seed"] for r in runs[2:]]
    assert seeds == sorted(seeds)  # every method at seed 0 before any at seed 1
    via = next(r for r in runs if r.label.endswith("via_assistant/seed0"))
    assert via.depends_on == ["teachers/assistant"]
    data["teachers"]["assistant"]["recipe"]["teachers"] = ["nobody"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="'nobody', which is not another teacher of this suite"):
        plan(*load_suite(path), tmp_path / "out")


def test_sigterm_stops_the_suite_and_its_runs_resumably(tmp_path):
    """Killing `kdforge bench` must not orphan its training processes or leave runs marked 'running'."""
    import signal
    import time

    path = write_suite(
        tmp_path,
        seeds=[0],
        teachers={},
        pairs=[{"student": {"name": "mlp", "kwargs": {"hidden": [64]}}}],
        methods={"alone": {"method": {"name": "ce"}}, "alone_b": {"method": {"name": "ce"}}},
        teacher_bank=False,
    )
    data = yaml.safe_load(path.read_text())
    data["base"]["train"]["epochs"] = 3000
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "s"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    bench = subprocess.Popen(
        [sys.executable, "-m", "kdforge", "bench", str(path), "--out", str(out), "--jobs", "2", "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    metrics = sorted(out.glob("*/*/seed0/metrics.jsonl"))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and bench.poll() is None:
        metrics = sorted(out.glob("*/*/seed0/metrics.jsonl"))
        if len(metrics) == 2 and all(len(m.read_text().splitlines()) >= 2 for m in metrics):
            break
        time.sleep(0.2)
    assert bench.poll() is None, bench.communicate()
    bench.send_signal(signal.SIGTERM)
    stdout, stderr = bench.communicate(timeout=180)
    assert bench.returncode == 130, stdout + stderr
    assert "stopped 2 running training process(es)" in stdout
    summaries = [json.loads(m.with_name("summary.json").read_text()) for m in metrics]
    assert [s["status"] for s in summaries] == ["interrupted", "interrupted"]
    assert all(0 < s["epochs_done"] < 3000 for s in summaries)

"""The cross-modal recipes end to end through ``kdforge train``, with tiny budgets (MNIST and the
FSDD recordings are needed; skipped when absent). Each pipeline loads its paired dataset once per
stage, so these take about a minute each on 2 loaded cores: marked slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdforge.cli import main

ROOT = Path(__file__).resolve().parents[1]
MNIST_ROOT = Path("/work/main/data")
FSDD_ROOT = ROOT.parent / "shared" / "data"
needs_mnist = pytest.mark.skipif(not (MNIST_ROOT / "MNIST").is_dir(), reason="MNIST files not available")
needs_fsdd = pytest.mark.skipif(not (FSDD_ROOT / "fsdd.npz").is_file(), reason="FSDD not available")
TINY = ["train.epochs=1", "train.progress=none", "train.eval_batch_size=2000"]


def _finished(out: Path) -> dict[str, dict]:
    summaries = {path.parent.name: json.loads(path.read_text()) for path in out.glob("*/summary.json")}
    assert summaries and all(s["status"] == "finished" for s in summaries.values())
    return summaries


@pytest.mark.slow
@needs_mnist
def test_modality_kd_recipe_runs(tmp_path):
    overrides = [*TINY, f"data.root={MNIST_ROOT}", "data.train_subset=100", "train.batch_size=32"]
    assert main(["train", "recipes/modality_kd_mnist", "--set", *overrides, "--out", str(tmp_path / "r")]) == 0
    summaries = _finished(tmp_path / "r")
    assert {"teacher", "alone", "kd", "annealed", "selective"} <= set(summaries)
    assert summaries["kd"]["method"] == "modality_kd"


@pytest.mark.slow
@needs_mnist
@needs_fsdd
def test_ccl_recipe_runs(tmp_path):
    overrides = [*TINY, f"data.root={MNIST_ROOT}", f"data.options.audio_root={FSDD_ROOT}", "data.train_subset=300"]
    assert main(["train", "recipes/ccl_av_mnist", "--set", *overrides, "--out", str(tmp_path / "r")]) == 0
    summaries = _finished(tmp_path / "r")
    assert summaries["audio_to_image_ccl"]["method"] == "ccl"
    assert summaries["image_to_audio_crd"]["method"] == "crd"

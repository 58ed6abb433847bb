"""Packaged recipes and suites: addressable by name from any folder, listed, shipped in the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kdforge.cli import main
from kdforge.config import read_yaml
from kdforge.core.errors import ConfigError
from kdforge.core.recipes import find_recipe, packaged

ROOT = Path(__file__).resolve().parents[1]


def test_names_resolve_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = ROOT / "configs" / "cifar10" / "resnet20_resnet8.yaml"
    for name in ("cifar10/resnet20_resnet8", "cifar10/resnet20_resnet8.yaml", "configs/cifar10/resnet20_resnet8.yaml"):
        assert find_recipe(name).resolve() == expected
    for name in ("cifar10-lite", "suites/cifar10-lite", "configs/suites/cifar10-lite.yaml"):
        assert find_recipe(name, "suites").resolve() == ROOT / "configs" / "suites" / "cifar10-lite.yaml"
    # relative base: inside a recipe found by name still reads its neighbour (base.yaml)
    stages = read_yaml(find_recipe("cifar10/resnet20_resnet8"))["pipeline"]
    assert read_yaml(find_recipe("cifar10/resnet20_resnet8")).keys() == {"pipeline"}
    assert stages["teacher"]["base"] == "base.yaml"
    # an existing file wins over a packaged name
    own = tmp_path / "cifar10" / "resnet20_resnet8.yaml"
    own.parent.mkdir()
    own.write_text("student: {name: mlp}\n")
    assert find_recipe("cifar10/resnet20_resnet8.yaml") == Path("cifar10/resnet20_resnet8.yaml")


def test_unknown_name_is_one_line_with_the_closest_name():
    with pytest.raises(ConfigError, match="did you mean 'cifar10/resnet20_resnet8'") as caught:
        find_recipe("cifar10/resnet20_resnet9")
    assert "kdforge list recipes" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="kdforge list suites"):
        find_recipe("cifar10-heavy", "suites")


def test_listing_covers_every_runnable_file(capsys):
    recipes, suites = packaged("recipes"), packaged("suites")
    assert "cifar10/resnet20_resnet8" in recipes and "mnist/lenet_mlp" in recipes
    assert "cifar10/base" not in recipes  # shared settings, not a recipe
    assert set(suites) == {p.stem for p in (ROOT / "configs" / "suites").glob("*.yaml")}
    files = {p.relative_to(ROOT / "configs").with_suffix("").as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    bases = {f for f in files if f.endswith("/base")}
    assert files == set(recipes) | bases | {f"suites/{s}" for s in suites}
    assert main(["list", "recipes"]) == 0
    out = capsys.readouterr().out
    assert "digits/teacher" in out and "LeNet" in out


def test_train_by_name_from_another_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "digits/student", "--set", "train.epochs=1", "train.progress=none", "--out", "t"])
    assert code == 0
    assert (tmp_path / "t" / "summary.json").is_file()
    assert main(["train", "digits/studnt", "--out", "u"]) == 2
    assert "did you mean 'digits/student'" in capsys.readouterr().err


@pytest.mark.slow
def test_wheel_ships_recipes_and_suite_teachers(tmp_path):
    """Builds the wheel (setup.py's build step copies configs/ and benchmarks/teachers/)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("kdforge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for file in (ROOT / "configs").rglob("*.yaml"):
        assert f"kdforge/configs/{file.relative_to(ROOT / 'configs').as_posix()}" in names
    assert "kdforge/benchmarks/teachers/cifar10_resnet20.pt" in names
    assert "kdforge/recipes/demo.yaml" in names

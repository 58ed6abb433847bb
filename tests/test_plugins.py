"""Methods and models from anywhere: the package's own files, installed plugins, the user's imports.

The plugin package is built in the test (a module tree plus a ``.dist-info`` folder with
``entry_points.txt``, which is what ``pip install`` leaves behind) and put on ``PYTHONPATH`` of fresh
``kdforge`` processes, so each command finds it exactly as it would find an installed package.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdforge.core.errors import ConfigError
from kdforge.core.plugins import import_submodules, import_user_module
from kdforge.methods import METHODS

SRC = Path(__file__).resolve().parents[1] / "src"

PLUGIN_METHOD = '''
import torch.nn.functional as F
from kdforge.methods.base import METHODS, Distiller, MethodParams, Output


class HalfCEParams(MethodParams):
    scale: float = 0.5


@METHODS.register("plugin_half_ce")
class HalfCE(Distiller):
    """A plugin method: CE scaled by a constant."""

    Params = HalfCEParams

    def forward(self, batch, step):
        logits = self.student(batch.image)
        return Output(logits, {"ce": self.params.scale * F.cross_entropy(logits, batch.targets)})
'''

PLUGIN_MODEL = '''
from torch import nn


def tiny_cnn(num_classes=10, in_channels=3, input_size=None, width=8):
    """A plugin model, registered through its entry point (no decorator)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(width, num_classes),
    )
'''


def run_kdforge(args, cwd, extra_path=None, check=True):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(extra_path or ""), str(SRC)])),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "kdforge", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.fixture
def plugin(tmp_path):
    """An 'installed' plugin package declaring one method module and one model object."""
    site = tmp_path / "site"
    package = site / "kdf_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "methods.py").write_text(PLUGIN_METHOD)
    (package / "models.py").write_text(PLUGIN_MODEL)
    info = site / "kdf_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kdf-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[kdforge.methods]\nhalf_ce = kdf_plugin.methods\n\n[kdforge.models]\ntiny_cnn = kdf_plugin.models:tiny_cnn\n"
    )
    return site


def digits_recipe(**extra):
    recipe = {
        "data": {"name": "digits", "augment": False, "train_subset": 200},
        "train": {
            "epochs": 1,
            "batch_size": 50,
            "progress": "none",
            "optimizer": {"name": "sgd", "lr": 0.05},
            "scheduler": {"name": "constant"},
        },
    }
    recipe.update(extra)
    return recipe


def write_yaml(path, data):
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def test_installed_plugin_is_usable_from_every_command(plugin, tmp_path):
    listed = run_kdforge(["list", "methods"], tmp_path, plugin).stdout
    assert "plugin_half_ce" in listed and "A plugin method" in listed
    assert "tiny_cnn" in run_kdforge(["list", "models"], tmp_path, plugin).stdout

    recipe = write_yaml(
        tmp_path / "r.yaml",
        digits_recipe(
            name="plugin-run",
            student={"name": "tiny_cnn", "kwargs": {"width": 6}},
            method={"name": "plugin_half_ce", "scale": 0.25},
        ),
    )
    run_kdforge(["train", str(recipe), "--out", str(tmp_path / "run")], tmp_path, plugin)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["method"] == "plugin_half_ce"

    model_file = tmp_path / "run" / "checkpoints" / "model_last.pt"
    evaluated = json.loads(run_kdforge(["eval", str(model_file), "--json"], tmp_path, plugin).stdout)
    assert evaluated["model"] == "tiny_cnn" and evaluated["top1"] == pytest.approx(summary["final"]["test"]["top1"])
    run_kdforge(["export", str(model_file), "--format", "onnx", "--out", str(tmp_path / "m.onnx")], tmp_path, plugin)
    assert (tmp_path / "m.onnx").stat().st_size > 0

    suite = write_yaml(
        tmp_path / "suite.yaml",
        {
            "name": "plugin-suite",
            "seeds": [0],
            "base": digits_recipe(),
            "pairs": [{"student": {"name": "tiny_cnn"}}],
            "methods": {"half": {"method": {"name": "plugin_half_ce"}}},
        },
    )
    run_kdforge(["bench", str(suite), "--out", str(tmp_path / "suite"), "--no-report"], tmp_path, plugin)
    assert (
        json.loads((tmp_path / "suite" / "none-tiny_cnn" / "half" / "seed0" / "summary.json").read_text())["status"]
        == "finished"
    )

    # without the plugin on the path the same names are unknown, with a one-line error
    missing = run_kdforge(["train", str(recipe), "--out", str(tmp_path / "run2")], tmp_path, check=False)
    assert missing.returncode == 2 and "unknown method 'plugin_half_ce'" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_broken_plugin_fails_with_one_line(plugin, tmp_path):
    (plugin / "kdf_plugin" / "methods.py").write_text("raise RuntimeError('boom')\n")
    result = run_kdforge(["list", "methods"], tmp_path, plugin, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "plugin 'half_ce'" in result.stderr and "boom" in result.stderr and "kdf-plugin" in result.stderr


def test_recipe_imports_a_user_file_and_eval_names_the_import(tmp_path):
    user = tmp_path / "code" / "my_models.py"
    user.parent.mkdir()
    user.write_text(
        PLUGIN_MODEL.replace(
            "def tiny_cnn", "from kdforge.models import MODELS\n\n\n@MODELS.register('user_cnn')\ndef tiny_cnn"
        )
    )
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    # the path is relative to the recipe's folder
    recipe = write_yaml(
        recipes / "r.yaml",
        digits_recipe(
            name="user", imports=["../code/my_models.py"], student={"name": "user_cnn"}, method={"name": "ce"}
        ),
    )
    run_kdforge(["train", str(recipe), "--out", str(tmp_path / "run")], tmp_path)
    model_file = tmp_path / "run" / "checkpoints" / "model_last.pt"
    refused = run_kdforge(["eval", str(model_file)], tmp_path, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"--import {user.resolve()}" in refused.stderr  # loading code is never silent
    ok = run_kdforge(["eval", str(model_file), "--json", "--import", str(user)], tmp_path)
    assert json.loads(ok.stdout)["model"] == "user_cnn"


def test_pipeline_and_suite_accept_imports(tmp_path):
    from kdforge.engine.pipeline import stage_recipes
    from kdforge.suite import SuiteSpec, plan

    user = tmp_path / "m.py"
    user.write_text(
        "from kdforge.models import MODELS\nfrom torch import nn\n\n\n@MODELS.register('pipe_mlp')\n"
        "def pipe_mlp(num_classes=10, in_channels=1, input_size=None):\n"
        "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n"
    )
    stages = stage_recipes({"imports": [str(user)], "pipeline": {"a": {"student": {"name": "pipe_mlp"}}}}, tmp_path)
    assert stages["a"]["imports"] == [str(user)]
    with pytest.raises(ConfigError, match="beside 'pipeline'"):
        stage_recipes({"pipelin": {}, "pipeline": {"a": {}}}, tmp_path)
    spec = SuiteSpec(
        name="s",
        imports=["m.py"],
        base=digits_recipe(),
        pairs=[{"student": {"name": "pipe_mlp"}}],
        methods={"ce": {"method": {"name": "ce"}}},
    )
    (run,) = plan(spec, tmp_path, tmp_path / "out")
    assert run.recipe["imports"] == [str(user.resolve())]


def test_import_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="No module named"):
        import_user_module("no_such_module_anywhere")
    with pytest.raises(ConfigError, match="not found"):
        import_user_module(str(tmp_path / "absent.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("1 / 0\n")
    with pytest.raises(ConfigError, match="ZeroDivisionError"):
        import_user_module(str(bad))
    from kdforge.config import build_config

    with pytest.raises(ConfigError, match="'imports'"):
        build_config({"imports": "x", "student": {"name": "mlp"}})


def test_importing_a_file_twice_registers_once(tmp_path):
    file = tmp_path / "twice.py"
    file.write_text(
        "from kdforge.models import MODELS\n\n\n@MODELS.register('twice_net')\n"
        "def twice_net(num_classes=10, in_channels=1, input_size=None):\n    return None\n"
    )
    first = import_user_module(str(file))
    assert import_user_module(str(file)) is first


def test_every_module_of_a_package_is_discovered(tmp_path, monkeypatch):
    package = tmp_path / "dropin"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from kdforge.core.plugins import import_submodules\nimport_submodules(__name__, __path__)\n"
    )
    (package / "new_method.py").write_text(PLUGIN_METHOD.replace("plugin_half_ce", "dropped_in_method"))
    (package / "_private.py").write_text("raise RuntimeError('private modules are not imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__("dropin")
    assert "dropped_in_method" in METHODS
    # and kdforge's own methods package imports every one of its files
    import kdforge.methods as methods

    files = {p.stem for p in Path(methods.__file__).parent.glob("*.py") if not p.stem.startswith("_")}
    assert {f for f in files if f"kdforge.methods.{f}" not in sys.modules} == set()
    assert len(import_submodules("kdforge.methods", methods.__path__)) == len(files)

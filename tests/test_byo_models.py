"""Models from anywhere: import specs (module:callable, file.py:callable) and Hugging Face ``hf:``
models in recipes and commands, model files that rebuild them in a new process, and the Python
API around the user's own networks. Real trainings (digits, 1 epoch, small subsets), real
subprocesses, a real (tiny) transformers ViT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from kdforge.cli import main
from kdforge.core.checkpoint import atomic_save, model_record, read_model_file
from kdforge.core.errors import ConfigError
from kdforge.models import MODELS, FeatureTap, create

SRC = str(Path(__file__).resolve().parents[1] / "src")

USER_MODELS = '''
import torch
from torch import nn


class SmallCNN(nn.Module):
    """A user's CNN: no feature_points, sized by its own arguments."""

    def __init__(self, num_classes=10, in_channels=1, width=8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


class FlatNet(nn.Module):
    """Needs the input size: its first layer is a Linear on the flattened image."""

    def __init__(self, input_size, in_channels, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size[0] * input_size[1], num_classes))

    def forward(self, x):
        return self.net(x)


def only_kwargs(hidden=4):
    """Takes none of num_classes / in_channels / input_size: they must not be passed."""
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden))


def not_a_network():
    return 42
'''

TRAIN = {"epochs": 1, "batch_size": 32, "progress": "none", "accelerator": "cpu"}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _kdforge(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``kdforge ARGS`` in a new Python process."""
    return subprocess.run(
        [sys.executable, "-m", "kdforge", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )


def _write_recipe(path: Path, recipe: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def user_code(tmp_path_factory) -> Path:
    """A project folder: recipes/models.py next to the recipes (found relative to the recipe)."""
    root = tmp_path_factory.mktemp("byo")
    (root / "recipes").mkdir()
    (root / "recipes" / "models.py").write_text(USER_MODELS)
    return root


@pytest.fixture(scope="module")
def kd_run(user_code) -> Path:
    """KD from a zoo lenet into the user's CNN named by file spec, relative to the recipe's folder."""
    recipe = _write_recipe(
        user_code / "recipes" / "kd.yaml",
        {
            "name": "user_cnn_kd",
            "data": {"name": "digits", "train_subset": 200},
            "student": {"name": "models.py:SmallCNN", "kwargs": {"width": 6}},
            "teachers": [{"name": "lenet"}],
            "method": {"name": "kd", "temperature": 4},
            "train": TRAIN,
        },
    )
    out = user_code / "runs" / "kd"
    old = Path.cwd()
    os.chdir(user_code)  # the spec is not relative to the working directory: found via the recipe
    try:
        assert main(["train", str(recipe), "--out", str(out)]) == 0
    finally:
        os.chdir(old)
    return out


def test_import_spec_recipe_writes_a_rebuildable_model_file(kd_run, user_code):
    record = read_model_file(kd_run / "checkpoints" / "model_last.pt")
    source = record["model"]["source"]
    assert source["kind"] == "import"
    assert source["callable"] == "SmallCNN"
    assert Path(source["path"]) == (user_code / "recipes" / "models.py").resolve()
    assert record["model"]["kwargs"] == {"width": 6}
    summary = json.loads((kd_run / "summary.json").read_text())
    assert summary["student"].endswith("models.py:SmallCNN")


def test_feature_method_on_user_cnn_from_recipe(user_code, tmp_path):
    """fitnet with the user's CNN: input shape from the data (1x8x8), layers named by module."""
    recipe = _write_recipe(
        tmp_path / "fitnet.yaml",
        {
            "data": {"name": "digits", "train_subset": 200},
            "student": {"name": str(user_code / "recipes" / "models.py") + ":SmallCNN"},
            "teachers": [{"name": "lenet"}],
            "method": {"name": "fitnet", "student_layers": ["features.3"], "teacher_layers": ["stage2"]},
            "train": TRAIN,
        },
    )
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["extra_parameters"] > 0  # the regressor was sized from real 8x8 features


def test_user_model_file_in_a_new_process_needs_explicit_code(kd_run, user_code, tmp_path):
    """eval without the import: one line naming --import; with it (or --allow-model-code) it works;
    export to ONNX in a new process matches PyTorch."""
    model_file = kd_run / "checkpoints" / "model_last.pt"
    user_file = str(user_code / "recipes" / "models.py")
    onnx = tmp_path / "user.onnx"
    code = textwrap.dedent(
        f"""
        import sys
        from kdforge.cli import main
        from kdforge.core import plugins
        evaluate = ["eval", {str(model_file)!r}, "--limit", "100", "--json"]
        print("RC", main(evaluate))
        print("RC", main([*evaluate, "--import", {user_file!r}]))
        # forget the imported file, as a third new process would not have it
        plugins._FILE_MODULES.clear()
        for name in [n for n in sys.modules if n.startswith("kdforge_user_")]:
            del sys.modules[name]
        print("RC", main(["export", {str(model_file)!r}, "--out", {str(onnx)!r}, "--allow-model-code", "--json"]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300
    )
    codes = [line for line in result.stdout.splitlines() if line.startswith("RC")]
    assert codes == ["RC 2", "RC 0", "RC 0"], result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("kdforge:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert f"--import {(user_code / 'recipes' / 'models.py').resolve()}" in errors[0]
    assert "--allow-model-code" in errors[0]
    outputs = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert outputs[0]["images"] == 100 and 0 <= outputs[0]["top1"] <= 100
    assert onnx.is_file() and outputs[1]["max_abs_diff"] < 1e-4  # ONNX Runtime agrees with PyTorch


def test_import_spec_arguments_and_errors(user_code, monkeypatch):
    file = str(user_code / "recipes" / "models.py")
    flat = create(f"{file}:FlatNet", num_classes=3, in_channels=1, input_size=(8, 8))
    assert flat(torch.zeros(2, 1, 8, 8)).shape == (2, 3)  # input_size, in_channels, num_classes passed
    plain = create(f"{file}:only_kwargs", num_classes=3, in_channels=1, input_size=(8, 8), hidden=5)
    assert plain(torch.zeros(2, 1, 8, 8)).shape == (2, 5)  # none of them passed, kwargs were
    with pytest.raises(ConfigError, match="returned a int, not a torch.nn.Module") as bad:
        create(f"{file}:not_a_network")
    assert "\n" not in str(bad.value)
    with pytest.raises(ConfigError, match="did you mean 'SmallCNN'"):
        create(f"{file}:SmallCN")
    with pytest.raises(ConfigError, match="model 'no_such_package_xyz.models:Net': cannot import"):
        create("no_such_package_xyz.models:Net")
    monkeypatch.chdir(user_code / "recipes")  # models.py here, but its folder is not on sys.path
    with pytest.raises(ConfigError, match="name the file instead: 'models.py:SmallCNN'"):
        create("models:SmallCNN")
    monkeypatch.syspath_prepend(str(user_code / "recipes"))  # a module spec: package.module:callable
    net = create("models:SmallCNN", num_classes=4, in_channels=1, width=2)
    assert net(torch.zeros(1, 1, 8, 8)).shape == (1, 4)
    with pytest.raises(ConfigError, match="unknown model 'resnet9'"):
        create("resnet9")


def test_python_api_feature_methods_on_a_users_network(user_code):
    """No 32x32 assumption: without data the input shape is a one-line error; from_data infers it;
    CRD without num_samples says what to pass; trainable_parameters() feeds the optimizer."""
    from kdforge.data import load_dataset
    from kdforge.methods import METHODS

    splits = load_dataset("digits", train_subset=100)
    student = create(f"{user_code / 'recipes' / 'models.py'}:SmallCNN", in_channels=1)  # no input_size
    teacher = create("lenet", in_channels=1)
    params = {"student_layers": ["features.3"], "teacher_layers": ["stage2"]}
    with pytest.raises(ConfigError, match="input shape of SmallCNN is unknown.*from_data") as unknown:
        METHODS.get("fitnet")(student, [teacher], params)
    assert "\n" not in str(unknown.value)
    fitnet = METHODS.get("fitnet").from_data(student, [teacher], params, data=splits.train)
    assert fitnet.input_shape == (1, 8, 8)
    trainable = {id(p) for p in fitnet.trainable_parameters()}
    assert {id(p) for p in student.parameters()} <= trainable
    assert {id(p) for p in fitnet.extra_parameters()} <= trainable and fitnet.extra_parameters()
    assert not trainable & {id(p) for p in teacher.parameters()}

    with pytest.raises(
        ConfigError,
        match="SmallCNN has no feature points, so 'stage2' means nothing; name its layers with "
        "method.student_layers.*'features', 'head'",
    ):
        METHODS.get("fitnet").from_data(student, [teacher], {}, data=splits.train)
    with pytest.raises(ConfigError, match="LeNet has no layer 'features.3'; set method.teacher_layers .*stage2"):
        METHODS.get("fitnet").from_data(student, [teacher], {"student_layers": ["features.3"]}, data=splits.train)
    with pytest.raises(ConfigError, match="needs num_samples.*from_data"):
        METHODS.get("crd")(student, [teacher], {"student_layers": ["head.1"], "teacher_layers": ["pool"]})
    crd = METHODS.get("crd").from_data(
        student, [teacher], {"student_layers": ["head.1"], "teacher_layers": ["pool"]}, data=splits
    )
    assert crd.num_samples == len(splits.train)


def test_profile_with_a_mismatched_teacher_file(tmp_path, capsys):
    teacher = create("lenet", num_classes=10, in_channels=1, input_size=(8, 8))
    file = tmp_path / "teacher.pt"
    atomic_save(model_record(teacher, name="lenet", kwargs={}, num_classes=10, in_channels=1, input_size=(8, 8)), file)
    assert main(["profile", "lenet", "--teacher", str(file), "--input", "3x32x32", "--batch-sizes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "takes 1x8x8 input" in err and "--input 1x8x8" in err
    # without --input the zoo model is profiled on the teacher's data shape and classes
    assert main(["profile", "lenet", "--teacher", str(file), "--batch-sizes", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input_shape"] == [1, 8, 8] and report["classes"] == 10


def test_lenet_is_described_as_what_it_is():
    description = MODELS.describe("lenet")
    assert "not LeNet-5" in description and "maxpool" in description and "4x4" in description


# ----------------------------------------------------------------------------- Hugging Face
@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf") / "tiny-vit"
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    return folder


def test_hf_model_logits_and_feature_points(vit_folder):
    model = create(f"hf:{vit_folder}", num_classes=7, in_channels=1, input_size=(8, 8))
    assert {"stem", "stage1", "stage2", "pool", "logits"} <= set(model.feature_points)
    with FeatureTap(model, ["stage2", "pool"]) as tap:
        logits, features = tap(torch.randn(3, 1, 8, 8))
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 7)  # num_labels from the data
    assert features["stage2"].shape == (3, 32, 2, 2)  # 2x2 patch tokens as a map, CLS dropped
    assert features["pool"].shape == (3, 32)
    with pytest.raises(ConfigError, match="takes 1-channel images but the data has 3"):
        create(f"hf:{vit_folder}", num_classes=10, in_channels=3, input_size=(8, 8))
    with pytest.raises(ConfigError, match="allow_download") as offline:  # never downloads unless allowed
        create("hf:kdforge-tests/no-such-model-xyz", num_classes=10, in_channels=1)
    assert "\n" not in str(offline.value)


def test_hf_without_transformers_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the package were not installed
    with pytest.raises(ConfigError, match=r'pip install "kdforge\[hf\]"'):
        create("hf:vit", num_classes=10, in_channels=1, pretrained=False)


def test_hf_vit_teacher_and_student_cross_architecture(vit_folder, tmp_path):
    """A saved ViT as teacher (hf:<folder>) of a zoo CNN, with kd and a feature method, and as a
    student; its model file evaluates in a new process after the folder is gone."""
    data = {"name": "digits", "train_subset": 200}
    kd = _write_recipe(
        tmp_path / "kd.yaml",
        {
            "data": data,
            "student": {"name": "lenet"},
            "teachers": [{"name": f"hf:{vit_folder}"}],
            "method": {"name": "kd"},
            "train": TRAIN,
        },
    )
    assert main(["train", str(kd), "--out", str(tmp_path / "kd")]) == 0
    feature = _write_recipe(
        tmp_path / "at.yaml",
        {
            "data": data,
            "student": {"name": "lenet"},
            "teachers": [{"name": f"hf:{vit_folder}"}],
            "method": {"name": "at", "student_layers": ["stage2"], "teacher_layers": ["stage2"]},
            # AT's weight (1000) on an untrained ViT's maps: lr 0.05 explodes the loss (the run stops)
            "train": {**TRAIN, "optimizer": {"name": "sgd", "lr": 0.005}},
        },
    )
    assert main(["train", str(feature), "--out", str(tmp_path / "at")]) == 0
    student = _write_recipe(
        tmp_path / "vit_student.yaml",
        {
            "data": data,
            "student": {"name": f"hf:{vit_folder}"},
            "teachers": [{"name": "lenet"}],
            "method": {"name": "kd"},
            "train": {**TRAIN, "optimizer": {"name": "adamw", "lr": 1e-3}},
        },
    )
    assert main(["train", str(student), "--out", str(tmp_path / "vit")]) == 0
    model_file = tmp_path / "vit" / "checkpoints" / "model_last.pt"
    source = read_model_file(model_file)["model"]["source"]
    assert source["kind"] == "hf" and source["config"]["model_type"] == "vit"
    assert len(source["config"]["id2label"]) == 10  # num_labels from the data

    moved = vit_folder.with_name("moved-away")
    vit_folder.rename(moved)
    try:
        result = _kdforge(["eval", str(model_file), "--limit", "100", "--json"], tmp_path)
    finally:
        moved.rename(vit_folder)
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(result.stdout)
    summary = json.loads((tmp_path / "vit" / "summary.json").read_text())
    assert evaluated["model"] == f"hf:{vit_folder}" and evaluated["images"] == 100
    assert summary["final"]["test"]["top1"] >= 0


def test_hf_from_scratch_recipe_validates():
    """configs/recipes/hf_vit_resnet8_cifar10.yaml: every stage is a valid recipe."""
    from kdforge.config import build_config, read_yaml
    from kdforge.engine.pipeline import stage_recipes

    path = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "hf_vit_resnet8_cifar10.yaml"
    stages = stage_recipes(read_yaml(path), path.parent)
    assert stages["vit_teacher"]["student"]["name"] == "hf:vit"
    assert stages["kd"]["data"] == {"name": "cifar10", "root": "data", "train_subset": 10000}
    for stage in stages.values():
        build_config(stage)


def test_hf_fresh_architecture_sizes_itself_from_the_data():
    pytest.importorskip("transformers")
    model = create(
        "hf:vit",
        num_classes=10,
        in_channels=3,
        input_size=(32, 32),
        pretrained=False,
        config={"patch_size": 8, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2},
    )
    assert model.config.image_size == 32 and model.config.num_channels == 3
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert isinstance(model, nn.Module)

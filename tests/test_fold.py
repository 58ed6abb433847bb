"""BatchNorm folding of frozen teachers (kdforge.compress.fold): same outputs, fewer modules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdforge.compress.fold import fold_batchnorm, fold_frozen_teachers
from kdforge.models import FeatureTap, create


def _randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Eval-mode model with non-trivial BatchNorm statistics and affine parameters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.1)
                module.weight.copy_(torch.randn(n, generator=generator))
                module.bias.copy_(torch.randn(n, generator=generator) * 0.3)
    return model.eval().requires_grad_(False)


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize(
    "name", ["resnet20", "resnet8x4", "wrn_16_2", "vgg8", "mobilenetv2_half", "shufflenetv1", "shufflenetv2"]
)
def test_folding_keeps_the_outputs(name: str) -> None:
    torch.manual_seed(0)
    model = _randomised(create(name, num_classes=10))
    reference = copy.deepcopy(model)
    before = _batchnorms(model)
    images = torch.randn(4, 3, 32, 32)
    report = fold_batchnorm(model)
    assert report.error is None
    assert len(report.folded) > 0
    assert _batchnorms(model) == before - len(report.folded)
    expected, got = reference(images), model(images)
    scale = expected.abs().max()
    assert torch.allclose(got, expected, atol=1e-4 * float(scale), rtol=1e-4), (got - expected).abs().max()


def test_resnet_has_no_batchnorm_left() -> None:
    model = _randomised(create("resnet20"))
    report = fold_batchnorm(model)
    assert _batchnorms(model) == 0, report.skipped
    assert report.skipped == {}


def test_a_tapped_convolution_is_not_folded() -> None:
    model = _randomised(create("resnet8"))
    reference = copy.deepcopy(model)
    tap = FeatureTap(model, ["stage1.0.conv1"], detach=True)
    ref_tap = FeatureTap(reference, ["stage1.0.conv1"], detach=True)
    report = fold_batchnorm(model)
    assert report.skipped.get("stage1.0.bn1") == "a feature tap reads it"
    assert isinstance(model.stage1[0].bn1, nn.BatchNorm2d)
    images = torch.randn(2, 3, 32, 32)
    model(images)
    reference(images)
    assert torch.allclose(tap.features["stage1.0.conv1"], ref_tap.features["stage1.0.conv1"], atol=1e-4)


def test_train_mode_and_trainable_networks_are_left_alone() -> None:
    training = create("resnet8").train()
    assert all(why == "uses batch statistics" for why in fold_batchnorm(training).skipped.values())
    assert _batchnorms(training) > 0
    trainable = create("resnet8").eval()  # parameters still require gradients
    result = fold_frozen_teachers([trainable])
    assert result["folded"] == 0
    frozen = _randomised(create("resnet8"))
    shared = fold_frozen_teachers([frozen], trained=[next(frozen.parameters())])
    assert shared["folded"] == 0  # shares a parameter with a network that trains


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # not traceable by torch.fx
            return self.bn(self.conv(x))
        return self.conv(x)


def test_untraceable_model_is_reported_and_unchanged() -> None:
    model = _DataDependent().eval().requires_grad_(False)
    report = fold_batchnorm(model)
    assert report.error is not None and "could not be traced" in report.error
    assert isinstance(model.bn, nn.BatchNorm2d)


def test_conv_without_bias_and_bn_without_affine() -> None:
    model = nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5, affine=False), nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval().requires_grad_(False)
    reference = copy.deepcopy(model)
    assert fold_batchnorm(model).folded == ["1"]
    assert model[0].bias is not None and not model[0].bias.requires_grad
    x = torch.randn(2, 3, 9, 9)
    assert torch.allclose(model(x), reference(x), atol=1e-5)


def test_trainer_folds_frozen_teachers_and_trains_the_same(tmp_path) -> None:
    from kdforge.config import build_config
    from kdforge.core.checkpoint import read_model_file
    from kdforge.engine.trainer import Trainer

    def recipe(name: str, student: dict, **extra: object) -> object:
        data = {
            "name": name,
            "data": {"name": "digits", "augment": False, "train_subset": 200},
            "student": student,
            "train": {"epochs": 1, "batch_size": 50, "progress": "none", "scheduler": {"name": "constant"}},
            **extra,
        }
        return build_config(data)

    Trainer(recipe("teacher", {"name": "resnet8"}), tmp_path / "teacher").fit()
    teacher = {"checkpoint": str(tmp_path / "teacher/checkpoints/model_last.pt")}
    runs = {}
    for fold in (True, False):
        config = recipe(
            "kd",
            {"name": "mlp", "kwargs": {"hidden": [32]}},
            teachers=[teacher],
            method={"name": "kd", "temperature": 4},
        )
        config.train.fold_teacher_bn = fold
        out = tmp_path / f"kd-{fold}"
        runs[fold] = (Trainer(config, out).fit(), read_model_file(out / "checkpoints/model_last.pt")["state_dict"])
    folded, plain = runs[True], runs[False]
    assert folded[0]["teacher_bn_folding"]["folded"] == 9  # every BatchNorm of resnet8
    assert "teacher_bn_folding" not in plain[0]
    for key, value in plain[1].items():
        assert torch.allclose(folded[1][key], value, atol=1e-4), key

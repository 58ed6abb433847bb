"""FeatureTap: hooks by module or logical name on kdforge and user models."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from kdforge.core.errors import ConfigError
from kdforge.models import FeatureTap, create, module_names


class UserNet(nn.Module):
    """A model kdforge knows nothing about (no feature_points)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.extra = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.use_extra = False

    def forward(self, x):
        x = self.body(x).mean(dim=(2, 3))
        if self.use_extra:
            x = self.extra(x)
        return self.head(x)


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_tap_on_a_custom_sequential():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    assert module_names(model) == ["0", "1", "2", "3"]
    with FeatureTap(model, ["1", "2"]) as tap:
        output, features = tap(torch.randn(5, 1, 4, 4))
    assert output.shape == (5, 2)
    assert features["1"].shape == features["2"].shape == (5, 8)
    torch.testing.assert_close(features["2"], torch.relu(features["1"]))


def test_tap_on_a_custom_class_with_nested_names():
    model = UserNet()
    assert "body.0" in module_names(model)
    tap = FeatureTap(model, ["body.0", "head"])
    output = model(torch.randn(2, 1, 6, 6))
    assert tap.features["body.0"].shape == (2, 4, 6, 6)
    assert torch.equal(tap.features["head"], output)
    tap.remove()


def test_logical_names_and_aliases_of_one_module():
    model = create("mobilenetv2_half").eval()
    with FeatureTap(model, ["stage1", "stage1_preact", "stem.conv"]) as tap, torch.no_grad():
        _, features = tap(torch.randn(1, 3, 16, 16))
    assert set(features) == {"stage1", "stage1_preact", "stem.conv"}
    assert features["stage1"] is features["stage1_preact"]
    assert tap.module_for["stage1"] == "stage1"


def test_unknown_name_is_one_line_with_suggestion_and_hint():
    model = create("resnet20")
    with pytest.raises(ConfigError) as info:
        FeatureTap(model, ["stage4", "stage2_preac"])
    message = str(info.value)
    assert "\n" not in message
    assert "'stage4'" in message and "did you mean" in message
    assert "kdforge.models.module_names(model)" in message
    assert all_hooks(model) == 0  # nothing was registered

    with pytest.raises(ConfigError, match="did you mean 'body.0'"):
        FeatureTap(UserNet(), "bodyy.0")


def test_features_start_fresh_at_every_forward():
    model = UserNet()
    with FeatureTap(model, ["extra", "head"]) as tap:
        model.use_extra = True
        first_output, first = tap(torch.randn(2, 1, 4, 4))
        assert set(first) == {"extra", "head"}
        model.use_extra = False
        _, second = tap(torch.randn(2, 1, 4, 4))
        assert set(second) == {"head"}  # 'extra' did not run: no stale tensor
        assert set(first) == {"extra", "head"}  # earlier results are left untouched
        assert torch.equal(first["head"], first_output)


def test_hooks_removed_and_tensors_released():
    model = create("resnet8")
    baseline = all_hooks(model)
    with FeatureTap(model, ["stage3", "pool"]) as tap:
        assert all_hooks(model) == baseline + 3  # one pre-hook + two forward hooks
        with torch.no_grad():
            model(torch.randn(2, 3, 8, 8))
        ref = weakref.ref(tap.features["stage3"])
    assert all_hooks(model) == baseline
    assert tap.features == {} and not tap.active
    gc.collect()
    assert ref() is None
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
    assert tap.features == {}
    tap.remove()  # twice is fine
    with pytest.raises(RuntimeError):
        tap(torch.randn(1, 3, 8, 8))


def test_gradients_flow_through_taps_unless_detached():
    model = create("resnet8")
    with FeatureTap(model, ["stage2"]) as tap:
        logits, features = tap(torch.randn(2, 3, 8, 8))
        (features["stage2"].pow(2).mean() + logits.sum()).backward()
    assert model.stage1[0].conv1.weight.grad is not None

    with FeatureTap(model, ["stage2"], detach=True) as tap:
        _, features = tap(torch.randn(2, 3, 8, 8))
    assert not features["stage2"].requires_grad


def test_two_taps_on_one_model_are_independent():
    model = create("lenet", in_channels=1)
    first = FeatureTap(model, "stage1")
    with FeatureTap(model, ["stage2", "pool"]) as second:
        model(torch.randn(1, 1, 8, 8))
        assert list(first.features) == ["stage1"]
        assert list(second.features) == ["stage2", "pool"]
    model(torch.randn(1, 1, 8, 8))
    assert list(first.features) == ["stage1"]
    first.remove()
    assert all_hooks(model) == 0


def test_a_deep_copy_of_a_tapped_model_does_not_write_into_the_tap():
    model = create("resnet8")
    with FeatureTap(model, "pool") as tap:
        _, features = tap(torch.randn(2, 3, 8, 8))
        before = features["pool"].detach().clone()
        twin = copy.deepcopy(model)  # e.g. an EMA teacher made while the student is tapped
        twin(torch.randn(2, 3, 8, 8))
        assert tap.features is features
        assert torch.equal(tap.features["pool"].detach(), before)

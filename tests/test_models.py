"""Model zoo: published parameter counts, shapes for several input sizes, feature points,
`create` errors and profiling."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from kdforge.core.errors import ConfigError
from kdforge.models import (
    MODELS,
    FeatureTap,
    count_flops,
    count_macs,
    count_parameters,
    create,
    list_models,
    measure_latency,
    profile_model,
)
from kdforge.models.shufflenet import ShuffleV2Unit

ZOO = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19",
    "mobilenetv2", "mobilenetv2_half", "shufflenetv1", "shufflenetv2",
]  # fmt: skip
GENERIC = ["resnet", "wrn", "vgg"]
SMALL = ["mlp", "lenet"]

# Millions of parameters for 100 classes as printed in the KD literature
# (RepDistiller / CRD, DKD, ReviewKD tables).
PUBLISHED_PARAMS_M = {
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_40_2": 2.26,
    "wrn_40_1": 0.57,
    "wrn_16_2": 0.70,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet32": 0.47,
    "resnet20": 0.28,
    "vgg13": 9.46,
    "vgg8": 3.96,
    "mobilenetv2_half": 0.81,
    "shufflenetv1": 0.95,
    "shufflenetv2": 1.36,
}

# A representative subset for shape checks on several input sizes (one per family).
SUBSET = ["resnet20", "resnet8x4", "wrn_16_2", "vgg8", "mobilenetv2_half", "shufflenetv1",
          "shufflenetv2", "lenet", "mlp"]  # fmt: skip


def build(name: str, num_classes: int = 10, in_channels: int = 3, size: int = 32, **kwargs):
    torch.manual_seed(0)
    input_size = (size, size) if name == "mlp" else None
    return create(name, num_classes=num_classes, in_channels=in_channels, input_size=input_size, **kwargs)


def test_every_model_is_registered_with_a_description():
    names = list_models()
    for name in ZOO + GENERIC + SMALL:
        assert name in names
        assert MODELS.describe(name), f"{name} has no docstring"


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_parameter_count_matches_published(name):
    measured = count_parameters(build(name, num_classes=100)) / 1e6
    published = PUBLISHED_PARAMS_M[name]
    assert abs(measured - published) <= 0.01 * published, f"{name}: {measured:.4f}M vs {published}M"


def test_generic_factories_reproduce_named_variants():
    assert count_parameters(build("resnet", depth=32, width_multiplier=4)) == count_parameters(build("resnet32x4"))
    assert count_parameters(build("resnet", depth=56)) == count_parameters(build("resnet56"))
    assert count_parameters(build("wrn", depth=40, widen_factor=2)) == count_parameters(build("wrn_40_2"))
    assert count_parameters(build("vgg", depth=13)) == count_parameters(build("vgg13"))


@pytest.mark.parametrize("name", SUBSET)
@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28), (1, 8)])
def test_output_shape(name, channels, size):
    model = build(name, num_classes=7, in_channels=channels, size=size)
    logits = model(torch.randn(2, channels, size, size))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ZOO + SMALL)
def test_feature_points_resolve_with_consistent_shapes(name):
    """Every feature point resolves; stage/preact/pool shapes agree with the model's attributes;
    a stage's output is the ReLU of its pre-activation (except MobileNetV2's linear bottlenecks)."""
    model = build(name, num_classes=5, in_channels=1, size=8)
    points = model.feature_points
    stages = [key for key in points if re.fullmatch(r"stage\d+", key)]
    assert stages == [f"stage{i}" for i in range(1, len(stages) + 1)]
    assert len(stages) == len(model.stage_channels)
    assert {"pool", "logits"} <= set(points)
    with FeatureTap(model, list(points)) as tap, torch.no_grad():
        logits, features = tap(torch.randn(2, 1, 8, 8))
    assert set(features) == set(points)
    for index, stage in enumerate(stages):
        post, preact = features[stage], features[f"{stage}_preact"]
        assert post.shape[:2] == (2, model.stage_channels[index]), stage
        assert preact.shape == post.shape
        if not name.startswith("mobilenetv2"):
            assert (preact < 0).any(), f"{stage}_preact has no negative values"
            torch.testing.assert_close(torch.relu(preact), post)
    assert features["pool"].shape == (2, model.feature_dim)
    assert torch.equal(features["logits"], logits)


def test_mobilenetv2_stages_are_linear_bottlenecks():
    model = build("mobilenetv2_half")
    assert model.feature_points["stage1_preact"] == model.feature_points["stage1"]
    assert model.stage_channels == [12, 16, 48, 160]


def test_wrn_residual_points_are_the_stream_before_the_stage_bn():
    model = build("wrn_16_2").eval()
    names = ["stage2", "stage2_preact", "stage2_residual"]
    with FeatureTap(model, names) as tap, torch.no_grad():
        _, features = tap(torch.randn(2, 3, 16, 16))
    assert features["stage2_residual"].shape == features["stage2"].shape == (2, 64, 8, 8)
    with torch.no_grad():
        recomputed = model.stage2.bn(features["stage2_residual"])
    torch.testing.assert_close(recomputed, features["stage2_preact"])


def test_resnet20_stage_shapes_on_32x32():
    model = build("resnet20")
    assert model.stage_channels == [16, 32, 64]
    names = ["stem", "stage1", "stage2", "stage3", "stage3_preact", "pool", "logits"]
    with FeatureTap(model, names) as tap, torch.no_grad():
        _, features = tap(torch.randn(2, 3, 32, 32))
    shapes = {k: tuple(v.shape) for k, v in features.items()}
    assert shapes == {
        "stem": (2, 16, 32, 32),
        "stage1": (2, 16, 32, 32),
        "stage2": (2, 32, 16, 16),
        "stage3": (2, 64, 8, 8),
        "stage3_preact": (2, 64, 8, 8),
        "pool": (2, 64),
        "logits": (2, 10),
    }


def test_resnet8x4_stage_shapes_on_32x32():
    model = build("resnet8x4")
    with FeatureTap(model, ["stem", "stage1", "stage2", "stage3", "pool"]) as tap, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        shapes = [tuple(v.shape) for v in tap.features.values()]
    assert shapes == [(2, 32, 32, 32), (2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8), (2, 256)]


def test_vgg_pools_before_last_group_only_for_large_inputs():
    model = build("vgg8").eval()
    for size, last in ((32, 4), (64, 4), (8, 1)):
        with FeatureTap(model, "stage4") as tap, torch.no_grad():
            model(torch.randn(1, 3, size, size))
            assert tap.features["stage4"].shape[-1] == last


def test_shufflenetv2_unit_matches_reference_order():
    """Reference: shuffle(cat(x1, relu(branch(x2)))); ours applies the ReLU after the shuffle."""
    torch.manual_seed(0)
    unit = ShuffleV2Unit(8).eval()
    x = torch.rand(2, 8, 4, 4)  # unit inputs are non-negative (outputs of ReLUs)
    kept, transformed = x[:, :4], x[:, 4:]
    reference = unit.shuffle(torch.cat([kept, torch.relu(unit.branch(transformed))], 1))
    torch.testing.assert_close(unit(x), reference)


def test_wrn_dropout_and_train_step():
    model = build("wrn_16_1", dropout=0.3)
    assert any(isinstance(m, nn.Dropout) for m in model.modules())
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_create_unknown_model_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'resnet20'"):
        create("resnt20")


def test_create_unknown_argument_names_model_and_accepted_arguments():
    with pytest.raises(ConfigError) as info:
        create("resnet", widht_multiplier=2)
    message = str(info.value)
    assert "'resnet'" in message and "widht_multiplier" in message
    assert "did you mean 'width_multiplier'" in message
    assert "num_classes" in message and "depth" in message
    assert "\n" not in message


def test_create_rejects_bad_values():
    with pytest.raises(ConfigError, match="input_size"):
        create("mlp")
    with pytest.raises(ConfigError, match="depth"):
        create("resnet", depth=21)
    with pytest.raises(ConfigError, match="depth"):
        create("wrn", depth=15)
    with pytest.raises(ConfigError, match="num_classes"):
        create("resnet20", num_classes=0)
    with pytest.raises(ConfigError, match="groups"):
        create("shufflenetv1", groups=8)
    with pytest.raises(ConfigError, match="width_multiplier"):
        create("shufflenetv2", width_multiplier=0.7)


def test_mlp_options_and_input_check():
    model = create("mlp", in_channels=1, input_size=[8, 8], hidden=[32, 16])
    assert model.stage_channels == [32, 16] and model.feature_dim == 16
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(ConfigError, match="input_size"):
        model(torch.randn(3, 1, 28, 28))
    linear = create("mlp", input_size=4, in_channels=1, hidden=[])
    assert linear(torch.randn(2, 1, 4, 4)).shape == (2, 10)


def test_lenet_width():
    narrow, wide = create("lenet", in_channels=1), create("lenet", in_channels=1, width=2)
    assert wide.stage_channels == [12, 32]
    assert count_parameters(wide) > count_parameters(narrow)


def test_count_parameters_trainable_only():
    model = build("resnet8")
    total = count_parameters(model)
    model.classifier.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - 64 * 10 - 10


def test_resnet20_flops_match_published_macs():
    model = build("resnet20")
    model.train()
    macs = count_macs(model, (3, 32, 32))
    assert abs(macs / 1e6 - 40.8) < 0.5  # published: ~41M MACs (40.81M)
    assert count_flops(model, (3, 32, 32)) == 2 * macs
    assert model.training  # restored


def test_latency_and_profile():
    model = build("resnet8")
    assert measure_latency(model, (3, 16, 16), batch_size=2, warmup=1, repeats=2) > 0
    threads = torch.get_num_threads()
    report = profile_model(model, (3, 16, 16), batch_sizes=(1, 4), warmup=1, repeats=2, num_threads=1)
    assert torch.get_num_threads() == threads and report["threads"] == 1
    assert report["parameters"] == count_parameters(model) > 0
    assert report["flops"] > 0 and report["macs"] == report["flops"] // 2
    assert [row["batch_size"] for row in report["latency"]] == [1, 4]
    assert all(row["seconds"] > 0 and row["samples_per_second"] > 0 for row in report["latency"])
    with pytest.raises(ConfigError, match="input_shape"):
        count_flops(model, (0, 32, 32))

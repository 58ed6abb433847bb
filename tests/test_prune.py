"""Pruning: exact magnitude sparsity, structured filter pruning that physically shrinks the zoo's
networks (equal to the channel-masked original), model files of pruned networks, prune -> fine-tune."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kdforge.compress import (
    channel_groups,
    keep_masks,
    magnitude_prune,
    masked_copy,
    plan_filter_pruning,
    prune_filters,
    remove_channels,
    sparsity_of,
)
from kdforge.compress.arch import load_model_file
from kdforge.config import build_config
from kdforge.core.checkpoint import atomic_save, model_record
from kdforge.core.errors import ConfigError
from kdforge.engine.pipeline import stage_recipes
from kdforge.engine.trainer import Trainer
from kdforge.models import count_flops, count_parameters, create

SHAPE = (3, 16, 16)
ROOT = Path(__file__).resolve().parents[1]


def randomised(name: str) -> nn.Module:
    """A zoo model whose BN layers hold non-trivial statistics and affine parameters, in eval mode."""
    model = create(name, num_classes=10, input_size=SHAPE[1:])
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(1 + 0.2 * torch.randn(module.num_features, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(module.num_features, generator=generator))
    return model.eval()


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2", "vgg8", "mobilenetv2"])
def test_structured_pruning_physically_shrinks_and_equals_the_masked_original(name):
    model = randomised(name)
    params, flops = count_parameters(model), count_flops(model, SHAPE)
    plan = plan_filter_pruning(model, SHAPE, amount=0.5, norm=1)
    reference = masked_copy(model, plan)  # the same network with the pruned channels zeroed
    shapes = remove_channels(model, plan)
    assert shapes and count_parameters(model) < 0.5 * params and count_flops(model, SHAPE) < 0.5 * flops
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, randomised(name)(x), atol=1e-3)  # pruning did change the function
    # residual streams are pruned too (through the additions): every group lost half its channels
    for group, kept in plan.pruned():
        assert len(kept) == group.size - round(0.5 * group.size)
    assert any(group.coupled for group, _ in plan.pruned()) == (name != "vgg8")


def test_filters_are_ranked_by_their_norm():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.Flatten(), nn.Linear(2 * 9, 3)
    )
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([3.0, -0.5, 2.0, 1.0]).view(4, 1, 1, 1))
    plan = plan_filter_pruning(model, (1, 3, 3), amount=0.5, norm=1)
    kept = [k for g, k in plan.pruned() if g.producers == ["0"]]
    assert kept[0].tolist() == [0, 2]  # |3| and |2| survive, |-0.5| and |1| go
    # the conv before a flatten of a spatial map is left alone; output channels are never pruned
    frozen = [g for g in plan.groups if g.producers == ["2"]]
    assert frozen and not frozen[0].prunable


def test_residual_false_and_skip_leave_groups_whole():
    model = randomised("resnet8")
    groups = channel_groups(model, SHAPE)
    coupled = [g for g in groups if g.prunable and g.coupled]
    assert coupled and all(g.size in (16, 32, 64) for g in coupled)
    plan = plan_filter_pruning(model, SHAPE, 0.5, residual=False)
    assert plan.pruned() and not any(g.coupled for g, _ in plan.pruned())
    plan = plan_filter_pruning(model, SHAPE, 0.5, skip=["stage1", "stage2", "stage3", "stem"])
    assert not plan.pruned()
    with pytest.raises(ConfigError, match="no prunable"):
        prune_filters(model, SHAPE, 0.5, skip=["stage", "stem"])


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2", "vgg8", "mobilenetv2"])
def test_pruned_model_file_reloads_through_the_model_file_path(tmp_path, name):
    model = randomised(name)
    shapes = prune_filters(model, SHAPE, amount=0.25, norm=2)
    record = model_record(model, name=name, kwargs={}, num_classes=10, in_channels=3, input_size=SHAPE[1:])
    record["model"]["architecture"] = [{"op": "resize", "modules": shapes}]
    atomic_save(record, tmp_path / "pruned.pt")
    loaded, _ = load_model_file(tmp_path / "pruned.pt")
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert count_parameters(loaded) == count_parameters(model)
    if hasattr(model, "feature_dim"):
        assert loaded.classifier.in_features == model.feature_dim


def test_unstructured_magnitude_pruning_hits_the_exact_sparsity():
    model = create("resnet8", num_classes=10)
    masks = magnitude_prune(model, 0.7)
    for name, module in model.named_modules():
        if name in masks:
            n = module.weight.numel()
            assert int((module.weight == 0).sum()) == round(0.7 * n)
    report = sparsity_of(model)
    assert abs(report["overall"] - 0.7) < 1e-3
    # the largest magnitudes survive
    layer = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        layer[0].weight.copy_(torch.tensor([[0.1, -4.0, 0.3, 2.0], [-0.2, 0.5, -3.0, 0.05]]))
    magnitude_prune(layer, 0.5)
    assert layer[0].weight.tolist() == [[0.0, -4.0, 0.0, 2.0], [0.0, 0.5, -3.0, 0.0]]
    model = create("resnet8", num_classes=10)
    magnitude_prune(model, 0.5, scope="global")
    report = sparsity_of(model)
    assert report["zeros"] == round(0.5 * report["total"])


def test_masks_hold_through_sgd_with_momentum_and_weight_decay():
    model = create("resnet8", num_classes=10)
    keep_masks(model, magnitude_prune(model, 0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(3):
        loss = model(torch.randn(8, *SHAPE)).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert abs(sparsity_of(model)["overall"] - 0.5) < 1e-3


def test_prune_at_start_of_a_kd_fine_tune_run_and_reuse_as_teacher(tmp_path):
    """Teacher run -> prune at the start of a fine-tune distilled from the unpruned model ->
    the pruned model file evaluates, exports its shapes and serves as a teacher checkpoint."""
    base = {
        "data": {"name": "digits", "augment": False, "train_subset": 100},
        "train": {"epochs": 1, "batch_size": 50, "progress": "none"},
    }
    Trainer(build_config({**base, "student": {"name": "resnet8"}, "method": {"name": "ce"}}), tmp_path / "dense").fit()
    dense = str(tmp_path / "dense" / "checkpoints" / "model_last.pt")
    tuned = build_config(
        {
            **base,
            "student": {"checkpoint": dense, "prune": {"amount": 0.5, "norm": 1}},
            "teachers": [{"checkpoint": dense}],
            "method": {"name": "kd", "temperature": 4},
        }
    )
    summary = Trainer(tuned, tmp_path / "pruned").fit()
    pruned_file = tmp_path / "pruned" / "checkpoints" / "model_last.pt"
    model, record = load_model_file(pruned_file)
    assert record["model"]["architecture"][0]["op"] == "resize"
    compression = summary["compression"]
    assert compression["student"]["parameters"] == count_parameters(model)
    assert compression["compression_rate"] > 2.5 and compression["computation_rate"] > 2.5
    assert json.loads((tmp_path / "pruned" / "summary.json").read_text())["compression"]["text"]

    from kdforge.cli import main

    assert main(["eval", str(pruned_file), "--json"]) == 0
    again = build_config(
        {
            **base,
            "student": {"name": "resnet8"},
            "teachers": [{"checkpoint": str(pruned_file)}],
            "method": {"name": "kd"},
        }
    )
    student = Trainer(again, tmp_path / "from_pruned").fit()
    assert student["compression"]["compression_rate"] < 1  # the dense student is bigger than its pruned teacher


def test_iterative_prune_kd_recipe_validates(tmp_path):
    from kdforge.config import read_yaml
    from kdforge.engine.pipeline import _substitute

    recipe_path = ROOT / "configs/recipes/prune_kd_cifar10.yaml"
    stages = stage_recipes(read_yaml(recipe_path), recipe_path.parent)
    dirs = {}
    for name, stage in stages.items():
        config = build_config(_substitute(stage, dirs, name))
        dirs[name] = tmp_path / name
        assert config.student.prune is not None and config.student.prune.amount == 0.3
        assert config.method.name == "kd"
        assert Path(config.teachers[0].checkpoint).name == "cifar10_resnet20.pt"  # the unpruned model
        assert Path(config.teachers[0].checkpoint).is_file()
    assert len(stages) == 3


def test_filters_zeroed_by_group_soft_thresholding_are_removed_exactly():
    from kdforge.compress import group_soft_threshold, remove_zero_filters

    model = randomised("vgg8")
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                norms = module.weight.flatten(1).norm(dim=1)
                module.weight.copy_(group_soft_threshold(module.weight, float(norms.median())))
                if module.bias is not None:
                    module.bias.mul_((norms > norms.median()).float())
                bn = dict(model.named_modules())[name.replace("conv", "bn")]
                bn.weight.mul_((norms > norms.median()).float())  # a dead channel's BN is zero too
                bn.bias.mul_((norms > norms.median()).float())
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        expected = model(x)
    params = count_parameters(model)
    remove_zero_filters(model, SHAPE)
    assert count_parameters(model) < 0.4 * params
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)

"""LMA (Xu et al., AAAI 2020): the multi-segment activation, the ReLU swap and the recipe switch."""

import pytest
import torch
from torch import nn

from kdforge.compress import LMA, lma_student
from kdforge.compress.arch import load_model_file
from kdforge.config import build_config
from kdforge.core.errors import ConfigError
from kdforge.engine.trainer import Trainer
from kdforge.models import count_parameters, create


def centred(n: int = 4000) -> torch.Tensor:
    x = torch.randn(n)
    return x - x.mean()


def test_equals_relu_at_initialisation_with_zero_mean():
    lma = LMA(k=8)
    x = centred()
    assert torch.equal(lma(x), torch.relu(x))  # training mode: batch statistics, mean exactly 0
    lma.eval()
    fresh = LMA(k=8).eval()  # running statistics start at 0: the kink sits at 0 as well
    assert torch.equal(fresh(x), torch.relu(x))
    assert lma.slopes.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and lma.biases.abs().sum() == 0
    assert sum(p.numel() for p in lma.parameters()) == 16  # 2k per layer, shared by all units


def test_segment_indices_follow_the_formula_and_clamp():
    lma = LMA(k=4)
    mu, sigma = torch.tensor(1.0), torch.tensor(2.0)  # cut points -5, -2, 1, 4, 7 (width 6 sigma / k = 3)
    x = torch.tensor([-100.0, -5.1, -5.0, -2.5, -2.0, 0.9, 1.0, 4.0, 6.9, 7.0, 100.0])
    index = lma.segment_index(x, mu, sigma)
    assert index.tolist() == [0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 3]
    assert index.dtype == torch.int64


def test_output_is_the_segment_line_and_gradients_reach_slopes_and_biases():
    lma = LMA(k=4)
    with torch.no_grad():
        lma.slope_delta.copy_(torch.tensor([0.1, 0.2, -0.5, 0.5]))
        lma.bias_delta.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = torch.tensor([-3.0, -1.0, 0.5, 3.0], requires_grad=True)
    x_stats = x.detach()
    mu, sigma = x_stats.mean(), x_stats.std(unbiased=False)
    index = lma.segment_index(x_stats, mu, sigma)
    slopes = torch.tensor([0.1, 0.2, 0.5, 1.5])
    expected = slopes[index] * x_stats + torch.tensor([1.0, 2.0, 3.0, 4.0])[index]
    out = lma(x)
    assert torch.allclose(out, expected)
    out.sum().backward()
    assert lma.slope_delta.grad is not None and lma.bias_delta.grad.sum() == 4  # one sample per segment here
    assert torch.allclose(x.grad, slopes[index])  # statistics carry no gradient


def test_fast_lookup_matches_advanced_indexing_values_and_gradients():
    """The custom backward (index_add_) gives the gradients of the plain indexing form."""
    torch.manual_seed(0)
    lma = LMA(k=8)
    with torch.no_grad():
        lma.slope_delta.normal_(0, 0.3)
        lma.bias_delta.normal_(0, 0.3)
    x = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last).requires_grad_(True)
    weights = torch.randn(4, 3, 5, 5)
    out = lma(x)
    grads = torch.autograd.grad((out * weights).sum(), (x, lma.slope_delta, lma.bias_delta))
    mu, sigma = torch.std_mean(x.detach(), unbiased=False)[::-1]
    index = lma.segment_index(x.detach(), mu, sigma)
    x2 = x.detach().clone().requires_grad_(True)
    slope_delta = lma.slope_delta.detach().clone().requires_grad_(True)
    bias_delta = lma.bias_delta.detach().clone().requires_grad_(True)
    expected = (lma.base_slope + slope_delta)[index] * x2 + bias_delta[index]
    expected_grads = torch.autograd.grad((expected * weights).sum(), (x2, slope_delta, bias_delta))
    assert torch.allclose(out, expected, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-5)
    assert len(set(index.flatten().tolist())) > 4  # several segments are exercised


def test_running_statistics_update_in_training_only_and_eval_uses_them():
    lma = LMA(k=8, momentum=0.99)
    batch = torch.randn(64, 3, 4, 4) * 2 + 1
    lma(batch)
    assert torch.isclose(lma.running_mean, 0.01 * batch.mean())
    assert torch.isclose(lma.running_std, 0.01 * batch.std(unbiased=False))
    lma.eval()
    before = (lma.running_mean.clone(), lma.running_std.clone())
    y = lma(torch.randn(10) * 5)
    assert torch.equal(lma.running_mean, before[0]) and torch.equal(lma.running_std, before[1])
    # in eval the cut points come from the running pair, not from the batch
    x = torch.linspace(-3, 3, 50)
    index = lma.segment_index(x, lma.running_mean, lma.running_std)
    assert torch.equal(lma(x), lma.slopes[index] * x + lma.biases[index])
    assert y.shape == (10,)


def test_lma_student_swaps_every_relu_of_any_model():
    model = create("resnet8", num_classes=10)
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    before = count_parameters(model)
    lma_student(model, k=8)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert sum(isinstance(m, LMA) for m in model.modules()) == relus
    assert count_parameters(model) == before + 16 * relus
    custom = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 2))
    lma_student(custom, k=4)
    assert [type(m).__name__ for m in custom.modules()].count("LMA") == 2
    assert custom(torch.randn(3, 4)).shape == (3, 2)
    with pytest.raises(ConfigError, match="no nn.ReLU"):
        lma_student(nn.Linear(3, 3))


def test_recipe_switch_trains_an_lma_student_and_its_model_file_reloads(tmp_path):
    config = build_config(
        {
            "data": {"name": "digits", "augment": False, "train_subset": 100},
            "student": {"name": "resnet8", "lma": {"k": 8}},
            "method": {"name": "ce"},
            "train": {"epochs": 1, "batch_size": 50, "progress": "none"},
        }
    )
    Trainer(config, tmp_path / "run").fit()
    model, record = load_model_file(tmp_path / "run" / "checkpoints" / "model_last.pt")
    assert record["model"]["architecture"] == [{"op": "lma", "k": 8, "momentum": 0.99}]
    layers = [m for m in model.modules() if isinstance(m, LMA)]
    assert layers and all(float(m.running_std) > 0 for m in layers)  # statistics were learnt and saved


def test_lma_student_exports_to_torchscript(tmp_path):
    """The fast autograd path is bypassed under tracing, so the traced TorchScript file saves."""
    from kdforge.compress.export import export_torchscript

    model = lma_student(create("resnet8", num_classes=10, input_size=(32, 32)), k=8)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    model.eval()
    path = export_torchscript(model, tmp_path / "lma.ts", (3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(torch.jit.load(str(path))(x), model(x), atol=1e-5)

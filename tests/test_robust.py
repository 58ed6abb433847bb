"""Attacks and robust evaluation (kdforge.robust): sanity checks that a broken attack would fail."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdforge.data import load_dataset
from kdforge.robust import PixelModel, fgsm, parse_fraction, pgd, robust_evaluate


# ----------------------------------------------------------------------------- a trained model
@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits):
    """An MLP trained for a second on normalized digits; returned with its pixel-space view."""
    torch.manual_seed(0)
    info = digits.info
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    mean, std = info.mean[0], info.std[0]
    x = (digits.train.images.float() / 255 - mean) / std
    y = digits.train.labels
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        for start in range(0, len(y), 128):
            loss = F.cross_entropy(model(x[start : start + 128]), y[start : start + 128])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    pixel = PixelModel(model, info.mean, info.std)
    test_x = digits.test.images[:300].float() / 255
    test_y = digits.test.labels[:300]
    return model, pixel, test_x, test_y


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


# ----------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_perturbations_stay_in_the_ball_and_the_pixel_range(trained, norm):
    _, pixel, x, y = trained
    eps = 0.1 if norm == "linf" else 1.0
    for x_adv in (
        pgd(pixel, x, y, eps, steps=5, step_size=eps / 2, norm=norm),
        pgd(pixel, x, y, eps, steps=3, norm=norm, restarts=2),
        fgsm(pixel, x, y, eps, norm=norm),
    ):
        delta = (x_adv - x).flatten(1)
        size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
        assert float(size.max()) <= eps + 1e-5
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
        assert not x_adv.requires_grad


def test_parse_fraction():
    assert parse_fraction("8/255") == pytest.approx(8 / 255)
    assert parse_fraction("0.3") == 0.3 and parse_fraction(2) == 2.0
    with pytest.raises(ValueError):
        parse_fraction("eight")


# ----------------------------------------------------------------------------- strength ordering
def test_robust_accuracy_is_at_most_clean_and_pgd_beats_fgsm(trained):
    _, pixel, x, y = trained
    clean = accuracy(pixel, x, y)
    assert clean > 0.9
    eps = 0.1
    fgsm_acc = accuracy(pixel, fgsm(pixel, x, y, eps), y)
    pgd_acc = accuracy(pixel, pgd(pixel, x, y, eps, steps=20, step_size=eps / 8), y)
    assert pgd_acc <= clean and fgsm_acc <= clean
    assert pgd_acc <= fgsm_acc
    assert pgd_acc < clean - 0.1  # the attack really bites


def test_accuracy_falls_as_epsilon_grows(trained):
    _, pixel, x, y = trained
    accs = []
    for eps in (0.0, 0.03, 0.06, 0.1, 0.2):
        torch.manual_seed(1)
        accs.append(accuracy(pixel, pgd(pixel, x, y, eps, steps=10), y))
    assert accs[0] == accuracy(pixel, x, y)
    for lower, higher in zip(accs, accs[1:]):
        assert higher <= lower + 1 / len(y)  # monotone up to one sample of PGD noise
    assert accs[-1] < accs[0] - 0.3


def test_restarts_keep_the_per_sample_worst(trained):
    _, pixel, x, y = trained
    torch.manual_seed(3)
    single = pgd(pixel, x, y, 0.05, steps=3)
    torch.manual_seed(3)  # the first restart repeats the single run exactly
    several = pgd(pixel, x, y, 0.05, steps=3, restarts=4)
    with torch.no_grad():
        l1, l4 = pixel(single), pixel(several)
    wrong1, wrong4 = l1.argmax(-1) != y, l4.argmax(-1) != y
    assert bool((wrong4 | ~wrong1).all())  # misclassified once, misclassified still
    same = wrong1 == wrong4
    ce1, ce4 = F.cross_entropy(l1, y, reduction="none"), F.cross_entropy(l4, y, reduction="none")
    assert bool((ce4[same] >= ce1[same] - 1e-5).all())


# ----------------------------------------------------------------------------- closed form
def linear_pixel_model():
    """A 2-class linear model on 3 x 2 x 2 inputs, normalizing with per-channel statistics inside."""
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    return linear, PixelModel(linear, mean, std), torch.tensor(std).repeat_interleave(4)


def test_fgsm_matches_the_closed_form_worst_case_on_a_linear_model():
    linear, pixel, std = linear_pixel_model()
    torch.manual_seed(1)
    x = 0.3 + 0.4 * torch.rand(16, 3, 2, 2)  # away from the box edges: no clipping
    y = torch.randint(0, 2, (16,))
    eps = 0.1
    weight = linear[1].weight.detach() / std  # the weights seen from pixel space
    other = 1 - y
    direction = weight[y] - weight[other]  # margin m(x) = direction . x + const
    margin = lambda inputs: (lambda z: z[torch.arange(16), y] - z[torch.arange(16), other])(pixel(inputs))  # noqa: E731
    with torch.no_grad():
        m0 = margin(x)
        # L-inf: the worst case lowers the margin by eps * ||direction||_1 at delta = -eps sign(direction)
        x_adv = fgsm(pixel, x, y, eps)
        assert torch.allclose((x_adv - x).flatten(1), -eps * direction.sign(), atol=1e-6)
        assert torch.allclose(margin(x_adv), m0 - eps * direction.abs().sum(1), atol=1e-4)
        # PGD reaches the same corner
        x_pgd = pgd(pixel, x, y, eps, steps=10, step_size=eps / 4)
        assert torch.allclose(margin(x_pgd), m0 - eps * direction.abs().sum(1), atol=1e-4)
        # L2: the worst case lowers it by eps * ||direction||_2
        x_l2 = fgsm(pixel, x, y, 0.05, norm="l2")
        assert torch.allclose(margin(x_l2), m0 - 0.05 * direction.norm(dim=1), atol=1e-4)


# ----------------------------------------------------------------------------- side effects
def test_attacks_leave_mode_flags_and_gradients_alone():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 4, 3)
    )
    model[0].bias.requires_grad_(False)
    model[4].weight.grad = torch.ones_like(model[4].weight)
    pixel = PixelModel(model, (0.5,), (0.25,))
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    for training in (True, False):
        model.train(training)
        pgd(pixel, x, y, 0.1, steps=2, restarts=2)
        fgsm(pixel, x, y, 0.1)
        assert all(m.training == training for m in model.modules())
    assert model[0].weight.grad is None and model[0].bias.grad is None
    assert torch.equal(model[4].weight.grad, torch.ones_like(model[4].weight))  # untouched, not accumulated
    assert model[0].weight.requires_grad and not model[0].bias.requires_grad
    assert not x.requires_grad


def test_attacks_work_under_no_grad():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0])
    with torch.no_grad():
        x_adv = pgd(model, x, y, 0.1, steps=2)
    assert not torch.equal(x_adv, x)


# ----------------------------------------------------------------------------- evaluation
def test_robust_evaluate(trained, digits):
    model, _, _, _ = trained
    model.train()
    before = torch.get_rng_state()
    result = robust_evaluate(
        model, digits.test, digits.info.mean, digits.info.std, attack="pgd", eps=0.1, steps=5, limit=200, batch_size=64
    )
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left alone
    assert model.training  # mode restored
    assert result["images"] == 200
    assert 90 <= result["clean_top1"] <= 100
    assert result["robust_top1"] <= result["clean_top1"] - 10
    again = robust_evaluate(
        model, digits.test, digits.info.mean, digits.info.std, attack="pgd", eps=0.1, steps=5, limit=200, batch_size=64
    )
    assert again == result  # seeded: reproducible
    fast = robust_evaluate(model, digits.test, digits.info.mean, digits.info.std, attack="fgsm", eps=0.1, limit=200)
    assert result["robust_top1"] <= fast["robust_top1"] <= fast["clean_top1"]
    zero = robust_evaluate(model, digits.test, digits.info.mean, digits.info.std, eps=0.0, limit=200)
    assert zero["robust_top1"] == zero["clean_top1"] == result["clean_top1"]
    model.eval()


# ----------------------------------------------------------------------------- CLI
def test_cli_eval_with_attack(tmp_path, capsys):
    from kdforge.cli import main
    from kdforge.config import build_config
    from kdforge.engine.trainer import Trainer

    config = build_config(
        {
            "name": "tiny",
            "data": {"name": "digits", "augment": False, "train_subset": 300},
            "student": {"name": "mlp", "kwargs": {"hidden": [32]}},
            "method": {"name": "ce"},
            "train": {
                "epochs": 3,
                "batch_size": 32,
                "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                "progress": "none",
            },
        }
    )
    Trainer(config, tmp_path / "run").fit()
    checkpoint = str(tmp_path / "run" / "checkpoints" / "model_last.pt")
    capsys.readouterr()
    assert (
        main(["eval", checkpoint, "--attack", "pgd", "--eps", "8/255", "--steps", "5", "--limit", "100", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 100
    robust = result["robust"]
    assert robust["images"] == 100 and robust["attack"]["eps"] == pytest.approx(8 / 255)
    assert robust["attack"]["steps"] == 5 and robust["attack"]["step_size"] == pytest.approx(2.5 * 8 / 255 / 5)
    assert robust["clean_top1"] == pytest.approx(result["top1"], abs=1.0)
    assert robust["robust_top1"] <= robust["clean_top1"]
    assert main(["eval", checkpoint, "--attack", "fgsm", "--eps", "0.1", "--limit", "50"]) == 0
    out = capsys.readouterr().out
    assert "FGSM (linf, eps 0.1)" in out and "robust top-1" in out
    with pytest.raises(SystemExit):
        main(["eval", checkpoint, "--attack", "pgd", "--eps", "eight"])

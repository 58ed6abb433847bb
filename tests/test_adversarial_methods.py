"""adv_ce (Madry / TRADES), ard, fast_ard and robust_prune: losses pinned, attack wiring, mechanics, runs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdforge.methods.adversarial as adversarial
from kdforge.config import build_config
from kdforge.core.checkpoint import read_model_file
from kdforge.data.batch import Batch
from kdforge.engine.trainer import Trainer
from kdforge.methods import METHODS, Step
from kdforge.methods.robust_prune import compression_report

MEAN, STD = (0.3,), (0.4,)


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))


def make_batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 1, 4, 4, generator=g)
    image = (pixels - MEAN[0]) / STD[0]
    return Batch({"image": image}, torch.randint(0, 5, (n,), generator=g), torch.arange(n)), pixels


class Recorder(nn.Module):
    """Wraps a network and records every input it sees."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)


def independent_kl(student_logits, teacher_logits, T):
    """sum_c p_t (log p_t - log p_s) at temperature T, one value per sample (no library code)."""
    p_t = torch.exp(teacher_logits / T) / torch.exp(teacher_logits / T).sum(-1, keepdim=True)
    p_s = torch.exp(student_logits / T) / torch.exp(student_logits / T).sum(-1, keepdim=True)
    return (p_t * (torch.log(p_t) - torch.log(p_s))).sum(-1)


@pytest.fixture
def spy_pgd(monkeypatch):
    """Replace the training attack by a recorder that returns x + 0.02 (clipped): the losses can
    then be pinned and the attack's arguments inspected."""
    calls = []

    def fake(model, x, y, eps, **kwargs):
        calls.append({"model": model, "x": x.detach().clone(), "y": y, "eps": eps, **kwargs})
        return (x + 0.02).clamp(0, 1).detach()

    monkeypatch.setattr(adversarial, "pgd", fake)
    return calls


# ----------------------------------------------------------------------------- ARD
@pytest.mark.parametrize("reduction", ["elementmean", "batchmean"])
def test_ard_loss_pinned_and_attack_wiring(spy_pgd, reduction):
    student, teacher = tiny_net(0), Recorder(tiny_net(1))
    ard = METHODS.get("ard")(
        student,
        [teacher],
        {"alpha": 0.7, "temperature": 4, "reduction": reduction, "eps": "8/255", "steps": 3},
        normalization=(MEAN, STD),
    )
    ard.train()
    batch, pixels = make_batch()
    out = ard(batch, Step())
    # the attack: the student (seen from pixel space) on the clean pixels, the labels, CE (default loss)
    (call,) = spy_pgd
    assert torch.allclose(call["x"], pixels, atol=1e-6)
    assert torch.equal(call["y"], batch.targets) and call["loss_fn"] is None
    assert call["eps"] == pytest.approx(8 / 255) and call["steps"] == 3 and call["step_size"] == pytest.approx(2 / 255)
    probe = torch.rand(2, 1, 4, 4)
    assert torch.allclose(call["model"](probe), student((probe - MEAN[0]) / STD[0]))
    # the teacher saw the clean (normalized) batch only
    assert len(teacher.seen) == 1 and torch.allclose(teacher.seen[0], batch.image)
    # the loss against an independent formula
    x_adv = (pixels + 0.02).clamp(0, 1)
    with torch.no_grad():
        s_adv = student((x_adv - MEAN[0]) / STD[0])
        t_clean = teacher.net(batch.image)
        kl = independent_kl(s_adv, t_clean, 4.0).mean() * 16
        kl = kl / 5 if reduction == "elementmean" else kl
        ce = F.cross_entropy(student(batch.image), batch.targets)
    assert float(out.losses["kd"].detach()) == pytest.approx(0.7 * float(kl), rel=1e-5)
    assert float(out.losses["ce"].detach()) == pytest.approx(0.3 * float(ce), rel=1e-5)
    assert torch.allclose(out.logits, s_adv)


def test_ard_defaults_and_real_attack_raises_student_ce():
    ard = METHODS.get("ard")(tiny_net(0), [tiny_net(1)], normalization=(MEAN, STD))
    p = ard.params
    assert (p.alpha, p.temperature, p.reduction, p.steps) == (1.0, 30.0, "elementmean", 10)
    assert p.eps == pytest.approx(8 / 255) and p.step_size == pytest.approx(2 / 255)
    batch, pixels = make_batch(32)
    ard.train()
    x_adv = ard.attack(pixels, batch.targets)
    assert float((x_adv - pixels).abs().max()) <= 8 / 255 + 1e-6  # pixel units, despite std 0.4
    with torch.no_grad():
        before = F.cross_entropy(ard.pixel_student(pixels), batch.targets)
        after = F.cross_entropy(ard.pixel_student(x_adv), batch.targets)
    assert after > before
    out = ard(batch, Step())
    assert set(out.losses) == {"kd"}  # alpha 1: no clean CE term
    out.loss.backward()
    assert all(t.grad is None for t in ard.teachers.parameters())
    assert all(s.grad is not None for s in ard.student.parameters())


@pytest.mark.parametrize("clean_bn_pass", [True, False])
def test_ard_at_alpha_one_lets_batchnorm_see_the_clean_batch(clean_bn_pass):
    """The reference runs the student on the clean batch in train mode even when alpha = 1."""

    def bn_net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))

    ard = METHODS.get("ard")(
        bn_net(0),
        [bn_net(1)],
        {"steps": 0, "random_start": False, "clean_bn_pass": clean_bn_pass},
        normalization=(MEAN, STD),
    )
    ard.train()
    batch, _ = make_batch(32)
    ard(batch, Step())
    bn = ard.student[2]
    # steps 0 without a random start: the "adversarial" input is the clean one, so the student runs
    # once on it (the attack's logits) plus once more with the clean pass
    assert int(bn.num_batches_tracked) == (2 if clean_bn_pass else 1)
    assert METHODS.get("fast_ard").Params().clean_bn_pass is False
    assert METHODS.get("ard").Params().clean_bn_pass is True


def test_adv_ce_trades_defaults_to_the_trades_attack():
    madry = METHODS.get("adv_ce").Params()
    assert (madry.steps, madry.step_size) == (7, pytest.approx(2 / 255))
    trades = METHODS.get("adv_ce").Params(trades=True)
    assert (trades.steps, trades.step_size) == (10, pytest.approx(0.007))
    given = METHODS.get("adv_ce").Params(trades=True, steps=3, step_size="1/255")
    assert (given.steps, given.step_size) == (3, pytest.approx(1 / 255))


# ----------------------------------------------------------------------------- adv_ce
def test_adv_ce_madry_loss_and_modes(spy_pgd):
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))
    method = METHODS.get("adv_ce")(student, [], {"eps": 0.1, "clean_weight": 0.25}, normalization=(MEAN, STD))
    assert method.params.steps == 7  # Madry CIFAR-10
    method.train()
    batch, pixels = make_batch()
    out = method(batch, Step())
    assert spy_pgd[0]["loss_fn"] is None and torch.equal(spy_pgd[0]["y"], batch.targets)
    with torch.no_grad():
        adv = student(((pixels + 0.02).clamp(0, 1) - MEAN[0]) / STD[0])
        clean = student(batch.image)
    assert float(out.losses["adv_ce"].detach()) == pytest.approx(
        0.75 * float(F.cross_entropy(adv, batch.targets)), rel=1e-5
    )
    assert float(out.losses["ce"].detach()) == pytest.approx(
        0.25 * float(F.cross_entropy(clean, batch.targets)), rel=1e-5
    )
    assert student.training


def test_trades_loss_and_attack(spy_pgd):
    student = tiny_net(0)
    method = METHODS.get("adv_ce")(student, [], {"trades": True, "beta": 6.0}, normalization=(MEAN, STD))
    method.train()
    batch, pixels = make_batch()
    out = method(batch, Step())
    call = spy_pgd[0]
    assert call["loss_fn"] is not None and call["delta_init"] is not None
    assert float(call["delta_init"].abs().max()) < 0.01  # TRADES' 0.001 * N(0, 1) start
    with torch.no_grad():
        clean = student(batch.image)
        adv = student(((pixels + 0.02).clamp(0, 1) - MEAN[0]) / STD[0])
        # the attack maximizes KL(clean || adversarial)
        probs = call["y"]
        assert torch.allclose(probs, F.softmax(clean, -1), atol=1e-6)
        assert torch.allclose(call["loss_fn"](adv, probs), independent_kl(adv, clean, 1.0), atol=1e-5)
    assert float(out.losses["ce"].detach()) == pytest.approx(float(F.cross_entropy(clean, batch.targets)), rel=1e-5)
    expected = 6.0 * float(independent_kl(adv, clean, 1.0).mean())
    assert float(out.losses["trades_kl"].detach()) == pytest.approx(expected, rel=1e-2, abs=1e-6)


# ----------------------------------------------------------------------------- fast_ard
def test_fast_ard_free_replays_mechanics():
    teacher = Recorder(tiny_net(1))
    method = METHODS.get("fast_ard")(
        tiny_net(0), [teacher], {"replays": 3, "eps": 0.1, "step_size": 0.04}, normalization=(MEAN, STD)
    )
    assert method.batch_replays == 3
    method.train()
    batch, pixels = make_batch(6)
    out = method(batch, Step())
    assert torch.allclose(out.logits, method.pixel_student(pixels))  # the first replay starts at delta = 0
    out.loss.backward()
    grad = method._leaf.grad.clone()
    method.after_optimizer_step(Step())
    assert torch.allclose(method.noise, 0.04 * grad.sign())
    # second replay of the same batch: perturbed input, teacher not run again
    out = method(batch, Step())
    assert len(teacher.seen) == 1
    x_adv = (pixels + 0.04 * grad.sign()).clamp(0, 1)
    assert torch.allclose(out.logits, method.pixel_student(x_adv), atol=1e-6)
    out.loss.backward()
    grad2 = method._leaf.grad.clone()
    method.after_optimizer_step(Step())
    assert torch.allclose(method.noise, (0.04 * grad.sign() + 0.04 * grad2.sign()).clamp(-0.1, 0.1))
    # the perturbation persists into the next (smaller) batch: its first rows are used
    small, small_pixels = make_batch(4, seed=5)
    out = method(small, Step())
    assert len(teacher.seen) == 2
    x_small = (small_pixels + method.noise[:4]).clamp(0, 1)
    assert torch.allclose(out.logits, method.pixel_student(x_small), atol=1e-6)
    assert method.noise.shape[0] == 6


def test_fast_ard_ce_delta_loss_uses_the_student_ce_gradient():
    method = METHODS.get("fast_ard")(
        tiny_net(0), [tiny_net(1)], {"eps": 0.1, "delta_loss": "ce"}, normalization=(MEAN, STD)
    )
    method.train()
    batch, pixels = make_batch(6)
    leaf = pixels.clone().requires_grad_(True)
    expected = torch.autograd.grad(F.cross_entropy(method.pixel_student(leaf), batch.targets), leaf)[0]
    out = method(batch, Step())
    out.loss.backward()
    method.after_optimizer_step(Step())
    assert torch.allclose(method.noise, 0.1 * expected.sign())  # step_size None = eps


# ----------------------------------------------------------------------------- robust_prune units
def test_robust_prune_prox_steps_are_exact():
    student = tiny_net(0)
    method = METHODS.get("robust_prune")(
        student,
        [],
        {"prox": "l1", "rho": 0.5, "ramp": 0.5, "exclude": ["3"]},
        normalization=(MEAN, STD),
        input_shape=(1, 4, 4),
    )
    w1, w3 = student[1].weight.detach().clone(), student[3].weight.detach().clone()
    method.after_optimizer_step(Step(global_step=2, total_steps=5, lr=0.1))  # progress 0.5: full strength
    lam = 0.1 * 0.5
    assert torch.allclose(student[1].weight, torch.sign(w1) * (w1.abs() - lam).clamp_min(0))
    assert torch.equal(student[3].weight, w3)  # excluded
    # group prox with the sqrt(|g|) weighting, at half strength (progress 0.25 of a 0.5 ramp)
    method = METHODS.get("robust_prune")(tiny_net(0), [], {"prox": "group", "rho": 0.5, "ramp": 0.5})
    w = method.student[1].weight.detach().clone()
    method.after_optimizer_step(Step(global_step=1, total_steps=5, lr=0.1))
    lam = 0.1 * 0.5 * 0.5 * math.sqrt(16)
    scale = (1 - lam / w.norm(dim=1, keepdim=True)).clamp_min(0)
    assert torch.allclose(method.student[1].weight, w * scale, atol=1e-6)
    # projection at the ramped target
    method = METHODS.get("robust_prune")(tiny_net(0), [], {"prox": "project", "sparsity": 0.5, "ramp": 1.0})
    method.after_optimizer_step(Step(global_step=1, total_steps=3, lr=0.1))  # progress 0.5 -> 25 %
    assert (method.student[1].weight == 0).sum() == round(0.25 * 12 * 16)
    with pytest.raises(ValueError, match="sparsity"):
        METHODS.get("robust_prune")(tiny_net(0), [], {"prox": "project"})
    with pytest.raises(ValueError, match="exclude"):
        METHODS.get("robust_prune")(tiny_net(0), [], {"exclude": ["nope"]})


def test_compression_report_by_hand():
    net = tiny_net(0)
    with torch.no_grad():
        net[1].weight[:, :8] = 0  # 96 zeros
    report = compression_report(net, (1, 4, 4))
    dense = 16 * 12 + 12 + 12 * 5 + 5
    assert report["dense_parameters"] == dense and report["nonzero_parameters"] == dense - 96
    assert report["compression_rate"] == pytest.approx(dense / (dense - 96))
    flops = 2 * (16 * 12 + 12 * 5)
    assert report["dense_flops"] == flops and report["sparse_flops"] == flops - 2 * 96
    assert report["sparsity"] == pytest.approx(96 / (16 * 12 + 12 * 5))
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 16, 3))
    with torch.no_grad():
        conv[0].weight[0] = 0  # one filter (9 weights) at 16 output positions
    report = compression_report(conv, (1, 4, 4))
    assert report["dense_flops"] - report["sparse_flops"] == 2 * 9 * 16


# ----------------------------------------------------------------------------- end to end
def recipe(method, teachers=(), epochs=2, **train):
    return build_config(
        {
            "name": "adv",
            "data": {"name": "digits", "augment": False, "train_subset": 192},
            "student": {"name": "mlp", "kwargs": {"hidden": [32]}},
            "teachers": [{"checkpoint": t} for t in teachers],
            "method": method,
            "train": {
                "epochs": epochs,
                "batch_size": 64,
                "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                "scheduler": {"name": "constant"},
                "progress": "none",
                **train,
            },
        }
    )


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    Trainer(recipe({"name": "ce"}, epochs=3), out).fit()
    return str(out / "checkpoints" / "model_last.pt")


def test_methods_train_through_the_engine(tmp_path, teacher, monkeypatch):
    trainer = Trainer(
        recipe({"name": "adv_ce", "eps": "0.1", "step_size": 0.05, "steps": 2}, epochs=1), tmp_path / "adv"
    )
    summary = trainer.fit()
    assert summary["status"] == "finished"
    info = trainer.info
    assert torch.allclose(trainer.distiller.pixel_std.flatten(), torch.tensor(info.std, dtype=torch.float32))
    line = json.loads((tmp_path / "adv" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss_adv_ce" in line["train"] and "adv_top1" in line["train"]
    summary = Trainer(
        recipe({"name": "ard", "eps": 0.1, "step_size": 0.05, "steps": 2}, [teacher], epochs=1), tmp_path / "ard"
    ).fit()
    assert (
        summary["status"] == "finished"
        and "loss_kd" in json.loads((tmp_path / "ard" / "metrics.jsonl").read_text())["train"]
    )
    # fast_ard: the trainer takes `replays` optimizer steps per batch, schedules advance per batch
    calls = []
    original = adversarial.FastARD.after_optimizer_step
    monkeypatch.setattr(
        adversarial.FastARD,
        "after_optimizer_step",
        lambda self, step: (calls.append(step.global_step), original(self, step))[1],
    )
    trainer = Trainer(recipe({"name": "fast_ard", "eps": 0.1, "replays": 3}, [teacher], epochs=1), tmp_path / "fast")
    summary = trainer.fit()
    assert summary["global_step"] == trainer.steps_per_epoch == 3
    assert calls == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert float(trainer.distiller.noise.abs().max()) == pytest.approx(0.1)


@pytest.mark.parametrize("prox", ["project", "l1", "group"])
def test_robust_prune_reaches_the_sparsity_after_the_finetune(tmp_path, teacher, prox):
    method = {
        "name": "robust_prune",
        "prox": prox,
        "sparsity": 0.75,
        "rho": 2.0,
        "finetune_epochs": 1,
        "eps": 0.1,
        "step_size": 0.05,
        "steps": 2,
        "ramp": 0.5,
        "exclude": ["classifier"],
    }
    summary = Trainer(recipe(method, [teacher], epochs=2), tmp_path).fit()
    report = summary["method_summary"]["pruning"]
    record = read_model_file(tmp_path / "checkpoints" / "model_last.pt")["state_dict"]
    hidden = record["stage1.linear.weight"]  # 32 x 64
    if prox == "group":  # whole filters (rows) removed: round(0.75 * 32) = 24
        assert int((hidden.abs().sum(1) == 0).sum()) == 24
    else:
        assert int((hidden == 0).sum()) == round(0.75 * hidden.numel())
    assert int((record["classifier.weight"] == 0).sum()) == 0  # excluded, dense
    assert report["layers"]["stage1.linear"] == pytest.approx(0.75)
    zeros = round(0.75 * hidden.numel())
    assert report["sparsity"] == pytest.approx(zeros / (hidden.numel() + 32 * 10))
    assert report["computation_rate"] == pytest.approx(2 * (64 * 32 + 32 * 10) / (2 * (64 * 32 + 32 * 10 - zeros)))
    assert report["compression_rate"] > 1
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    if prox == "project":  # the fine-tune keeps the sparsity constant
        assert lines[-1]["train"]["sparsity"] == pytest.approx(report["sparsity"])
    else:  # a prox that overshot the target leaves kept zeros, which regrow in the fine-tune's first step
        assert lines[-1]["train"]["sparsity"] >= report["sparsity"] - 1e-9
    assert {"loss_adv_ce", "loss_kd", "compression_rate", "computation_rate"} <= set(lines[-1]["train"])


def test_robust_prune_natural_training_without_teacher(tmp_path):
    method = {"name": "robust_prune", "adversarial": False, "prox": "project", "sparsity": 0.5, "finetune_epochs": 1}
    summary = Trainer(recipe(method, epochs=2), tmp_path).fit()
    assert summary["method_summary"]["pruning"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    train = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["train"]
    assert "loss_ce" in train and "loss_kd" not in train and "adv_top1" not in train


def test_eps_warmup_scales_eps_and_step(spy_pgd):
    method = METHODS.get("adv_ce")(
        tiny_net(0), [], {"eps": 0.2, "step_size": 0.05, "eps_ramp": 0.5}, normalization=(MEAN, STD)
    )
    assert method.current_eps(Step(global_step=0, total_steps=11)) == 0.0
    assert method.current_eps(Step(global_step=2, total_steps=11)) == pytest.approx(0.08)
    assert method.current_eps(Step(global_step=9, total_steps=11)) == pytest.approx(0.2)
    method.train()
    batch, pixels = make_batch()
    method(batch, Step(global_step=0, total_steps=11))
    assert spy_pgd == []  # eps 0: no attack at all
    method(batch, Step(global_step=2, total_steps=11))
    assert spy_pgd[0]["eps"] == pytest.approx(0.08) and spy_pgd[0]["step_size"] == pytest.approx(0.02)


def test_attack_mode_eval_and_restored():
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))
    method = METHODS.get("ard")(student, [tiny_net(1)], {"attack_mode": "eval", "steps": 2}, normalization=(MEAN, STD))
    method.train()
    batch, _ = make_batch()
    before = student[2].running_mean.clone()
    seen = []
    student[2].register_forward_pre_hook(lambda mod, inputs: seen.append(mod.training))
    method(batch, Step())
    assert seen[:2] == [False, False] and seen[-1] is True  # attack in eval, loss forward in train
    assert student.training
    assert not torch.equal(student[2].running_mean, before)  # only the training forward updated BN

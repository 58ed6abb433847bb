"""introspective, takd and growing_ta: losses pinned against independent computations, the growing
assistant's function preservation and resume behaviour, short Trainer runs, and the TAKD recipes."""

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import batch_of
from torch import nn

import kdforge.methods.growing_ta  # noqa: F401  (registration)
import kdforge.methods.introspective  # noqa: F401
import kdforge.methods.takd  # noqa: F401
from kdforge.config import build_config, read_yaml
from kdforge.core.errors import ConfigError
from kdforge.engine.pipeline import _substitute, stage_recipes
from kdforge.engine.trainer import Trainer
from kdforge.methods.base import METHODS, Step
from kdforge.methods.growing_ta import active_count, growth_epochs
from kdforge.methods.introspective import gradcam_similarities
from kdforge.models import FeatureTap, create

ROOT = Path(__file__).resolve().parents[1]


def images(n=4, size=16, channels=3):
    return torch.randn(n, channels, size, size)


# ----------------------------------------------------------------------------- takd
@pytest.mark.parametrize("reduction,torch_reduction", [("elementmean", "mean"), ("batchmean", "batchmean")])
def test_takd_loss_matches_kl_div_formula(reduction, torch_reduction):
    student, teacher = nn.Linear(5, 7), nn.Linear(5, 7)
    d = METHODS.get("takd")(student, [teacher], {"weight": 0.3, "temperature": 2.0, "reduction": reduction})
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 5])
    out = d(batch_of(x, y), Step())
    with torch.no_grad():
        s, t = student(x), teacher(x)
        with warnings.catch_warnings():  # 'mean' is exactly the reference's (deprecated) default
            warnings.simplefilter("ignore")
            kl = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction=torch_reduction)
        expected = 0.7 * F.cross_entropy(s, y) + 0.3 * 4 * kl
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(out.losses) == {"kd", "ce"}
    out.loss.backward()
    assert student.weight.grad is not None and teacher.weight.grad is None


def test_takd_defaults_extremes_and_bank_replay():
    d = METHODS.get("takd")(nn.Linear(4, 3), [nn.Linear(4, 3)])
    assert (d.params.weight, d.params.temperature, d.params.reduction) == (0.5, 5.0, "elementmean")
    assert METHODS.get("takd").replays_teacher_logits and METHODS.get("takd").teachers_required == (1, 1)
    b = batch_of(torch.randn(4, 4), [0, 1, 2, 0])
    assert set(METHODS.get("takd")(nn.Linear(4, 3), [nn.Linear(4, 3)], {"weight": 1.0})(b, Step()).losses) == {"kd"}
    assert set(METHODS.get("takd")(nn.Linear(4, 3), [nn.Linear(4, 3)], {"weight": 0.0})(b, Step()).losses) == {"ce"}
    live = d(b, Step()).loss
    b.extras["teacher_logits"] = d.teachers[0](b.image).detach().unsqueeze(0)
    assert d(b, Step()).loss.item() == pytest.approx(live.item(), rel=1e-6)
    with pytest.raises(ValueError):
        METHODS.get("takd")(nn.Linear(4, 3), [nn.Linear(4, 3)], {"reduction": "none"})


@pytest.mark.parametrize(
    "path", ["configs/recipes/takd_cifar10.yaml", "configs/cifar100/takd_resnet110_resnet20_resnet8.yaml"]
)
def test_takd_recipes_resolve(path):
    recipe_path = ROOT / path
    stages = stage_recipes(read_yaml(recipe_path), recipe_path.parent)
    dirs = {}
    for name, stage in stages.items():
        config = build_config(_substitute(stage, dirs, name))
        dirs[name] = Path("/runs") / name
        if config.method.name == "takd":
            assert len(config.teachers) == 1
            checkpoint = config.teachers[0].checkpoint
            assert checkpoint.startswith("/runs/") or (ROOT / checkpoint).is_file(), checkpoint
    if "cifar10" in path and "cifar100" not in path:
        assert list(stages) == ["assistant", "student", "blkd"]
        assert stages["assistant"]["student"]["name"] == "resnet14"
        assert stages["student"]["student"]["name"] == "resnet8"
        assert all(s["data"]["train_subset"] == 10000 and s["train"]["epochs"] == 15 for s in stages.values())
    else:
        names = [stages[k]["student"]["name"] for k in ("teacher", "assistant", "student")]
        assert names == ["resnet110", "resnet20", "resnet8"]
        train = build_config(stages["student"].copy() | {"teachers": [{"checkpoint": "x.pt"}]}).train
        assert train.epochs == 160 and train.optimizer.lr == 0.1 and train.scheduler.milestones == [80, 120]


# ----------------------------------------------------------------------------- introspective
def reference_similarities(model, layer, x, classes):
    """Per sample, per class: an independent loop of single-sample forwards and autograd calls."""
    tap = FeatureTap(model, [layer])
    out = torch.zeros(classes.shape)
    for b in range(x.shape[0]):
        maps = []
        for c in classes[b].tolist():
            z = model(x[b : b + 1])
            feats = tap.features[layer]
            (grad,) = torch.autograd.grad(z[0, c], feats)
            weights = grad[0].mean(dim=(1, 2))  # C
            maps.append(F.relu((weights[:, None, None] * feats[0].detach()).sum(0)).flatten())
        for j, m in enumerate(maps):
            out[b, j] = F.cosine_similarity(m, maps[0], dim=0)
    tap.remove()
    return out


def test_gradcam_similarities_match_a_per_sample_loop_and_the_closed_form():
    model = create("resnet8", num_classes=10).eval()  # eval: no batch coupling, so the sum trick is exact
    x = images(3)
    classes = torch.tensor([[1, 4, 2], [0, 0, 9], [7, 3, 5]])
    for layer in ("stage2", "stage3"):
        tap = FeatureTap(model, [layer])
        z = model(x)
        sims = gradcam_similarities(z, tap.features[layer], classes)
        tap.remove()
        torch.testing.assert_close(sims, reference_similarities(model, layer, x, classes), atol=1e-5, rtol=1e-4)
    # stage3 -> global average pool -> linear: w_k^c = W[c, k] / HW, so E_c ~ ReLU(sum_k W[c, k] F_k)
    tap = FeatureTap(model, ["stage3"])
    z = model(x)
    feats = tap.features["stage3"].detach()
    maps = F.relu(torch.einsum("ck,bkhw->bchw", model.classifier.weight.detach(), feats)).flatten(2)
    closed = torch.stack([F.cosine_similarity(maps[b, classes[b]], maps[b, classes[b, :1]], dim=-1) for b in range(3)])
    torch.testing.assert_close(gradcam_similarities(z, tap.features["stage3"], classes), closed, atol=1e-5, rtol=1e-4)


def introspective_expected(model, x, y, k, tau, tau_s, alpha, floor, label_mix=None):
    """The whole loss from the reference similarities, written out independently."""
    with torch.no_grad():
        z = model(x)
    top = z.topk(k, dim=1).indices
    classes = torch.cat([y[:, None], top], 1)
    sims = reference_similarities(model, "stage3", x, classes)
    B, C = z.shape
    q = torch.zeros(B, C)
    for b in range(B):
        s = {}
        for j, c in enumerate(classes[b].tolist()):
            s[c] = 1.0 if c == y[b] else float(sims[b, j])
        if floor == "exclude":
            values = {c: v for c, v in s.items()}
        else:
            low = min(s.values()) if floor == "min" else floor
            values = {c: s.get(c, low) for c in range(C)}
        norm = sum(torch.exp(torch.tensor(v / tau)) for v in values.values())
        for c, v in values.items():
            q[b, c] = torch.exp(torch.tensor(v / tau)) / norm
        if label_mix is not None:
            others = q[b].clone()
            others[y[b]] = 0
            q[b] = label_mix * others / others.sum()
            q[b, y[b]] = 1 - label_mix
    log_p = F.log_softmax(z / tau_s, 1)
    kl = sum(float(q[b, c]) * (torch.log(q[b, c]) - log_p[b, c]) for b in range(B) for c in range(C) if q[b, c] > 0) / B
    return (1 - alpha) * F.cross_entropy(z, y) + alpha * tau_s**2 * kl, q


@pytest.mark.parametrize("floor,label_mix", [("exclude", None), ("min", None), (-1.0, 0.4)])
def test_introspective_loss_against_independent_computation(floor, label_mix):
    model = create("resnet8", num_classes=10)
    x, y = images(4), torch.tensor([3, 1, 7, 0])
    params = {
        "top_k": 3,
        "similarity_temperature": 0.5,
        "temperature": 2.0,
        "alpha": 0.7,
        "floor": floor,
        "label_mix": label_mix,
    }
    d = METHODS.get("introspective")(model, [], params).eval()
    out = d(batch_of(x, y), Step())
    expected, q = introspective_expected(model, x, y, 3, 0.5, 2.0, 0.7, floor, label_mix)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert set(out.losses) == {"introspective", "ce"}
    assert 0.0 <= float(out.metrics["explanation_similarity"]) <= 1.0
    assert float(out.metrics["target_label_prob"]) == pytest.approx(q[torch.arange(4), y].mean().item(), rel=1e-4)
    if floor == "exclude":
        assert ((q > 0).sum(1) <= 4).all()


def test_introspective_explanations_are_constants_and_gradients_reach_the_student():
    model = create("resnet8", num_classes=10)
    d = METHODS.get("introspective")(model, [], {"alpha": 1.0}).train()
    out = d(batch_of(images(4), [0, 1, 2, 3]), Step())
    assert set(out.losses) == {"introspective"}
    out.loss.backward()  # the retained graph is freed exactly once; no double-backward was built
    assert all(p.grad is not None for p in model.parameters())
    assert d.extra_parameter_count() == 0
    with pytest.raises(ConfigError, match="feature map"):
        METHODS.get("introspective")(model, [], {"layer": "pool"})(batch_of(images(2), [0, 1]), Step())


# ----------------------------------------------------------------------------- growing_ta
def growing(teacher, student=None, **params):
    return METHODS.get("growing_ta")(student or create("resnet8", num_classes=10), [teacher], params)


def perturb_batchnorm(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)


def train_mode_output(model, x):
    """A train-mode forward (batch statistics) that leaves the running statistics alone."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    with torch.no_grad():
        out = model.train()(x)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return out


def train_a_little(d, steps=2):
    opt = torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=0.05, momentum=0.9, weight_decay=5e-4)
    d.train()
    for _ in range(steps):
        out = d(batch_of(images(6), torch.randint(0, 10, (6,))), Step())
        opt.zero_grad()
        out.loss.backward()
        opt.step()


@pytest.mark.parametrize(
    "teacher",
    [("resnet", {"depth": 8, "width_multiplier": 2}), ("wrn", {"depth": 10, "widen_factor": 2}), ("vgg8", {})],
    ids=["resnet", "wrn", "vgg"],
)
def test_growth_preserves_the_assistant_function(teacher):
    name, kwargs = teacher
    d = growing(create(name, num_classes=10, **kwargs), grow_epochs=[1, 2], start_fraction=0.25, seed=3)
    perturb_batchnorm(d.ta)
    x = images(3)
    for epoch in range(4):
        train_a_little(d)
        d.eval()
        with torch.no_grad():
            before = d.ta(x)
        before_train = train_mode_output(d.ta, x)
        d.on_epoch_start(Step(epoch=epoch, epochs=4))
        d.ta.eval()
        with torch.no_grad():
            after = d.ta(x)
        after_train = train_mode_output(d.ta, x)
        torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
        torch.testing.assert_close(after_train, before_train, atol=1e-5, rtol=0)
        assert int(d.growths) == min(epoch, 2)
    assert d.grower.active_fraction() == 1.0


def test_masks_are_prefixes_with_the_scheduled_counts():
    teacher = create("resnet", num_classes=10, depth=8, width_multiplier=4)  # stem 32, stages 64/128/256
    d = growing(teacher, grow_epochs=2)
    assert d.start_fraction == pytest.approx(0.25)  # resnet8's 16/32/64 over 64/128/256
    assert growth_epochs(2, 6) == [2, 4] and growth_epochs(3, 15) == [3, 7, 11] and growth_epochs([5], 9) == [5]
    expected = {0: 0.25, 2: 0.625, 4: 1.0}
    for epoch in range(6):
        d.on_epoch_start(Step(epoch=epoch, epochs=6))
        fraction = expected[max(e for e in expected if e <= epoch)]
        for bn in d.grower.bns:
            n = active_count(bn.num_features, fraction)
            assert bn.growth_mask[:n].eq(1).all() and bn.growth_mask[n:].eq(0).all()
        stage3_bn = d.ta.stage3[0].bn2
        assert int(stage3_bn.growth_mask.sum()) == {0.25: 64, 0.625: 160, 1.0: 256}[fraction]
        metrics = d(batch_of(images(2), [0, 1]), Step(epoch=epoch, epochs=6)).metrics
        assert metrics["ta_active_fraction"] == pytest.approx(fraction)
    # inactive channels are exactly zero after their BatchNorm
    d2 = growing(teacher)
    tap = FeatureTap(d2.ta, ["stage3"])
    d2.ta(images(2))
    assert tap.features["stage3"][:, 64:].abs().max() == 0 and tap.features["stage3"][:, :64].abs().max() > 0


def test_repeating_on_epoch_start_and_resume_do_not_regrow():
    teacher = create("resnet", num_classes=10, depth=8, width_multiplier=2)
    torch.manual_seed(1)
    d = growing(teacher, grow_epochs=[1, 3])
    d.on_epoch_start(Step(epoch=1, epochs=4))
    train_a_little(d, 1)
    snapshot = {k: v.clone() for k, v in d.state_dict().items()}
    d.on_epoch_start(Step(epoch=1, epochs=4))  # again: nothing changes
    assert all(torch.equal(snapshot[k], v) for k, v in d.state_dict().items())
    # a resumed run: a freshly built distiller (start masks), the saved state, then on_epoch_start(2)
    torch.manual_seed(2)
    resumed = growing(teacher, grow_epochs=[1, 3])
    assert int(resumed.growths) == 0
    resumed.load_state_dict(snapshot)
    resumed.on_epoch_start(Step(epoch=2, epochs=4))
    assert int(resumed.growths) == 1
    assert all(torch.equal(snapshot[k], v) for k, v in resumed.state_dict().items())
    # the next growth is the same in both (generator seeded by seed and growth index)
    d.on_epoch_start(Step(epoch=3, epochs=4))
    resumed.on_epoch_start(Step(epoch=3, epochs=4))
    assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(), resumed.state_dict().values()))
    other = growing(teacher, grow_epochs=[1, 3], seed=5)
    other.load_state_dict(snapshot)
    other.on_epoch_start(Step(epoch=3, epochs=4))
    assert not torch.equal(other.ta.stage3[0].conv2.weight, d.ta.stage3[0].conv2.weight)


def test_growing_ta_losses_and_gradient_routing():
    teacher = create("resnet", num_classes=10, depth=8, width_multiplier=2)
    student = create("resnet8", num_classes=10)
    d = growing(teacher, student, temperature=2.0, kd_weight=0.6, ce_weight=0.4, ta_kd_weight=0.8, ta_ce_weight=0.2)
    d.train()
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    out = d(batch_of(x, y), Step())
    with torch.no_grad():
        z_t = teacher(x)
    z_ta, z_s = d.ta(x), student(x)  # same batch, train mode: identical forwards
    kl = lambda s, t: F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4  # noqa: E731
    expected = {
        "ta_ce": 0.2 * F.cross_entropy(z_ta, y),
        "ta_kd": 0.8 * kl(z_ta, z_t),
        "ce": 0.4 * F.cross_entropy(z_s, y),
        "kd": 0.6 * kl(z_s, z_ta),
    }
    assert set(out.losses) == set(expected)
    for key, value in expected.items():
        assert out.losses[key].item() == pytest.approx(value.item(), rel=1e-5), key
    (out.losses["ce"] + out.losses["kd"]).backward()  # the student's loss never reaches the TA
    assert all(p.grad is None for p in d.ta.parameters())
    assert all(p.grad is not None for p in student.parameters())
    d.zero_grad(set_to_none=True)
    (out.losses["ta_ce"] + out.losses["ta_kd"]).backward()
    assert all(p.grad is None for p in student.parameters()) and any(p.grad is not None for p in d.ta.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert d.inference_model() is student and d.evaluation_models() == {"assistant": d.ta}
    assert d.extra_parameter_count() == sum(p.numel() for p in d.ta.parameters())


def test_growing_ta_assistant_from_params_and_errors():
    teacher = create("resnet20", num_classes=10)
    d = METHODS.get("growing_ta")(
        create("resnet8", num_classes=10),
        [teacher],
        {"ta": {"name": "resnet", "kwargs": {"depth": 14, "width_multiplier": 2}}},
        input_shape=(3, 16, 16),
    )
    assert d.ta.depth == 14 and d.ta.stage_channels == [32, 64, 128] and d.start_fraction == pytest.approx(0.5)
    assert d.ta.classifier.out_features == 10
    with pytest.raises(ConfigError, match="resnet, wrn or vgg"):
        growing(create("lenet", num_classes=10, in_channels=3))
    with pytest.raises(ValueError, match="increasing"):
        growing(teacher, grow_epochs=[3, 2])


def test_growing_ta_can_start_from_the_teachers_weights():
    teacher = create("resnet", num_classes=10, depth=8, width_multiplier=2)
    perturb_batchnorm(teacher)
    teacher.eval().requires_grad_(False)
    x = images(3)
    full = growing(teacher, ta_init="teacher", start_fraction=1.0)
    # at full width the assistant is the teacher, trainable and separate from it
    full.ta.eval()
    with torch.no_grad():
        torch.testing.assert_close(full.ta(x), teacher(x), atol=1e-6, rtol=0)
    assert all(p.requires_grad for p in full.ta.parameters())
    assert all(a is not b for a, b in zip(full.ta.parameters(), teacher.parameters()))
    # at half width it holds the teacher's weights, masked: a different function
    half = growing(teacher, ta_init="teacher", start_fraction=0.5)
    masked = half.ta.state_dict()
    assert {k for k in masked if not k.endswith("growth_mask")} == set(teacher.state_dict())
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(masked[key], value, msg=key)
    half.ta.eval()
    with torch.no_grad():
        assert (half.ta(x) - teacher(x)).abs().max() > 1e-3
    scratch = growing(teacher, start_fraction=1.0)  # the default re-initialises
    assert not torch.equal(scratch.ta.stage1[0].conv1.weight, teacher.stage1[0].conv1.weight)
    with pytest.raises(ValueError, match="teacher's architecture"):
        growing(teacher, ta_init="teacher", ta={"name": "resnet8"})


# ----------------------------------------------------------------------------- end to end
def digits_recipe(method, teachers=()):
    return build_config(
        {
            "name": "t",
            "data": {"name": "digits", "augment": False, "train_subset": 80},
            "student": {"name": "resnet8"},
            "teachers": list(teachers),
            "method": method,
            "train": {
                "epochs": 2,
                "batch_size": 8,
                "eval_batch_size": 512,
                "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                "scheduler": {"name": "constant"},
                "progress": "none",
            },
        }
    )


def test_introspective_trains_end_to_end_on_digits(tmp_path):
    summary = Trainer(digits_recipe({"name": "introspective", "top_k": 3}), tmp_path).fit()
    assert summary["status"] == "finished"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_introspective", "loss_ce", "explanation_similarity"} <= set(lines[-1]["train"])


def test_growing_ta_trains_and_resumes_end_to_end_on_digits(tmp_path):
    teachers = [{"name": "resnet", "kwargs": {"depth": 8, "width_multiplier": 2}}]
    config = digits_recipe({"name": "growing_ta", "grow_epochs": [1]}, teachers)
    Trainer(config, tmp_path / "straight").fit()
    lines = [json.loads(line) for line in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    assert [r["train"]["ta_active_fraction"] for r in lines] == [0.5, 1.0]
    assert "assistant" in lines[-1]["members"] and {"loss_ta_kd", "loss_kd"} <= set(lines[-1]["train"])

    def stop_after_first_epoch(trainer, epoch, record):
        if epoch == 0:
            raise KeyboardInterrupt

    from kdforge.engine.trainer import RunInterrupted

    with pytest.raises(RunInterrupted):
        Trainer(config, tmp_path / "broken", callbacks=[stop_after_first_epoch]).fit()
    Trainer(config, tmp_path / "broken", resume=True).fit()
    a = torch.load(tmp_path / "straight/checkpoints/state.pt", weights_only=False)["distiller"]
    b = torch.load(tmp_path / "broken/checkpoints/state.pt", weights_only=False)["distiller"]
    assert int(b["growths"]) == 1
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)

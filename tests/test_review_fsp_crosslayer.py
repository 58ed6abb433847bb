"""ReviewKD, FSP and cross-layer Gramian KD: matrices and losses against independent loop
computations, the properties each loss must have, gradient routing, forward/backward on
resnet20 -> resnet8, and the shipped two-stage pipeline recipes."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import batch_of

import kdforge.methods.crosslayer  # noqa: F401  (registration)
import kdforge.methods.fsp  # noqa: F401
import kdforge.methods.review_kd  # noqa: F401
from kdforge.config import build_config, read_yaml
from kdforge.core.errors import ConfigError
from kdforge.engine.pipeline import _substitute, stage_recipes
from kdforge.engine.runs import build_any_config
from kdforge.methods.base import METHODS, Step
from kdforge.methods.common import fsp_matrix, warmup_factor
from kdforge.methods.crosslayer import adapted_gram, default_pairs
from kdforge.methods.review_kd import ABF, hcl_loss, nearest_resize
from kdforge.models import create

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "recipes"


def build(method, student, teacher, params=None, size=16):
    return METHODS.get(method)(student, [teacher], params or {}, input_shape=(3, size, size))


# ----------------------------------------------------------------------------- FSP / Gram matrices
def np_pool(x, size):
    """Average pooling by an integer factor, by hand (B x C x H x W numpy array)."""
    b, c, h, w = x.shape
    k = h // size
    return x.reshape(b, c, size, k, size, k).mean((3, 5))


def fsp_by_loops(f1, f2):
    f1, f2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    size = min(f1.shape[2], f2.shape[2])
    f1, f2 = np_pool(f1, size), np_pool(f2, size)
    b, c1, h, w = f1.shape
    c2 = f2.shape[1]
    g = np.zeros((b, c1, c2))
    for n in range(b):
        for i in range(c1):
            for j in range(c2):
                g[n, i, j] = sum(f1[n, i, u, v] * f2[n, j, u, v] for u in range(h) for v in range(w)) / (h * w)
    return g


def test_fsp_matrix_matches_loops_and_pools_the_larger_map():
    f1, f2 = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)
    expected = fsp_by_loops(f1.numpy(), f2.numpy())
    assert fsp_matrix(f1, f2).shape == (2, 3, 5)
    np.testing.assert_allclose(fsp_matrix(f1, f2).numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fsp_matrix(f2, f1).numpy(), expected.transpose(0, 2, 1), rtol=1e-5, atol=1e-6)


def test_fsp_loss_by_hand_and_zero_for_identical_networks():
    teacher = create("resnet8")
    student = copy.deepcopy(teacher)
    d = build("fsp", student, teacher, {"student_layers": ["stem", "stage1", "stage2"]})
    d.eval()  # the student's BN then uses running statistics, like the teacher's
    x = torch.randn(2, 3, 16, 16)
    out = d(batch_of(x), Step())
    assert set(out.losses) == {"fsp"}  # ce_weight 0: the hint stage
    assert out.loss.item() == pytest.approx(0.0, abs=1e-10)

    # perturb the student; the loss is the sum over consecutive pairs of mean squared differences
    with torch.no_grad():
        student.stage1[0].conv1.weight.mul_(1.5)
    feats = {}
    for name, net in (("s", student), ("t", teacher)):
        with torch.no_grad():
            stem = net.stem(x)
            s1 = net.stage1(stem)
            s2 = net.stage2(s1)
        feats[name] = [stem.numpy(), s1.numpy(), s2.numpy()]
    expected = sum(
        ((fsp_by_loops(feats["s"][i], feats["s"][i + 1]) - fsp_by_loops(feats["t"][i], feats["t"][i + 1])) ** 2).mean()
        for i in range(2)
    )
    params = {"student_layers": ["stem", "stage1", "stage2"], "weight": 2.0, "ce_weight": 0.5}
    d2 = build("fsp", student, teacher, params)
    d2.eval()
    out = d2(batch_of(x), Step())
    assert out.losses["fsp"].item() == pytest.approx(2.0 * expected, rel=1e-4)
    assert out.losses["ce"].item() == pytest.approx(0.5 * F.cross_entropy(out.logits, torch.arange(2)).item(), rel=1e-6)


def test_fsp_needs_equal_channels_and_points_at_crosslayer():
    narrow = create("resnet", depth=8, width_multiplier=0.5)
    with pytest.raises(ConfigError, match="crosslayer"):
        build("fsp", narrow, create("resnet20"))
    with pytest.raises(ConfigError, match="student layer 'stage1' has 8 channels and teacher layer 'stage1' has 16"):
        build("fsp", narrow, create("resnet20"), {"student_layers": ["stage1", "stage2"]})


def test_fsp_hint_stage_leaves_the_classifier_without_gradient():
    student, teacher = create("resnet8"), create("resnet20")
    d = build("fsp", student, teacher)
    d(batch_of(torch.randn(4, 3, 16, 16)), Step()).loss.backward()
    assert student.classifier.weight.grad is None
    assert student.stage3[0].conv2.weight.grad is not None and student.stem.conv.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------- cross-layer
def test_adapted_gram_equals_gram_of_the_adapted_features():
    fa, fb = torch.randn(2, 3, 4, 4), torch.randn(2, 2, 2, 2)
    pa, pb = torch.randn(5, 3), torch.randn(4, 2)
    adapted_a = np.einsum("ts,bshw->bthw", pa.numpy(), fa.numpy())  # 1x1 conv by hand
    adapted_b = np.einsum("ts,bshw->bthw", pb.numpy(), fb.numpy())
    expected = fsp_by_loops(adapted_a, adapted_b)
    np.testing.assert_allclose(adapted_gram(fa, fb, pa, pb).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_crosslayer_default_pairs_adapters_and_zero_loss_for_identity_adapters():
    assert default_pairs(4) == [(0, 1), (1, 2), (2, 3), (0, 3)]
    assert default_pairs(2) == [(0, 1)]
    teacher = create("resnet8")
    student = copy.deepcopy(teacher)
    d = build("crosslayer", student, teacher)
    assert [tuple(a.weight.shape[:2]) for a in d.adapters] == [(16, 16), (16, 16), (32, 32), (64, 64)]
    assert d.extra_parameter_count() == 16 * 16 * 2 + 32 * 32 + 64 * 64
    d.eval()
    out = d(batch_of(torch.randn(2, 3, 16, 16)), Step())
    assert set(out.losses) == {"crosslayer"} and out.loss.item() == pytest.approx(0.0, abs=1e-10)


def test_crosslayer_loss_by_hand_with_adapters_and_gradient_routing():
    student, teacher = create("resnet", depth=8, width_multiplier=0.5), create("resnet20")
    pairs = [["stage1", "stage2"], ["stage1", "stage3"]]
    d = build("crosslayer", student, teacher, {"student_layers": ["stage1", "stage2", "stage3"], "pairs": pairs})
    assert [tuple(a.weight.shape[:2]) for a in d.adapters] == [(16, 8), (32, 16), (64, 32)]
    x = torch.randn(3, 3, 16, 16)
    out = d(batch_of(x), Step())
    out.loss.backward()
    # gradients: student body and adapters, never the teacher or the student's classifier
    assert all(a.weight.grad is not None and a.weight.grad.abs().sum() > 0 for a in d.adapters)
    assert student.stage1[0].conv1.weight.grad is not None and student.classifier.weight.grad is None
    assert all(p.grad is None for p in teacher.parameters())
    # value: conv-then-Gram by loops
    feats = {}
    for name, net in (("s", student), ("t", teacher)):
        with torch.no_grad():
            s1 = net.stage1(net.stem(x))
            s2 = net.stage2(s1)
            s3 = net.stage3(s2)
        feats[name] = [s1, s2, s3]
    adapted = [
        np.einsum("ts,bshw->bthw", a.weight.detach().flatten(1).numpy(), f.numpy())
        for a, f in zip(d.adapters, feats["s"])
    ]
    teacher_np = [f.numpy() for f in feats["t"]]
    expected = sum(
        ((fsp_by_loops(adapted[i], adapted[j]) - fsp_by_loops(teacher_np[i], teacher_np[j])) ** 2).mean()
        for i, j in [(0, 1), (0, 2)]
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)


def test_crosslayer_rejects_bad_pairs():
    with pytest.raises(ConfigError, match="not in student_layers"):
        build_config(
            {
                "data": {"name": "digits"},
                "student": {"name": "resnet8"},
                "teachers": [{"name": "resnet20"}],
                "method": {"name": "crosslayer", "pairs": [["stage1", "stage9"]]},
            }
        )
    with pytest.raises(ConfigError, match="in no pair"):
        build("crosslayer", create("resnet8"), create("resnet20"), {"pairs": [["stage1", "stage2"]]})


# ----------------------------------------------------------------------------- ReviewKD
def hcl_by_hand(s, t):
    """HCL straight from the definition, with pooling by explicit block means."""
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    h = s.shape[2]
    loss, weight, total = ((s - t) ** 2).mean(), 1.0, 1.0
    for level in (4, 2, 1):
        if level >= h:
            continue
        weight /= 2
        loss += weight * ((np_pool(s, level) - np_pool(t, level)) ** 2).mean()
        total += weight
    return loss / total


def test_hcl_weights_by_hand():
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    d = s.double() - t.double()
    by_levels = [
        (d**2).mean(),
        (np_pool(d.numpy(), 4) ** 2).mean(),
        (np_pool(d.numpy(), 2) ** 2).mean(),
        (np_pool(d.numpy(), 1) ** 2).mean(),
    ]
    expected = (by_levels[0] + by_levels[1] / 2 + by_levels[2] / 4 + by_levels[3] / 8) / 1.875
    assert hcl_loss(s, t).item() == pytest.approx(float(expected), rel=1e-5)
    assert hcl_loss(s, t).item() == pytest.approx(hcl_by_hand(s, t), rel=1e-5)
    # 4x4: levels 2 and 1 are kept, weighted 1/2 and 1/4 (divisor 1.75); 1x1: the plain MSE
    s4, t4 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    d4 = (s4 - t4).double().numpy()
    expected4 = ((d4**2).mean() + (np_pool(d4, 2) ** 2).mean() / 2 + (np_pool(d4, 1) ** 2).mean() / 4) / 1.75
    assert hcl_loss(s4, t4).item() == pytest.approx(expected4, rel=1e-5)
    s1, t1 = torch.randn(4, 6, 1, 1), torch.randn(4, 6, 1, 1)
    assert hcl_loss(s1, t1).item() == pytest.approx(F.mse_loss(s1, t1).item(), rel=1e-6)
    assert hcl_loss(s, s.clone()).item() == 0.0


def test_review_kd_warmup_factor():
    student, teacher = create("resnet8"), create("resnet20")
    d = build("review_kd", student, teacher, {"warmup_epochs": 2.0})
    x = batch_of(torch.randn(2, 3, 16, 16))
    cases = [(Step(0, 10, 0, 100), 0.1 / 2), (Step(1, 10, 14, 100), 0.75), (Step(3, 10, 30, 100), 1.0)]
    full = None
    for step, expected in cases:
        assert warmup_factor(step, 2.0) == pytest.approx(expected)
        d.eval()
        out = d(x, step)
        assert float(out.metrics["review_warmup"]) == pytest.approx(expected)
        if expected == 1.0:
            full = out.losses["review"].item()
    d.eval()
    assert d(x, cases[0][0]).losses["review"].item() == pytest.approx(full * 0.05, rel=1e-5)
    assert METHODS.get("review_kd").Params().warmup_epochs == 20.0


def test_review_kd_levels_abf_shapes_and_preact_taps_at_32x32():
    student, teacher = create("resnet8"), create("resnet20")
    d = build("review_kd", student, teacher, size=32)
    assert d.student_layers == ["stage1", "stage2", "stage3", "pool"]
    assert d.teacher_layers == ["stage1_preact", "stage2_preact", "stage3_preact", "pool"]
    assert d.teacher_shapes == [(16, 32, 32), (32, 16, 16), (64, 8, 8), (64, 1, 1)]
    assert [abf.attention is not None for abf in d.abfs] == [True, True, True, False]
    assert all(abf.reduce[0].out_channels == 64 for abf in d.abfs)  # mid = min(512, 64)
    x = torch.randn(4, 3, 32, 32)
    feats = d.student_tap(x)[1]
    fused = d.fuse([feats[n] for n in d.student_layers])
    assert [tuple(f.shape) for f in fused] == [(4, 16, 32, 32), (4, 32, 16, 16), (4, 64, 8, 8), (4, 64, 1, 1)]
    _, teacher_feats = d.teacher_tap(x)
    assert (teacher_feats["stage1_preact"] < 0).any()  # before the ReLU
    out = d(batch_of(x), Step(5, 10, 50, 100))
    out.loss.backward()
    assert set(out.losses) == {"review", "ce"} and torch.isfinite(out.loss)


def test_abf_fast_path_matches_the_plain_form_and_attention_is_in_unit_interval():
    abf = ABF(8, 16, 12, fuse=True).double()  # float64: compare the two forms tightly
    with torch.no_grad():
        abf.attention.bias.normal_()
    for residual_size, out_size in [((4, 4), (8, 8)), ((1, 1), (8, 8)), ((3, 3), (8, 8)), ((8, 8), (16, 16))]:
        x = torch.randn(3, 8, 8, 8, dtype=torch.float64, requires_grad=True)
        r = torch.randn(3, 16, *residual_size, dtype=torch.float64, requires_grad=True)
        params = [x, r, abf.attention.weight, abf.reduce[0].weight, abf.output[0].weight]
        results = []
        for fn in (abf.forward, abf.reference_forward):
            out, res, att = fn(x, r, out_size)
            grads = torch.autograd.grad((out**2).sum() + res.sum() + att.sum(), params)
            results.append((out, res, att, grads))
        (o1, r1, a1, g1), (o2, r2, a2, g2) = results
        assert o1.shape == (3, 12, *out_size) and r1.shape == (3, 16, *out_size)
        assert a1.shape == (3, 2, 8, 8) and a1.min() >= 0 and a1.max() <= 1
        torch.testing.assert_close(o1, o2)
        torch.testing.assert_close(r1, r2)
        for u, v in zip(g1, g2):
            torch.testing.assert_close(u, v)
    y = torch.randn(2, 3, 2, 3)
    torch.testing.assert_close(nearest_resize(y, (4, 9)), F.interpolate(y, size=(4, 9), mode="nearest"))
    torch.testing.assert_close(nearest_resize(y, (3, 4)), F.interpolate(y, size=(3, 4), mode="nearest"))


def test_review_kd_gradients_reach_student_and_abfs_never_the_teacher():
    student, teacher = create("resnet8"), create("resnet20")
    d = build("review_kd", student, teacher, {"ce_weight": 0.0, "warmup_epochs": 0, "kl_weight": 0.5})
    out = d(batch_of(torch.randn(4, 3, 16, 16)), Step())
    assert set(out.losses) == {"review", "kl"}
    out.loss.backward()
    assert all(p.grad is not None for p in d.abfs.parameters())
    assert student.stage1[0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert d.extra_parameter_count() == sum(p.numel() for p in d.abfs.parameters())


def test_review_kd_value_by_hand_from_the_fused_maps():
    student, teacher = create("resnet8"), create("resnet20")
    d = build("review_kd", student, teacher, {"weight": 3.0, "warmup_epochs": 0})
    d.eval()
    x = torch.randn(2, 3, 16, 16)
    out = d(batch_of(x), Step())
    feats = d.student_tap(x)[1]
    fused = d.fuse([feats[n] for n in d.student_layers])
    t_feats = d.teacher_tap(x)[1]
    targets = [t_feats[n] for n in d.teacher_layers]
    targets[-1] = targets[-1].view(2, 64, 1, 1)
    expected = 3.0 * sum(hcl_by_hand(f.detach().numpy(), t.numpy()) for f, t in zip(fused, targets))
    assert out.losses["review"].item() == pytest.approx(expected, rel=1e-4)


def test_review_kd_trains_on_a_batch_of_one():
    """The pooled level is 1 x 1: a last batch of one sample must not break its BatchNorm."""
    d = build("review_kd", create("resnet8"), create("resnet20"))
    d.train()
    out = d(batch_of(torch.randn(1, 3, 16, 16)), Step())
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_review_kd_explicit_layers_and_mismatched_input_shape():
    student, teacher = create("resnet8"), create("resnet20")
    with pytest.raises(ConfigError, match="both"):
        build("review_kd", student, teacher, {"student_layers": ["stage2", "stage3"]})
    d = build(
        "review_kd",
        student,
        teacher,
        {"student_layers": ["stage2", "stage3"], "teacher_layers": ["stage2", "stage3"], "mid_channels": 8},
    )
    assert [abf.reduce[0].out_channels for abf in d.abfs] == [8, 8]
    d(batch_of(torch.randn(2, 3, 16, 16)), Step()).loss.backward()
    with pytest.raises(ConfigError, match="input_shape"):
        d(batch_of(torch.randn(2, 3, 32, 32)), Step())


# ----------------------------------------------------------------------------- all three, zoo pair
@pytest.mark.parametrize("method", ["review_kd", "fsp", "crosslayer"])
def test_forward_backward_resnet20_to_resnet8(method):
    student, teacher = create("resnet8"), create("resnet20")
    d = build(method, student, teacher, {"ce_weight": 1.0})
    d.train()
    out = d(batch_of(torch.randn(4, 3, 16, 16)), Step(1, 4, 5, 16))
    assert torch.isfinite(out.loss) and "ce" in out.losses and out.logits.shape == (4, 10)
    out.loss.backward()
    assert student.classifier.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not m.training for m in teacher.modules())
    assert METHODS.get(method).__doc__.strip()


# ----------------------------------------------------------------------------- recipes
def stage_configs(path):
    recipe = read_yaml(path)
    stages = stage_recipes(recipe, path.parent)
    run_dirs, configs = {}, {}
    for name, stage in stages.items():
        configs[name] = build_any_config(_substitute(stage, run_dirs, name))  # kind: train, gan or generate
        run_dirs[name] = Path("/runs") / name
    return configs


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_shipped_recipes_validate(name):
    configs = stage_configs(RECIPES / name)
    methods = [c.method.name for c in configs.values() if hasattr(c, "method")]  # GAN stages have none
    assert all(methods)  # every stage validated (build_any_config above) and names a method
    if name.startswith(("fsp", "crosslayer", "review_kd")):
        assert methods[0] == "ce"  # these recipes start by training their teacher(s)
    if name.startswith("crosslayer"):
        assert "crosslayer" in methods and "ensemble_kd" in methods
        distil = configs["distil"]
        assert distil.student.checkpoint == "/runs/hint/checkpoints/model_last.pt"
        assert len(distil.teachers) == 3 and distil.method.params()["aggregate"] == "logits"
        seeds = {configs[k].seed for k in configs if k.startswith("teacher")}
        assert len(seeds) == 3
    if name.startswith("fsp"):
        assert methods[1:3] == ["fsp", "ce"]
        assert configs["fsp_ce"].student.checkpoint == "/runs/fsp_hint/checkpoints/model_last.pt"


def test_crosslayer_digits_pipeline_runs_end_to_end(tmp_path):
    """Teachers -> cross-layer hint -> ensemble KD from the hinted student, 1 epoch each (~10 s)."""
    from kdforge.core.checkpoint import read_model_file
    from kdforge.engine.pipeline import run_pipeline
    from kdforge.engine.trainer import Trainer

    def train(config, out, resume=False):
        return Trainer(config, out, resume=resume).fit()

    path = RECIPES / "crosslayer_two_stage.yaml"
    overrides = ["train.epochs=1", "data.train_subset=64", "train.progress=none"]
    stages = ["teacher_a", "teacher_b", "teacher_c", "hint", "distil"]
    summaries = run_pipeline(read_yaml(path), path.parent, tmp_path, overrides, train, only=stages)
    assert list(summaries) == stages and all(s["status"] == "finished" for s in summaries.values())
    assert summaries["hint"]["method"] == "crosslayer" and summaries["hint"]["extra_parameters"] > 0
    hint = read_model_file(tmp_path / "hint" / "checkpoints" / "model_last.pt")
    fresh = create("resnet", num_classes=10, in_channels=1, depth=8, width_multiplier=0.5)
    assert set(hint["state_dict"]) == set(fresh.state_dict())  # the student only: adapters dropped
    assert summaries["distil"]["method"] == "ensemble_kd"


# ----------------------------------------------------------------------------- in-run second stage
@pytest.mark.parametrize("method", ["fsp", "crosslayer"])
def test_hint_epochs_switch_to_the_second_stage(method):
    torch.manual_seed(0)
    student, teachers = create("resnet8", 10), [create("resnet20", 10), create("resnet20", 10)]
    if method == "fsp":
        teachers = teachers[:1]
    params = {"hint_epochs": 2, "kd_weight": 0.9 if method == "crosslayer" else 0.0, "temperature": 4.0}
    d = METHODS.get(method)(student, teachers, params, input_shape=(3, 16, 16))
    x = torch.randn(6, 3, 16, 16)
    batch = batch_of(x)
    hint = d(batch, Step(epoch=1, epochs=5))
    assert set(hint.losses) == {method}  # ce_weight 0: the hint loss alone
    second = d(batch, Step(epoch=2, epochs=5))
    ce = F.cross_entropy(student(x), batch.targets)
    assert second.losses["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    if method == "crosslayer":
        with torch.no_grad():
            mean = torch.stack([t(x) for t in teachers]).mean(0)
        kl = F.kl_div(F.log_softmax(student(x) / 4, 1), F.softmax(mean / 4, 1), reduction="batchmean") * 16
        assert second.losses["kd"].item() == pytest.approx(0.9 * kl.item(), rel=1e-4)
        # the adapters get no gradient in the second stage; the student does
        second.loss.backward()
        assert all(a.weight.grad is None for a in d.adapters)
        assert student.classifier.weight.grad is not None
    else:
        assert set(second.losses) == {"ce"}


def test_fsp_takes_one_teacher_and_crosslayer_several():
    student = create("resnet8", 10)
    with pytest.raises(ValueError, match="needs 1 teacher"):
        METHODS.get("fsp")(student, [create("resnet20", 10)] * 2, {}, input_shape=(3, 16, 16))

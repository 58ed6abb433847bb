"""DKD and the feature methods (AT, FitNet, RKD, PKT, SP): losses pinned against independent
formulas (plain Python / numpy loops), the properties each loss must have, gradient routing, and a
forward/backward on real zoo pairs and on a user-written student."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import batch_of
from torch import nn

import kdforge.methods.at  # noqa: F401  (registration)
import kdforge.methods.dkd  # noqa: F401
import kdforge.methods.fitnet  # noqa: F401
import kdforge.methods.pkt  # noqa: F401
import kdforge.methods.rkd  # noqa: F401
import kdforge.methods.sp  # noqa: F401
from kdforge.core.errors import ConfigError
from kdforge.methods.at import at_loss
from kdforge.methods.base import METHODS, Step
from kdforge.methods.common import warmup_factor
from kdforge.methods.dkd import dkd_terms
from kdforge.methods.features import resolve_layers
from kdforge.methods.fitnet import HintRegressor
from kdforge.methods.losses import kd_loss
from kdforge.methods.pkt import pkt_loss
from kdforge.methods.rkd import rkd_losses
from kdforge.methods.sp import sp_loss
from kdforge.models import FeatureTap, create

FEATURE_METHODS = ["at", "fitnet", "rkd", "pkt", "sp"]
ALL_METHODS = ["dkd", *FEATURE_METHODS]


def zoo_batch(n=4, classes=10):
    return batch_of(torch.randn(n, 3, 16, 16), torch.arange(n) % classes)


def build(method, student, teacher, params=None):
    kwargs = {"input_shape": (3, 16, 16)} if method == "fitnet" else {}
    return METHODS.get(method)(student, [teacher], params or {}, **kwargs)


class Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits


class Custom(nn.Module):
    """A user network without feature_points: layers are named by module name."""

    def __init__(self, width=8, classes=10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.fc(self.head(self.body(x)))


# ----------------------------------------------------------------------------- DKD
def softmax(v, T):
    e = [math.exp(x / T) for x in v]
    return [x / sum(e) for x in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def dkd_by_hand(zs, zt, y, T):
    """TCKD and NCKD straight from the definitions, in probability space."""
    ps, pt = softmax(zs, T), softmax(zt, T)
    tckd = kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
    qs = [p / (1 - ps[y]) for c, p in enumerate(ps) if c != y]
    qt = [p / (1 - pt[y]) for c, p in enumerate(pt) if c != y]
    return tckd, kl(qt, qs)


def test_dkd_terms_match_hand_computation():
    zs = [[1.0, 2.0, 0.0, -1.0], [0.5, -0.5, 3.0, 1.0]]
    zt = [[3.0, 0.0, 1.0, -2.0], [0.0, 1.0, 2.0, 2.5]]
    y = [0, 3]
    tckd, nckd = dkd_terms(torch.tensor(zs), torch.tensor(zt), torch.tensor(y), 2.0)
    for i in range(2):
        t, n = dkd_by_hand(zs[i], zt[i], y[i], 2.0)
        assert tckd[i].item() == pytest.approx(t, rel=1e-5)
        assert nckd[i].item() == pytest.approx(n, rel=1e-5)


def test_dkd_method_total_loss_by_hand():
    zs, zt, y, T = [[1.0, 2.0, 0.0]], [[2.0, 0.0, 1.0]], [1], 4.0
    d = METHODS.get("dkd")(Fixed(zs), [Fixed(zt)], {"alpha": 1.0, "beta": 8.0, "warmup_epochs": 20})
    out = d(batch_of(torch.zeros(1, 1), y), Step(epoch=4, epochs=240))  # mdistiller's epoch 5: 5/20
    t, n = dkd_by_hand(zs[0], zt[0], y[0], T)
    ce = -math.log(softmax(zs[0], 1.0)[1])
    assert out.loss.item() == pytest.approx(ce + 0.25 * T * T * (t + 8 * n), rel=1e-5)
    assert set(out.losses) == {"ce", "tckd", "nckd"}
    assert float(out.metrics["dkd_warmup"]) == pytest.approx(0.25)


def test_dkd_decomposes_classical_kd():
    """KD = TCKD + (1 - p^t_y) NCKD (the paper's eq. 5)."""
    zs, zt, y = torch.randn(6, 7) * 3, torch.randn(6, 7) * 3, torch.randint(0, 7, (6,))
    tckd, nckd = dkd_terms(zs, zt, y, 3.0)
    pty = F.softmax(zt / 3.0, -1).gather(1, y[:, None]).squeeze(1)
    kd = kd_loss(zs, zt, 3.0, reduction="none") / 9.0
    assert torch.allclose(tckd + (1 - pty) * nckd, kd, atol=1e-5)


def test_dkd_is_zero_for_identical_logits():
    z, y = torch.randn(5, 10) * 4, torch.randint(0, 10, (5,))
    tckd, nckd = dkd_terms(z, z.clone(), y, 4.0)
    assert tckd.abs().max().item() < 1e-6 and nckd.abs().max().item() < 1e-6


@pytest.mark.parametrize(
    "zs, zt, y",
    [
        ([[1.0, -1.0], [0.0, 2.0]], [[3.0, 0.0], [-1.0, 1.0]], [0, 1]),  # two classes
        ([[1e4, -1e4]], [[-1e4, 1e4]], [0]),  # two classes, saturated both ways
        ([[200.0, 0.0, 0.0]], [[200.0, 1.0, 0.0]], [0]),  # p_y rounds to 1 for both nets
        ([[0.0, 0.0, 0.0]], [[500.0, -500.0, 3.0]], [0]),
        ([[-1e4, 1e4, 0.0]], [[1e4, -1e4, 0.0]], [1]),
    ],
)
def test_dkd_is_finite_for_two_classes_and_extreme_logits(zs, zt, y):
    student = Fixed(zs)
    d = METHODS.get("dkd")(student, [Fixed(zt)], {"warmup_epochs": 0})
    out = d(batch_of(torch.zeros(len(y), 1), y), Step())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(student.logits.grad).all()
    if len(zs[0]) == 2:  # one non-target class: NCKD is 0, TCKD is the whole KD
        assert out.losses["nckd"].item() == 0.0
        if abs(zs[0][0]) < 100:
            expected = kd_loss(student.logits.detach(), torch.tensor(zt), 4.0).item()
            assert out.losses["tckd"].item() == pytest.approx(expected, rel=1e-5)


def test_dkd_warmup():
    # fractional within an epoch when the step count is known (10 steps per epoch)
    assert warmup_factor(Step(0, 240, 0, 2400), 20) == pytest.approx(0.1 / 20)
    assert warmup_factor(Step(9, 240, 99, 2400), 20) == pytest.approx(0.5)
    assert warmup_factor(Step(30, 240, 305, 2400), 20) == 1.0
    # epoch only: mdistiller's 1-based epoch / warm-up
    assert warmup_factor(Step(epoch=0, epochs=240), 20) == pytest.approx(1 / 20)
    assert warmup_factor(Step(epoch=19, epochs=240), 20) == 1.0
    assert warmup_factor(Step(), 0) == 1.0


# ----------------------------------------------------------------------------- loss formulas
def np_attention(f):
    a = (np.asarray(f, dtype=np.float64) ** 2).mean(1).reshape(f.shape[0], -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_at_loss_matches_numpy_and_pools_the_larger_map():
    fs, ft = torch.randn(3, 5, 4, 4), torch.randn(3, 7, 4, 4)
    expected = ((np_attention(fs.numpy()) - np_attention(ft.numpy())) ** 2).mean()
    assert at_loss(fs, ft).item() == pytest.approx(expected, rel=1e-5)
    big = torch.randn(3, 5, 8, 8)
    pooled = big.numpy().reshape(3, 5, 4, 2, 4, 2).mean((3, 5))  # 2x2 average pooling by hand
    expected = ((np_attention(pooled) - np_attention(ft.numpy())) ** 2).mean()
    assert at_loss(big, ft).item() == pytest.approx(expected, rel=1e-5)
    assert at_loss(ft, big).item() == pytest.approx(expected, rel=1e-5)


def test_sp_loss_matches_loops():
    fs, ft = torch.randn(4, 3, 2, 2), torch.randn(4, 6, 3, 3)
    a, b = fs.flatten(1).double().numpy(), ft.flatten(1).double().numpy()
    total = 0.0
    gs, gt = a @ a.T, b @ b.T
    for i in range(4):
        rs, rt = gs[i] / np.linalg.norm(gs[i]), gt[i] / np.linalg.norm(gt[i])
        total += sum((rs[j] - rt[j]) ** 2 for j in range(4))
    assert sp_loss(fs, ft).item() == pytest.approx(total / 16, rel=1e-5)


def test_pkt_loss_matches_loops():
    fs, ft, eps = torch.randn(5, 4), torch.randn(5, 9), 1e-7
    a, b = fs.double().numpy(), ft.double().numpy()

    def probs(f):
        k = np.array(
            [[(1 + f[i] @ f[j] / np.linalg.norm(f[i]) / np.linalg.norm(f[j])) / 2 for j in range(5)] for i in range(5)]
        )
        return k / k.sum(1, keepdims=True)

    ps, pt = probs(a), probs(b)
    expected = sum(pt[i, j] * math.log((pt[i, j] + eps) / (ps[i, j] + eps)) for i in range(5) for j in range(5)) / 25
    assert pkt_loss(fs, ft).item() == pytest.approx(expected, rel=1e-4)


def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def test_rkd_losses_match_loops():
    B = 5
    fs, ft = torch.randn(B, 3), torch.randn(B, 6) * 4
    s, t = fs.double().numpy(), ft.double().numpy()

    def dists(e):
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(B)] for i in range(B)])
        return d / d[d > 0].mean()

    def unit(v):
        n = np.linalg.norm(v)
        return v / n if n > 0 else v * 0

    def angle(e, i, j, k):  # angle at vertex i between j and k
        return unit(e[j] - e[i]) @ unit(e[k] - e[i])

    ds, dt = dists(s), dists(t)
    l_d = sum(huber(ds[i, j] - dt[i, j]) for i in range(B) for j in range(B)) / B**2
    l_a = sum(huber(angle(s, i, j, k) - angle(t, i, j, k)) for i in range(B) for j in range(B) for k in range(B)) / B**3
    distance, ang = rkd_losses(fs, ft)
    assert distance.item() == pytest.approx(l_d, rel=1e-5)
    assert ang.item() == pytest.approx(l_a, rel=1e-5)
    # relations are invariant to scaling and translating the teacher's embedding
    d2, a2 = rkd_losses(fs, ft * 7 + 3)
    assert d2.item() == pytest.approx(l_d, rel=1e-4) and a2.item() == pytest.approx(l_a, rel=1e-4)


def test_rkd_handles_coinciding_points():
    fs = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    distance, angle = rkd_losses(fs, torch.randn(3, 4))
    (distance + angle).backward()
    assert torch.isfinite(fs.grad).all()


# ----------------------------------------------------------------------------- method wiring
@pytest.mark.parametrize("method", ["at", "rkd", "pkt", "sp"])
def test_feature_loss_is_zero_when_student_equals_teacher(method):
    student = create("resnet8", num_classes=10)
    d = build(method, student, copy.deepcopy(student))
    d.eval()  # both nets use running BN statistics: identical features
    out = d(zoo_batch(), Step())
    for name, value in out.losses.items():
        if name != "ce":
            assert abs(value.item()) < 1e-6, name


@pytest.mark.parametrize(
    "method, layers, reached, untouched",
    [
        ("at", ["stage1"], ["stem", "stage1"], ["stage2", "stage3", "classifier"]),
        ("fitnet", ["stage2"], ["stem", "stage2", "regressors"], ["stage3", "classifier"]),
        ("sp", ["stage2"], ["stage1", "stage2"], ["stage3", "classifier"]),
        ("pkt", ["pool"], ["stem", "stage3"], ["classifier"]),
        ("rkd", ["pool"], ["stem", "stage3"], ["classifier"]),
    ],
)
def test_gradient_reaches_exactly_the_tapped_path(method, layers, reached, untouched):
    teacher = create("resnet20", num_classes=10)
    d = build(method, create("resnet8", num_classes=10), teacher, {"ce_weight": 0, "student_layers": layers})
    d.train()
    out = d(zoo_batch(), Step())
    assert set(out.losses) == (
        {"rkd_distance", "rkd_angle"}
        if method == "rkd"
        else {"at": {"at"}, "fitnet": {"hint"}, "sp": {"sp"}, "pkt": {"pkt"}}[method]
    )
    out.loss.backward()
    grads = {name: p.grad for name, p in d.named_parameters() if not name.startswith("teachers.")}
    for prefix in reached:
        assert any(
            g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith((prefix, f"student.{prefix}"))
        ), prefix
    for prefix in untouched:
        assert all(g is None for n, g in grads.items() if n.startswith(f"student.{prefix}")), prefix
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("method", ALL_METHODS)
def test_zoo_pair_forward_backward(method):
    teacher, student = create("resnet20", num_classes=10), create("resnet8", num_classes=10)
    running = [b.running_mean.clone() for b in teacher.modules() if isinstance(b, nn.BatchNorm2d)]
    d = build(method, student, teacher)
    d.train()
    assert not teacher.training
    out = d(zoo_batch(), Step(epoch=30, epochs=240))
    assert out.logits.shape == (4, 10) and torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    after = [b.running_mean for b in teacher.modules() if isinstance(b, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(running, after))  # teacher BN statistics frozen
    expected_extra = sum(p.numel() for p in d.regressors.parameters()) if method == "fitnet" else 0
    assert d.extra_parameter_count() == expected_extra


CUSTOM_LAYERS = {
    "at": (["body.2", "body.4"], ["stage1", "stage2"]),
    "fitnet": (["body.4"], ["stage3"]),
    "rkd": (["head"], ["pool"]),
    "pkt": (["head"], ["pool"]),
    "sp": (["body.4"], ["last_stage"]),
}


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_custom_student_with_explicit_layer_names(method):
    student_layers, teacher_layers = CUSTOM_LAYERS[method]
    student = Custom()
    d = build(
        method,
        student,
        create("resnet20", num_classes=10),
        {"student_layers": student_layers, "teacher_layers": teacher_layers},
    )
    out = d(zoo_batch(), Step())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    if method == "fitnet":  # student 8x8 -> teacher stage3 4x4
        assert d.regressors[0].kind == "conv3x3_stride2"


def test_method_loss_equals_the_formula_on_tapped_features():
    teacher, student = create("resnet20", num_classes=10), create("resnet8", num_classes=10)
    b = zoo_batch()
    d = build("at", student, teacher)
    d.eval()
    out = d(b, Step())
    with (
        torch.no_grad(),
        FeatureTap(student, ["stage1", "stage2", "stage3"]) as ts,
        FeatureTap(teacher, ["stage1", "stage2", "stage3"]) as tt,
    ):
        logits, fs = ts(b.image)
        _, ft = tt(b.image)
        expected = 1000 * sum(at_loss(fs[k], ft[k]).item() for k in fs)
    assert out.losses["at"].item() == pytest.approx(expected, rel=1e-5)
    assert out.losses["ce"].item() == pytest.approx(F.cross_entropy(logits, b.targets).item(), rel=1e-5)


# ----------------------------------------------------------------------------- FitNet regressor
@pytest.mark.parametrize(
    "s_shape, t_shape, kind, count",
    [
        ((32, 8, 8), (64, 8, 8), "conv1x1", 32 * 64 + 2 * 64),  # equal sizes: 1x1 as RepDistiller
        ((16, 16, 16), (32, 8, 8), "conv3x3_stride2", 16 * 32 * 9 + 2 * 32),
        ((32, 8, 8), (16, 16, 16), "deconv4x4_stride2", 32 * 16 * 16 + 2 * 16),
        ((16, 16, 16), (64, 4, 4), "pool_conv1x1", 16 * 64 + 2 * 64),
        ((16, 4, 4), (64, 12, 12), "pool_conv1x1", 16 * 64 + 2 * 64),
        ((16, 6, 8), (8, 3, 4), "conv3x3_stride2", 16 * 8 * 9 + 2 * 8),
        ((64,), (256,), "linear", 64 * 256 + 2 * 256),
    ],
)
def test_fitnet_regressor_choice(s_shape, t_shape, kind, count):
    reg = HintRegressor(s_shape, t_shape)
    assert reg.kind == kind
    assert sum(p.numel() for p in reg.parameters()) == count
    assert reg(torch.randn(2, *s_shape)).shape == (2, *t_shape)


def test_fitnet_same_size_kernel_and_errors():
    assert HintRegressor((8, 4, 4), (8, 4, 4), same_size_kernel=3).kind == "conv3x3"  # the former default
    assert (
        sum(p.numel() for p in HintRegressor((8, 4, 4), (8, 4, 4), same_size_kernel=3).parameters()) == 8 * 8 * 9 + 16
    )
    assert METHODS.get("fitnet").Params().same_size_kernel == 1
    with pytest.raises(ConfigError, match="odd"):
        HintRegressor((8, 4, 4), (8, 4, 4), same_size_kernel=2)
    with pytest.raises(ConfigError, match="cannot regress"):
        HintRegressor((8, 4, 4), (8,))


def test_fitnet_builds_from_shapes_and_counts_the_regressor():
    student, teacher = create("resnet8", num_classes=10), create("resnet8x4", num_classes=10)
    student.train()
    stats = [b.running_mean.clone() for b in student.modules() if isinstance(b, nn.BatchNorm2d)]
    d = METHODS.get("fitnet")(
        student, [teacher], {"student_layers": ["stage1"], "teacher_layers": ["stage2"]}, input_shape=(3, 16, 16)
    )
    assert student.training  # the shape probe restores the mode...
    after = [b.running_mean for b in student.modules() if isinstance(b, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(stats, after))  # ...and leaves BN statistics alone
    assert d.regressors[0].kind == "conv3x3_stride2"  # 16x16x16 -> 128x8x8
    assert d.extra_parameter_count() == 16 * 128 * 9 + 2 * 128
    b = zoo_batch()
    out = d(b, Step())
    with torch.no_grad(), FeatureTap(student, "stage1") as ts, FeatureTap(teacher, "stage2") as tt:
        _, fs = ts(b.image)
        _, ft = tt(b.image)
        expected = 100 * F.mse_loss(d.regressors[0](fs["stage1"]), ft["stage2"]).item()
    assert out.losses["hint"].item() == pytest.approx(expected, rel=1e-5)
    # default: the hint is stage2 of both; resnet8 -> resnet8x4 maps 32 to 128 channels at 8x8
    d2 = METHODS.get("fitnet")(student, [teacher], input_shape=(3, 16, 16))
    assert d2.regressors[0].kind == "conv1x1" and d2.regressors[0].teacher_shape == (128, 8, 8)  # RepDistiller's


def test_fitnet_input_shape_mismatch_is_a_clear_error():
    d = METHODS.get("fitnet")(create("resnet8"), [create("resnet20")])  # guessed (3, 32, 32)
    assert d.input_shape == (3, 32, 32)
    with pytest.raises(ConfigError, match="input_shape"):
        d(zoo_batch(), Step())  # 16x16 data
    mlp, teacher = create("mlp", input_size=(16, 16), hidden=[32]), create("resnet8")
    d = METHODS.get("fitnet")(mlp, [teacher], {"student_layers": ["pool"], "teacher_layers": ["pool"]})
    assert d.input_shape == (3, 16, 16) and d.regressors[0].kind == "linear"


# ----------------------------------------------------------------------------- configuration
def test_layer_configuration_errors_and_last_stage():
    assert resolve_layers(create("resnet8"), ["last_stage", "pool"]) == ["stage3", "pool"]
    assert resolve_layers(create("lenet"), ["last_stage"]) == ["stage2"]
    with pytest.raises(ConfigError, match="last_stage"):
        resolve_layers(Custom(), ["last_stage"])
    with pytest.raises(ConfigError, match="paired"):
        build("at", create("resnet8"), create("resnet20"), {"teacher_layers": ["stage3"]})
    with pytest.raises(ConfigError, match="stage7"):
        build("sp", create("resnet8"), create("resnet20"), {"student_layers": ["stage7"]})
    with pytest.raises(ConfigError, match="feature maps"):
        build("at", create("resnet8"), create("resnet20"), {"student_layers": ["pool"]})(zoo_batch(), Step())
    with pytest.raises(ValueError, match="needs 1 teacher"):
        METHODS.get("dkd")(create("resnet8"), [])
    with pytest.raises(ValueError):
        METHODS.get("rkd")(create("resnet8"), [create("resnet8")], {"distance_weight": 1, "bogus": 2})


def test_registered_with_paper_defaults():
    defaults = {
        "dkd": {"temperature": 4.0, "alpha": 1.0, "beta": 8.0, "ce_weight": 1.0, "warmup_epochs": 20.0},
        "at": {"weight": 1000.0, "p": 2.0, "student_layers": ["stage1", "stage2", "stage3"]},
        "fitnet": {"weight": 100.0, "student_layers": ["stage2"]},
        "rkd": {"weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0, "student_layers": ["pool"]},
        "pkt": {"weight": 30000.0, "student_layers": ["pool"]},
        "sp": {"weight": 3000.0, "student_layers": ["last_stage"]},
    }
    for name, expected in defaults.items():
        cls = METHODS.get(name)
        assert cls.teachers_required == (1, 1)
        assert cls.__doc__.splitlines()[0]
        params = cls.Params().model_dump()
        for key, value in expected.items():
            assert params[key] == value, (name, key)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_losses_stay_float32_under_autocast(method):
    d = build(method, create("resnet8", num_classes=10), create("resnet20", num_classes=10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d(zoo_batch(), Step(epoch=30, epochs=240))
    for name, value in out.losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
    out.loss.backward()

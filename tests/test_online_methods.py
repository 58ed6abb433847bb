"""Online methods (DML, ONE, CL-ILR): losses pinned against independent computations, gradient
routing, deployable branches, and a short end-to-end run of each."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import batch_of
from torch import nn

import kdforge.methods.online as online
from kdforge.config import build_config
from kdforge.core.errors import ConfigError
from kdforge.engine.trainer import Trainer
from kdforge.methods.base import METHODS, Step
from kdforge.models import create

SHAPE = (3, 8, 8)


class Fixed(nn.Module):
    """A 'network' that returns given logits (no reset_parameters, so fresh_copy keeps them)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits


def ref_kl(target_logits, student_logits, T):
    """T^2 * mean_b sum_c p_t log(p_t / p_s), with explicit loops over samples and classes."""
    total = 0.0
    for zt, zs in zip(target_logits.tolist(), student_logits.tolist()):
        et = [math.exp(v / T) for v in zt]
        es = [math.exp(v / T) for v in zs]
        pt = [v / sum(et) for v in et]
        ps = [v / sum(es) for v in es]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return T * T * total / len(target_logits)


def ref_ce(logits, y):
    total = 0.0
    for z, label in zip(logits.tolist(), list(y)):
        total += math.log(sum(math.exp(v) for v in z)) - z[label]
    return total / len(logits)


def resnet8(seed=0):
    torch.manual_seed(seed)
    return create("resnet8", 10, in_channels=3, input_size=SHAPE[1:])


def images(seed=1, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)


# --------------------------------------------------------------------------- DML
A = [[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]]
B = [[0.5, 0.0, 2.0], [1.0, 1.0, -1.0]]


def dml_with(a, b, **params):
    d = METHODS.get("dml")(Fixed(a), [], params)
    d.others[0].logits.data = torch.tensor(b)
    return d


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_dml_loss_pinned(T):
    d = dml_with(A, B, temperature=T)
    y = [1, 2]
    out = d(batch_of(torch.zeros(2, 1), y), Step())
    za, zb = torch.tensor(A), torch.tensor(B)
    assert out.losses["ce"].item() == pytest.approx(ref_ce(za, y) + ref_ce(zb, y), rel=1e-5)
    assert out.losses["kl"].item() == pytest.approx(ref_kl(zb, za, T) + ref_kl(za, zb, T), rel=1e-5)
    # diversity: per-sample L2 distance between the two softmax outputs, averaged
    pa, pb = F.softmax(za, -1), F.softmax(zb, -1)
    expected = sum(math.sqrt(sum((u - v) ** 2 for u, v in zip(r, s))) for r, s in zip(pa.tolist(), pb.tolist())) / 2
    assert float(out.metrics["diversity"]) == pytest.approx(expected, rel=1e-5)


def test_dml_three_peers_average_the_kl_over_the_others():
    logits = [torch.randn(4, 5) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3])
    _, kl = online.mutual_losses(logits, y, 2.0)
    for k in range(3):
        others = [ref_kl(logits[l], logits[k], 2.0) for l in range(3) if l != k]  # noqa: E741
        assert kl[k].item() == pytest.approx(sum(others) / 2, rel=1e-5)


def test_dml_kl_is_zero_for_identical_peers():
    d = METHODS.get("dml")(Fixed(A), [], {"peers": 3})
    out = d(batch_of(torch.zeros(2, 1), [0, 1]), Step())
    assert abs(out.losses["kl"].item()) < 1e-6
    assert float(out.metrics["diversity"]) < 1e-6


def test_dml_detached_targets_route_gradients_to_their_own_peer_only():
    z0 = torch.tensor(A, requires_grad=True)
    z1 = torch.tensor(B, requires_grad=True)
    y = torch.tensor([1, 2])
    ce, kl = online.mutual_losses([z0, z1], y, 1.0, detach_targets=True)
    (ce[1] + kl[1]).backward()
    assert z0.grad is None and z1.grad is not None and z1.grad.abs().sum() > 0
    # without detaching, peer 1's loss also moves peer 0
    z0 = torch.tensor(A, requires_grad=True)
    z1 = torch.tensor(B, requires_grad=True)
    ce, kl = online.mutual_losses([z0, z1], y, 1.0, detach_targets=False)
    (ce[1] + kl[1]).backward()
    assert z0.grad is not None and z0.grad.abs().sum() > 0


def test_dml_total_gradient_matches_the_analytic_one():
    T = 2.0
    d = dml_with(A, B, temperature=T)
    y = torch.tensor([1, 2])
    d(batch_of(torch.zeros(2, 1), y), Step()).loss.backward()
    za, zb = torch.tensor(A), torch.tensor(B)
    # d/dz_a [CE(z_a) + T^2 KL(p_b^T || p_a^T)] = (p_a - onehot)/B + T (p_a^T - p_b^T)/B
    expected = (F.softmax(za, -1) - F.one_hot(y, 3)) / 2 + T * (F.softmax(za / T, -1) - F.softmax(zb / T, -1)) / 2
    assert torch.allclose(d.student.logits.grad, expected, atol=1e-6)


def test_dml_peers_members_and_extra_parameters():
    d = METHODS.get("dml")(resnet8(), [], {"peers": 3, "deploy": 1})
    assert d.inference_model() is d.others[0]
    members = d.evaluation_models()
    assert list(members) == ["peer0", "peer1", "peer2", "ensemble"]
    x, _ = images()
    d.eval()
    with torch.no_grad():
        mean = torch.stack([members[f"peer{i}"](x) for i in range(3)]).mean(0)
        assert torch.allclose(members["ensemble"](x), mean, atol=1e-6)
    # the copies are independent re-initialisations
    assert not torch.equal(d.student.stem.conv.weight, d.others[0].stem.conv.weight)
    total = sum(p.numel() for p in d.parameters() if p.requires_grad)
    deployed = sum(p.numel() for p in d.inference_model().parameters())
    assert d.extra_parameter_count() == total - deployed == 2 * deployed


def test_consistency_rampup():
    assert online.consistency_rampup(0, 0) == 1.0
    assert online.consistency_rampup(0, 80) == pytest.approx(math.exp(-5))
    assert online.consistency_rampup(40, 80) == pytest.approx(math.exp(-5 * 0.25))
    assert online.consistency_rampup(100, 80) == 1.0
    d = METHODS.get("dml")(Fixed(A), [], {"rampup_epochs": 4})
    d.others[0].logits.data = torch.tensor(B)
    full = METHODS.get("dml")(Fixed(A), [], {})
    full.others[0].logits.data = torch.tensor(B)
    b = batch_of(torch.zeros(2, 1), [0, 1])
    ramped = d(b, Step(epoch=2, epochs=10)).losses["kl"].item()
    assert ramped == pytest.approx(full(b, Step()).losses["kl"].item() * math.exp(-5 * 0.25), rel=1e-5)


# --------------------------------------------------------------------------- ONE
def make(name, seed=0, **params):
    params.setdefault("rampup_epochs", 0)
    return METHODS.get(name)(resnet8(seed), [], params, input_shape=SHAPE)


@pytest.mark.parametrize("detach", [False, True])
def test_one_loss_pinned(detach):
    d = make("one", temperature=3.0, kd_weight=0.5, detach_targets=detach)
    x, y = images()
    out = d(batch_of(x, y), Step())
    with torch.no_grad():
        net = d.network
        shared = net.run_trunk(x)
        logits = [net.run_head(i, shared)[1] for i in range(3)]
        # gate written out: GAP -> Linear -> BN (batch statistics) -> ReLU -> softmax
        h = shared.mean(dim=(2, 3)) @ d.gate.fc.weight.T + d.gate.fc.bias
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + d.gate.bn.eps) * d.gate.bn.weight + d.gate.bn.bias
        g = F.softmax(h.clamp_min(0), dim=-1)
        ze = sum(g[:, i : i + 1] * logits[i] for i in range(3))
    assert out.losses["ce"].item() == pytest.approx(sum(ref_ce(z, y) for z in logits), rel=1e-5)
    assert out.losses["ce_ensemble"].item() == pytest.approx(ref_ce(ze, y), rel=1e-5)
    expected_kl = 0.5 * sum(ref_kl(ze, z, 3.0) for z in logits)
    assert out.losses["kl"].item() == pytest.approx(expected_kl, rel=1e-4)
    assert torch.allclose(out.logits, logits[0], atol=1e-5)


def test_one_gate_sums_to_one_and_handles_vectors():
    d = make("one")
    x, _ = images()
    g = d.gate(d.network.run_trunk(x))
    assert g.shape == (6, 3) and (g >= 0).all()
    assert torch.allclose(g.sum(-1), torch.ones(6), atol=1e-6)
    gate = online.BranchGate(5, 4)
    assert torch.allclose(gate(torch.randn(6, 5)).sum(-1), torch.ones(6), atol=1e-6)
    with pytest.raises(ConfigError, match="split_at"):
        online.pooled_vector(torch.randn(2, 3, 4, 4, 4))


def test_one_gate_learns_from_kl_only_when_targets_are_not_detached():
    x, y = images()
    for detach, reaches in ((True, False), (False, True)):
        d = make("one", detach_targets=detach)
        d(batch_of(x, y), Step()).losses["kl"].backward()
        grad = d.gate.fc.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == reaches
        # every branch and the trunk receive the KL gradient either way
        for head in d.network.heads:
            assert head["classifier"].weight.grad.abs().sum() > 0


def test_one_gate_width_for_mlp_trunk_and_without_input_shape():
    mlp = create("mlp", 10, in_channels=1, input_size=(8, 8), hidden=[16, 12])
    d = METHODS.get("one")(mlp, [], {"split_at": "stage2"}, input_shape=(1, 8, 8))
    assert d.gate.fc.in_features == 12
    out = d(batch_of(torch.randn(4, 1, 8, 8), [0, 1, 2, 3]), Step())
    assert out.logits.shape == (4, 10)
    # without input_shape the zoo model's stage widths size the gate
    d = METHODS.get("one")(resnet8(), [], {"split_at": "stage2"})
    assert d.gate.fc.in_features == 32


# --------------------------------------------------------------------------- CL-ILR
@pytest.mark.parametrize("branches", [2, 4])
def test_cl_ilr_loss_pinned(branches):
    d = make("cl_ilr", branches=branches, temperature=3.0, kd_weight=1.0)
    x, y = images()
    out = d(batch_of(x, y), Step())
    with torch.no_grad():
        shared = d.network.run_trunk(x)
        logits = [d.network.run_head(i, shared)[1] for i in range(branches)]
    expected_kl = 0.0
    for i in range(branches):
        target = torch.zeros_like(logits[0])
        for j in range(branches):
            if j != i:
                target += logits[j]
        expected_kl += ref_kl(target / (branches - 1), logits[i], 3.0)
    assert out.losses["ce"].item() == pytest.approx(sum(ref_ce(z, y) for z in logits), rel=1e-5)
    assert out.losses["kl"].item() == pytest.approx(expected_kl, rel=1e-4)


def test_cl_ilr_backprop_rescaling_divides_the_trunk_gradient():
    x, y = images()
    scaled = make("cl_ilr", branches=4, backprop_scaling=True)
    plain = make("cl_ilr", branches=4, backprop_scaling=False)
    plain.load_state_dict(scaled.state_dict())
    for d in (scaled, plain):
        d(batch_of(x, y), Step()).loss.backward()
    for name in scaled.network.trunk_names:
        for (pn, a), (_, b) in zip(
            scaled.network.trunk[name].named_parameters(), plain.network.trunk[name].named_parameters()
        ):
            assert torch.allclose(a.grad, b.grad / 4, rtol=1e-4, atol=1e-7), (name, pn)
    for a, b in zip(scaled.network.heads.parameters(), plain.network.heads.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_cl_ilr_detached_targets_keep_other_branches_out_of_a_branch_kl():
    for detach in (True, False):
        logits = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
        kl = online.leave_one_out_kl(logits, 3.0, detach_targets=detach)
        kl[0].backward()
        assert logits[0].grad.abs().sum() > 0
        for other in logits[1:]:
            assert (other.grad is not None and other.grad.abs().sum() > 0) == (not detach)


# --------------------------------------------------------------------------- shared
@pytest.mark.parametrize("name", ["one", "cl_ilr"])
def test_deployed_branch_loads_into_the_zoo_model(name):
    d = make(name, deploy=1)
    x, y = images()
    d.train()
    d(batch_of(x, y), Step())  # move BN statistics away from their initial values
    deployed = d.inference_model()
    zoo = create("resnet8", 10, in_channels=3, input_size=SHAPE[1:])
    assert list(deployed.state_dict()) == list(zoo.state_dict())
    zoo.load_state_dict(deployed.state_dict())
    d.eval()
    zoo.eval()
    with torch.no_grad():
        assert torch.allclose(zoo(x), deployed(x), atol=1e-6)
        assert torch.allclose(zoo(x), d.network.run_head(1, d.network.run_trunk(x))[1], atol=1e-6)
    members = d.evaluation_models()
    assert list(members) == ["branch0", "branch1", "branch2", "ensemble"]
    total = sum(p.numel() for p in d.parameters() if p.requires_grad)
    assert d.extra_parameter_count() == total - sum(p.numel() for p in deployed.parameters())


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("dml", {"peers": 1}, "method.peers"),
        ("dml", {"deploy": 2}, "method.deploy"),
        ("one", {"branches": 1}, "method.branches"),
        ("cl_ilr", {"deploy": 3}, "method.deploy"),
        ("one", {"split_at": "stage9"}, "choose one of"),
        ("cl_ilr", {"split_at": "classifier"}, "choose one of"),
        ("one", {"temperature": 0}, "method.temperature"),
    ],
)
def test_bad_configs_are_one_line_config_errors(name, params, match):
    with pytest.raises(ConfigError, match=match) as info:
        METHODS.get(name)(resnet8(), [], params, **({} if name == "dml" else {"input_shape": SHAPE}))
    assert "\n" not in str(info.value)


def test_no_teachers_accepted():
    with pytest.raises(ValueError, match="teacher"):
        METHODS.get("dml")(resnet8(), [resnet8()], {})


@pytest.mark.parametrize(
    "method, student",
    [
        ({"name": "dml", "peers": 2}, {"name": "mlp", "kwargs": {"hidden": [32]}}),
        ({"name": "one", "split_at": "stage1", "rampup_epochs": 1}, {"name": "lenet"}),
        ({"name": "cl_ilr", "split_at": "stage1", "branches": 2}, {"name": "mlp", "kwargs": {"hidden": [32]}}),
    ],
)
def test_two_epoch_run_logs_members(tmp_path, method, student):
    config = build_config(
        {
            "name": "t",
            "data": {"name": "digits", "augment": False, "train_subset": 160},
            "student": student,
            "method": method,
            "train": {
                "epochs": 2,
                "batch_size": 32,
                "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                "progress": "none",
            },
        }
    )
    summary = Trainer(config, tmp_path).fit()
    assert summary["status"] == "finished"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    members = lines[-1]["members"]
    assert "ensemble" in members and len(members) >= 3
    assert all(0 <= v <= 100 for v in members.values())
    assert "loss_kl" in lines[-1]["train"] and "diversity" in lines[-1]["train"]

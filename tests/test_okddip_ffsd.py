"""OKDDip and FFSD: losses pinned against explicit formulas, gradient routing, deployment, and a
short end-to-end run of each on the bundled digits."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import batch_of

from kdforge.config import OptimizerConfig, build_config
from kdforge.core.checkpoint import read_model_file
from kdforge.core.errors import ConfigError
from kdforge.engine.optim import build_optimizer
from kdforge.engine.trainer import Trainer
from kdforge.methods.base import Step
from kdforge.methods.ffsd import FFSD, Decoder, diversity_loss, diversity_shift, inverted_target, warmup_factor
from kdforge.methods.okddip import OKDDip, epoch_position, rampup_weight
from kdforge.models import create

SHAPE = (3, 16, 16)


def tiny_batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return batch_of(torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g))


def explicit_kl(student, target_probs, T):
    """T^2 * sum_c p (log p - log q) / B, written out."""
    q = torch.exp(student / T) / torch.exp(student / T).sum(1, keepdim=True)
    return T * T * (target_probs * (target_probs.log() - q.log())).sum(1).mean()


def soft(z, T):
    return torch.exp(z / T) / torch.exp(z / T).sum(1, keepdim=True)


# ====================================================================== OKDDip
def make_okddip(seed=0, **params):
    torch.manual_seed(seed)
    return OKDDip(create("resnet8", 10), [], params, input_shape=SHAPE)


def test_okddip_losses_match_explicit_formulas():
    d = make_okddip(rampup_epochs=4, rampup_by="epoch").eval()
    b = tiny_batch()
    out = d(b, Step(epoch=2, epochs=10))
    T, eps, m = 3.0, 1e-7, 3
    with torch.no_grad():
        _, feats, logits = d.group.forward_all(b.image)
        wq, wk = d.query.weight, d.key.weight
        assert wq.shape == wk.shape == (64 // 8, 64)  # d inferred from the pooled features
        kd_peers = 0.0
        for i in range(m):
            energy = torch.stack([((feats[i] @ wq.T) * (feats[j] @ wk.T)).sum(1) for j in range(m)], 1)
            alpha = torch.exp(energy) / torch.exp(energy).sum(1, keepdim=True)
            target = sum(alpha[:, j : j + 1] * logits[j] for j in range(m))
            kd_peers += explicit_kl(logits[i], soft(target, T) + eps, T)
        mean_peers = (logits[0] + logits[1] + logits[2]) / 3
        kd_leader = explicit_kl(logits[3], soft(mean_peers, T) + eps, T)
        ce_peers = sum(F.cross_entropy(logits[i], b.targets) for i in range(m))
        w = math.exp(-5 * (1 - 2 / 4) ** 2)
        # diversity: mean over samples and the 3 pairs of ||softmax(z_i) - softmax(z_j)||_2
        p = [soft(z, 1.0) for z in logits[:m]]
        pairs = [(0, 1), (0, 2), (1, 2)]
        diversity = sum(((p[i] - p[j]) ** 2).sum(1).sqrt().mean() for i, j in pairs) / 3
    assert out.losses["ce_peers"].item() == pytest.approx(ce_peers.item(), rel=1e-5)
    assert out.losses["ce_leader"].item() == pytest.approx(F.cross_entropy(logits[3], b.targets).item(), rel=1e-5)
    assert out.losses["kd_peers"].item() == pytest.approx(w * kd_peers.item(), rel=1e-4)
    assert out.losses["kd_leader"].item() == pytest.approx(w * kd_leader.item(), rel=1e-4)
    assert out.metrics["rampup"] == pytest.approx(w)
    assert float(out.metrics["diversity"]) == pytest.approx(diversity.item(), rel=1e-5)
    torch.testing.assert_close(out.logits, logits[3])


def test_okddip_attention_learns_only_through_undetached_targets():
    d = make_okddip(rampup_epochs=0)
    b = tiny_batch()
    out = d(b, Step())
    # the leader's target (the peer mean) is not detached either: its KL reaches the peers' heads
    peer_head = list(d.group.heads[0].parameters())
    grads = torch.autograd.grad(out.losses["kd_leader"], peer_head, allow_unused=True, retain_graph=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    out.loss.backward()
    for proj in (d.query, d.key):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    detached = make_okddip(rampup_epochs=0, detach_targets=True)
    detached.load_state_dict(d.state_dict())
    out = detached(b, Step())
    out.loss.backward()
    assert detached.query.weight.grad is None and detached.key.weight.grad is None
    # the same forward values: detaching changes only where gradients go
    assert out.loss.item() == pytest.approx(d(b, Step()).loss.item(), rel=1e-5)


def test_okddip_uniform_aggregation_is_the_peer_mean():
    uniform = make_okddip(aggregation="uniform")
    assert not hasattr(uniform, "query")  # no projections to leave unused
    h, z = torch.randn(5, 3, 64), torch.randn(5, 3, 10)
    targets, alpha = uniform.peer_targets(h, z)
    for i in range(3):
        torch.testing.assert_close(targets[:, i], z.mean(1))
    torch.testing.assert_close(alpha, torch.full((5, 3, 3), 1 / 3))
    # attention: rows are distributions over all peers, self included
    targets, alpha = make_okddip().peer_targets(h, z)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(5, 3))
    assert (alpha.diagonal(dim1=1, dim2=2) > 0).all()
    torch.testing.assert_close(targets, torch.einsum("bij,bjc->bic", alpha, z))


def test_okddip_attend_self_false_aggregates_only_the_other_peers():
    h, z = torch.randn(5, 3, 64), torch.randn(5, 3, 10)
    net = make_okddip(attend_self=False)
    targets, alpha = net.peer_targets(h, z)
    assert (alpha.diagonal(dim1=1, dim2=2) == 0).all()
    torch.testing.assert_close(alpha.sum(-1), torch.ones(5, 3))
    # same energies as the self-including attention, renormalised over the other peers
    full = make_okddip()
    full.load_state_dict(net.state_dict())
    _, alpha_all = full.peer_targets(h, z)
    off = alpha_all * (1 - torch.eye(3))
    torch.testing.assert_close(alpha, off / off.sum(-1, keepdim=True))
    torch.testing.assert_close(targets, torch.einsum("bij,bjc->bic", alpha, z))
    # uniform without self: each peer distils from the mean of the other two
    targets, _ = make_okddip(aggregation="uniform", attend_self=False).peer_targets(h, z)
    torch.testing.assert_close(targets[:, 0], (z[:, 1] + z[:, 2]) / 2)
    with pytest.raises(ConfigError, match="at least 2 peers"):
        make_okddip(attend_self=False, branches=2)


def test_okddip_rampup_values_and_fractional_epochs():
    assert rampup_weight(0, 80) == pytest.approx(math.exp(-5))
    assert rampup_weight(40, 80) == pytest.approx(math.exp(-1.25))
    assert rampup_weight(80, 80) == rampup_weight(200, 80) == 1.0
    assert rampup_weight(3.0, 0) == 1.0
    assert rampup_weight(0.5, 2.5) == pytest.approx(math.exp(-5 * 0.8**2))  # float length
    # 4 steps per epoch: global step 6 is half-way through epoch 1
    step = Step(epoch=1, epochs=4, global_step=6, total_steps=16)
    assert epoch_position(step) == pytest.approx(1.5)
    assert epoch_position(step, "epoch") == 1.0
    assert epoch_position(Step(epoch=3, epochs=10)) == 3.0  # hand-made Step: the epoch itself


def test_okddip_deploys_the_leader_as_a_zoo_network():
    d = make_okddip().eval()
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        _, _, logits = d.group.forward_all(x)
        fresh = create("resnet8", 10)
        fresh.load_state_dict(d.inference_model().state_dict())  # strict
        torch.testing.assert_close(fresh.eval()(x), logits[3])
        members = d.evaluation_models()
        assert set(members) == {"peer0", "peer1", "peer2", "leader", "ensemble"}
        torch.testing.assert_close(members["peer1"].eval()(x), logits[1])
        torch.testing.assert_close(members["ensemble"].eval()(x), torch.stack(logits[:3]).mean(0))
    deployed = {id(p) for p in d.inference_model().parameters()}
    assert {id(p) for p in d.extra_parameters()}.isdisjoint(deployed)
    assert {id(p) for p in d.query.parameters()} <= {id(p) for p in d.extra_parameters()}


# ====================================================================== FFSD
def make_ffsd(seed=0, model="resnet8", shape=SHAPE, **params):
    torch.manual_seed(seed)
    return FFSD(create(model, 10, in_channels=shape[0], input_size=shape[1:]), [], params, input_shape=shape)


def stage_maps(net, x):
    """resnet8 run by hand: (stage1, stage2, stage3 outputs, logits)."""
    s1 = net.stage1(net.stem(x))
    s2 = net.stage2(s1)
    s3 = net.stage3(s2)
    return [s1, s2, s3], net.classifier(s3.mean((2, 3)))


def att(f):
    a = (f**2).mean(1).flatten(1)
    return a / a.norm(dim=1, keepdim=True)


def att_d(u, v):
    return ((att(u) - att(v)) ** 2).mean()


def feat_d(u, v):
    u, v = u.flatten(1), v.flatten(1)
    return ((u / u.norm(dim=1, keepdim=True) - v / v.norm(dim=1, keepdim=True)) ** 2).mean()


def explicit_inverted(a, k_div=3):
    """Inverted attention target of raw maps a (B x N), one sample at a time, via sorting."""
    rows = []
    for row in a:
        r = row.norm()
        y = row / r
        tau = torch.sort(y).values[len(y) // k_div - 1]
        rows.append(torch.where(y < tau, y, torch.where(y > tau, r - y, r / 2)))
    return torch.stack(rows)


def test_ffsd_losses_match_explicit_formulas():
    d = make_ffsd().eval()
    b = tiny_batch()
    epoch = 1
    out = d(b, Step(epoch=epoch, epochs=10))
    warm = math.exp(-5 * (1 - (epoch + 1) / 5) ** 2)  # 1-based epoch 2 of a 5-epoch warm-up
    assert out.metrics["warmup"] == pytest.approx(warm)
    T, y = 2.0, b.targets
    with torch.no_grad():
        (m0, z0), (m1, z1) = stage_maps(d.students[0], b.image), stage_maps(d.students[1], b.image)
        mL, zL = stage_maps(d.leader, b.image)
        ce = F.cross_entropy(z0, y) + F.cross_entropy(z1, y)
        mutual = explicit_kl(z0, soft(z1, T), T) + explicit_kl(z1, soft(z0, T), T)
        # diversity of student 1 against student 0's last map
        a_prev = (m0[2] ** 2).mean(1).flatten(1)
        target = explicit_inverted(a_prev)
        div = ((att(m1[2]) - target) ** 2).mean()
        # SD target of student 1: its decoder (eval) on student 0's shifted last map
        r = a_prev.norm(dim=1, keepdim=True)
        shift = ((target - a_prev / r) * r / m0[2].shape[1]).view(4, 1, *m0[2].shape[2:])
        pseudo = d.student_decoders[0].eval()(m0[2] + shift)
        sd_students = att_d(m1[0], pseudo[0]) + att_d(m1[1], pseudo[1])
        # fusion module on the concatenated last maps
        cat = torch.cat([m0[2], m1[2]], 1)
        zf, fused = d.fusion(cat)
        ensemble = (z0 + z1) / 2
        pseudo_l = d.leader_decoder(fused)
        decoders = 0.0
        for dec, maps in ((d.student_decoders[0], m1), (d.leader_decoder, mL)):
            outs = dec(maps[2])
            decoders += sum(feat_d(o, t) + att_d(o, t) for o, t in zip(outs, maps[:2]))
        expected = {
            "ce_students": ce,
            "mutual": mutual,
            "diversity": 1e-5 * warm * div,
            "sd_students": 1e-5 * warm * sd_students,
            "fusion_ce": F.cross_entropy(zf, y),
            "fusion_kd": explicit_kl(zf, soft(ensemble, T), T),
            "leader_ce": F.cross_entropy(zL, y),
            "leader_kd": explicit_kl(zL, soft(zf, T), T),
            "leader_fusion": 10 * warm * att_d(mL[2], fused),
            "leader_trans_fusion": 10 * warm * att_d(d.trans_fusion(mL[2]), cat),
            "leader_sd": 10 * warm * (att_d(mL[0], pseudo_l[0]) + att_d(mL[1], pseudo_l[1])),
            "decoders": 1000 * warm * decoders,
        }
    assert set(out.losses) == set(expected)
    for name, value in expected.items():
        assert out.losses[name].item() == pytest.approx(float(value), rel=1e-4, abs=1e-10), name
    torch.testing.assert_close(out.logits, zL)


def test_ffsd_diversity_target_inverts_the_attended_positions():
    # one sample, N = 6 positions: tau is the 2nd smallest (int(6/3) = 2)
    a = torch.tensor([[1.0, 4.0, 2.0, 6.0, 3.0, 5.0]])
    r = math.sqrt(1 + 16 + 4 + 36 + 9 + 25)
    y = a / r
    target, y_out, norm = inverted_target(a)
    torch.testing.assert_close(y_out, y)
    assert norm.item() == pytest.approx(r)
    expected = torch.tensor([[y[0, 0], r - y[0, 1], r / 2, r - y[0, 3], r - y[0, 4], r - y[0, 5]]])
    torch.testing.assert_close(target, expected)
    torch.testing.assert_close(target, explicit_inverted(a))
    x = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    assert diversity_loss(x, a).item() == pytest.approx(((x / x.norm() - expected) ** 2).mean().item(), rel=1e-6)
    # the shifted feature: every channel moves by (target - y) * r / C
    feature = torch.stack([a.view(2, 3).sqrt(), a.view(2, 3).sqrt()], 0).unsqueeze(0)  # 1 x 2 x 2 x 3, A = a
    moved = diversity_shift(feature)
    torch.testing.assert_close(moved - feature, ((expected - y) * r / 2).view(1, 1, 2, 3).expand(1, 2, 2, 3))


def test_ffsd_decoders_learn_only_from_their_own_loss():
    d = make_ffsd()
    out = d(tiny_batch(), Step(epoch=10))
    decoder_params = d.decoder_parameters()
    dec_ids = {id(p) for p in decoder_params}
    others = [p for p in d.parameters() if id(p) not in dec_ids]
    rest = sum(v for k, v in out.losses.items() if k != "decoders")
    grads = torch.autograd.grad(rest, decoder_params, allow_unused=True, retain_graph=True)
    assert all(g is None for g in grads)
    grads = torch.autograd.grad(out.losses["decoders"], others, allow_unused=True, retain_graph=True)
    assert all(g is None for g in grads)
    grads = torch.autograd.grad(out.losses["decoders"], decoder_params, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads if g.ndim > 1)
    # the fusion module learns only from its own terms, the leader's terms reach only the leader side
    fusion = list(d.fusion.parameters())
    fusion_terms = out.losses["fusion_ce"] + out.losses["fusion_kd"]
    non_fusion = sum(v for k, v in out.losses.items() if not k.startswith("fusion"))
    assert all(g is None for g in torch.autograd.grad(non_fusion, fusion, allow_unused=True, retain_graph=True))
    assert all(g is not None for g in torch.autograd.grad(fusion_terms, fusion, allow_unused=True, retain_graph=True))
    leader_terms = sum(v for k, v in out.losses.items() if k.startswith("leader"))
    students = [p for net in d.students for p in net.parameters()]
    assert all(g is None for g in torch.autograd.grad(leader_terms, students, allow_unused=True, retain_graph=True))
    # students learn from each other only through detached targets: student 0 is untouched by student 1's loss
    student1 = out.losses["diversity"] + out.losses["sd_students"]
    s0 = list(d.students[0].parameters())
    assert all(g is None for g in torch.autograd.grad(student1, s0, allow_unused=True))


def test_ffsd_optimizer_groups_partition_the_parameters():
    d = make_ffsd(students=3)
    groups = d.optimizer_groups()
    assert [g.name for g in groups] == ["main", "fusion", "decoders"]
    ids = [[id(p) for p in g.parameters] for g in groups]
    flat = [i for group in ids for i in group]
    assert len(flat) == len(set(flat))  # no overlap
    assert set(flat) == {id(p) for p in d.parameters() if p.requires_grad}  # nothing missing
    assert set(ids[2]) == {id(p) for p in d.decoder_parameters()}
    assert len(d.student_decoders) == 2  # one per student i >= 1, plus the leader's
    settings = OptimizerConfig(name="sgd", lr=0.1, nesterov=True, weight_decay=1e-4)
    main, fusion, decoders = (build_optimizer(g, settings) for g in groups)
    assert isinstance(main, torch.optim.SGD) and main.param_groups[0]["weight_decay"] == 1e-4
    assert isinstance(fusion, torch.optim.SGD) and fusion.param_groups[0]["weight_decay"] == 1e-5
    assert isinstance(decoders, torch.optim.Adam) and decoders.param_groups[0]["lr"] == 1e-3
    assert decoders.param_groups[0]["weight_decay"] == 1e-4  # the run's, as the reference


@pytest.mark.parametrize(
    "model,shape",
    [("resnet8", (3, 16, 16)), ("resnet8x4", (3, 16, 16)), ("wrn_16_2", (3, 16, 16)), ("resnet8", (3, 14, 14))],
)
def test_ffsd_decoder_layout_follows_the_probed_taps(model, shape):
    d = make_ffsd(model=model, shape=shape)
    shapes = d.shapes
    with torch.no_grad():
        outputs = d.leader_decoder.eval()(torch.randn(2, *shapes[-1]))
    assert [tuple(o.shape[1:]) for o in outputs] == [tuple(s) for s in shapes[:-1]]
    assert d.fusion.classifier.in_features == shapes[-1][0]


def test_ffsd_decoder_and_layer_errors():
    with pytest.raises(ConfigError, match="cannot decode"):
        Decoder([(16, 9, 9), (32, 4, 4)])
    with pytest.raises(ConfigError, match="not a B x C x H x W"):
        make_ffsd(layers=["stage1", "pool"])


def test_ffsd_warmup_factor():
    assert warmup_factor(0, 5) == pytest.approx(math.exp(-5 * 0.8**2))
    assert warmup_factor(4, 5) == 1.0 and warmup_factor(40, 5) == 1.0 and warmup_factor(0, 0) == 1.0


def test_ffsd_deploys_the_leader_as_a_zoo_network():
    d = make_ffsd().eval()
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        fresh = create("resnet8", 10)
        fresh.load_state_dict(d.inference_model().state_dict())  # strict
        torch.testing.assert_close(fresh.eval()(x), d.leader(x))
        members = d.evaluation_models()
        assert set(members) == {"student0", "student1", "leader", "fusion", "ensemble"}
        maps = [stage_maps(net, x)[0][2] for net in d.students]
        torch.testing.assert_close(members["fusion"].eval()(x), d.fusion(torch.cat(maps, 1))[0])
        torch.testing.assert_close(members["ensemble"].eval()(x), (d.students[0](x) + d.students[1](x)) / 2)
    assert {id(p) for p in d.extra_parameters()}.isdisjoint({id(p) for p in d.leader.parameters()})


# ====================================================================== end to end
def recipe(student, method):
    return build_config(
        {
            "name": "t",
            "data": {"name": "digits", "augment": False, "train_subset": 64},
            "student": student,
            "method": method,
            "train": {
                "epochs": 2,
                "batch_size": 16,
                "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
                "scheduler": {"name": "constant"},
                "progress": "none",
            },
        }
    )


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_okddip_trains_end_to_end_on_digits(tmp_path):
    config = recipe(
        {"name": "mlp", "kwargs": {"hidden": [32, 32]}}, {"name": "okddip", "split_at": "stage1", "rampup_epochs": 1}
    )
    trainer = Trainer(config, tmp_path)
    summary = trainer.fit()
    assert summary["status"] == "finished"
    lines = read_metrics(tmp_path)
    assert {"loss_ce_peers", "loss_kd_peers", "loss_kd_leader", "diversity", "rampup"} <= set(lines[0]["train"])
    assert lines[1]["train"]["rampup"] == pytest.approx(1.0)
    assert set(lines[-1]["members"]) == {"peer0", "peer1", "peer2", "leader", "ensemble"}
    record = read_model_file(tmp_path / "checkpoints/model_last.pt")
    net = create("mlp", 10, in_channels=1, input_size=(8, 8), hidden=[32, 32])
    net.load_state_dict(record["state_dict"])


def test_ffsd_trains_end_to_end_on_digits_with_both_optimizers(tmp_path):
    config = recipe({"name": "resnet8"}, {"name": "ffsd"})
    trainer = Trainer(config, tmp_path)
    summary = trainer.fit()
    assert summary["status"] == "finished"
    lines = read_metrics(tmp_path)
    assert set(lines[0]["lr"]) == {"main", "fusion", "decoders"}
    assert lines[0]["lr"]["decoders"] == pytest.approx(1e-3)
    assert {"loss_decoders", "loss_leader_sd", "loss_diversity"} <= set(lines[0]["train"])
    assert set(lines[-1]["members"]) == {"student0", "student1", "leader", "fusion", "ensemble"}
    optimizers = [getattr(o, "optimizer", o) for o in trainer.optimizers]
    assert [type(o) for o in optimizers] == [torch.optim.SGD, torch.optim.SGD, torch.optim.Adam]
    adam = optimizers[2]
    stepped = [p for group in adam.param_groups for p in group["params"] if adam.state.get(p)]
    assert len(stepped) == len(trainer.distiller.decoder_parameters())  # every decoder parameter was stepped
    assert all(int(adam.state[p]["step"]) == 2 * 4 for p in stepped)  # 64 images / 16 = 4 steps x 2 epochs
    record = read_model_file(tmp_path / "checkpoints/model_last.pt")
    net = create("resnet8", 10, in_channels=1, input_size=(8, 8))
    net.load_state_dict(record["state_dict"])

"""CRD and HKD: memory banks, negative sampling, the NCE / InfoNCE losses and HKD's kNN graph,
pinned against independent computations (plain loops / numpy in float64), plus gradient routing,
checkpoint round trips and a forward/backward on a zoo pair."""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import batch_of
from torch import nn

import kdforge.methods.crd  # noqa: F401  (registration)
import kdforge.methods.hkd  # noqa: F401
from kdforge.core.errors import ConfigError
from kdforge.methods.base import METHODS, Step
from kdforge.methods.contrastive import (
    MemoryBank,
    bank_scores,
    sample_other_classes,
    sample_other_indices,
)
from kdforge.methods.crd import crd_nce_loss, estimate_log_z
from kdforge.methods.hkd import OneHopGraphConv, knn_adjacency
from kdforge.methods.losses import kd_loss
from kdforge.models import create


class Tiny(nn.Module):
    """flatten -> linear -> tanh ("body", the tapped feature) -> fc; no BN, so fully deterministic."""

    def __init__(self, width=5, classes=4, d_in=12):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d_in, width), nn.Tanh())
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.body(x))


def tiny_distiller(method, n=10, params=None, **kwargs):
    base = {"student_layers": ["body"], "feature_dim": 4, "num_negatives": 3}
    return METHODS.get(method)(
        Tiny(5), [Tiny(7)], {**base, **(params or {})}, input_shape=(3, 2, 2), num_samples=n, **kwargs
    )


def unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def np_embed(head, f):
    w, b = head.linear.weight.detach().double().numpy(), head.linear.bias.detach().double().numpy()
    return unit(f @ w.T + b)


def body(net, x):
    with torch.no_grad():
        return net.body(x).double().numpy()


def random_units(*shape):
    return unit(np.random.default_rng(sum(shape)).normal(size=shape))


# ----------------------------------------------------------------------------- memory bank
def test_memory_bank_init_and_momentum_update_of_the_batch_rows_only():
    bank = MemoryBank(6, 3, momentum=0.5)
    assert torch.allclose(bank.memory.norm(dim=1), torch.ones(6))
    raw = MemoryBank(200, 3, momentum=0.5, normalise_init=False).memory
    assert raw.abs().max() <= 1 / math.sqrt(3 / 3) and not torch.allclose(raw.norm(dim=1), torch.ones(200))
    assert "memory" in dict(bank.named_buffers()) and not list(bank.parameters())
    before = bank.memory.clone()
    values = torch.tensor([[1.0, 2.0, 2.0], [0.0, -3.0, 4.0]])
    bank.update(torch.tensor([5, 1]), values)
    old, new = before.double().numpy(), values.double().numpy()
    for row, v in zip([5, 1], new):
        expected = unit(0.5 * old[row] + 0.5 * v)
        assert np.allclose(bank.memory[row].numpy(), expected, atol=1e-6)
    for row in [0, 2, 3, 4]:
        assert torch.equal(bank.memory[row], before[row])
    assert torch.allclose(bank.memory.norm(dim=1), torch.ones(6))
    # HKD's momentum 0.9 and the smoothed positive leave the bank untouched
    hkd_bank = MemoryBank(4, 3, momentum=0.9)
    old = hkd_bank.memory.clone()
    smoothed = hkd_bank.blend(torch.tensor([2]), torch.tensor([[0.0, 0.0, 1.0]]), 0.75)
    assert np.allclose(smoothed[0].numpy(), unit(0.75 * old[2].numpy() + 0.25 * np.array([0, 0, 1.0])), atol=1e-6)
    assert torch.equal(hkd_bank.memory, old)


def test_bank_scores_gather_and_matmul_agree_with_loops_and_survive_the_update():
    memory = torch.from_numpy(random_units(7, 4)).float()
    anchor = torch.from_numpy(random_units(3, 4)).float().requires_grad_()
    index = torch.tensor([[6, 0, 3], [1, 1, 5], [2, 6, 0]])
    expected = [[float(anchor[b].detach() @ memory[j]) for j in index[b]] for b in range(3)]
    for mode in ["gather", "matmul", "auto"]:
        bank = MemoryBank(7, 4, 0.5)
        bank.memory.copy_(memory)
        scores = bank.scores(anchor, index, mode)
        assert np.allclose(scores.detach().numpy(), expected, atol=1e-6)
        bank.update(torch.tensor([0, 6]), torch.randn(2, 4))  # in place, before the backward pass
        scores.sum().backward()
        assert torch.allclose(anchor.grad, memory[index].sum(1), atol=1e-6)
        anchor.grad = None
    with pytest.raises(ValueError, match="mode"):
        bank_scores(anchor, memory, index, "bogus")


# ----------------------------------------------------------------------------- negatives
def test_uniform_negatives_exclude_the_positive_and_cover_every_other_index():
    n = 5
    positive = torch.tensor([0, n - 1, 2])
    draws = sample_other_indices(positive, n, 3000)
    assert draws.shape == (3, 3000) and draws.min() >= 0 and draws.max() <= n - 1
    for row, pos in zip(draws, positive.tolist()):
        assert pos not in row.tolist()
        counts = np.bincount(row.numpy(), minlength=n)
        others = [c for i, c in enumerate(counts) if i != pos]
        assert min(others) > 600  # uniform over the 4 others: 750 each on average
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample_other_indices(positive, n, 7, g1), sample_other_indices(positive, n, 7, g2))


def test_other_class_negatives_never_share_the_anchor_label():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, -1, 2, 0, 1])
    anchors = torch.tensor([0, 1, 2, 2])
    draws = sample_other_classes(anchors, labels, 500)
    for row, y in zip(draws, anchors.tolist()):
        assert (labels[row] != y).all()
        assert 8 in row.tolist()  # an index whose label is unknown counts as another class
    # the exact fallback (no rejection rounds) on a class that covers all but one sample
    skewed = torch.tensor([0] * 11 + [1])
    assert (sample_other_classes(torch.tensor([0, 0]), skewed, 50, rounds=0) == 11).all()
    with pytest.raises(ConfigError, match="other_indices"):
        sample_other_classes(torch.tensor([0]), torch.zeros(5, dtype=torch.long), 3)


def test_method_negatives_sampled_explicit_and_indices_near_n():
    d = tiny_distiller("crd", n=10, params={"num_negatives": 9, "negatives": "other_indices"})
    x = torch.randn(3, 3, 2, 2)
    b = batch_of(x, [0, 1, 2], [9, 0, 8])
    neg = d.negatives(b)
    assert neg.shape == (3, 9) and neg.min() >= 0 and neg.max() <= 9
    assert all(i not in row.tolist() for i, row in zip([9, 0, 8], neg))
    fixed = torch.tensor([[1, 2], [3, 4], [5, 6]])
    assert torch.equal(d.negatives(batch_of(x, [0, 1, 2], [9, 0, 8], fixed)), fixed)
    d.train()
    out = d(b, Step())  # the last rows of the banks are addressed without trouble
    assert torch.isfinite(out.loss)
    with pytest.raises(ConfigError, match="num_samples"):
        d(batch_of(x, [0, 1, 2], [9, 10, 8]), Step())
    with pytest.raises(ConfigError, match="num_samples"):
        d(batch_of(x, [0, 1, 2], [9, 0, 8], [[1, 2], [3, 10], [5, 6]]), Step())
    with pytest.raises(ConfigError, match="B x K"):
        d(batch_of(x, [0, 1, 2], [9, 0, 8], [1, 2, 3]), Step())


def test_num_negatives_is_clamped_to_n_minus_one_and_num_samples_is_required():
    with pytest.warns(UserWarning, match="using 9"):
        d = tiny_distiller("crd", n=10, params={"num_negatives": 16384})
    assert d.num_negatives == 9
    with pytest.raises(ConfigError, match="num_samples"):
        METHODS.get("crd")(Tiny(), [Tiny()], {"student_layers": ["body"]}, input_shape=(3, 2, 2))
    with pytest.raises(ConfigError, match="train_labels"):
        tiny_distiller("hkd", n=10, train_labels=[0, 1, 2])


# ----------------------------------------------------------------------------- CRD loss
def crd_by_hand(anchor, bank, candidates, z, n, tau, eps=1e-7):
    """The NCE loss straight from the definition, one anchor and one candidate at a time."""
    batch, k = len(candidates), len(candidates[0]) - 1
    total = 0.0
    for b in range(batch):
        probs = [math.exp(float(anchor[b] @ bank[j]) / tau) / z for j in candidates[b]]
        total -= math.log(probs[0] / (probs[0] + k / n + eps))
        total -= sum(math.log((k / n) / (p + k / n + eps)) for p in probs[1:])
    return total / batch


def z_by_hand(anchor, bank, candidates, n, tau):
    values = [math.exp(float(anchor[b] @ bank[j]) / tau) for b in range(len(candidates)) for j in candidates[b]]
    return sum(values) / len(values) * n


@pytest.mark.parametrize("tau", [0.07, 0.5, 0.01])
def test_crd_nce_loss_matches_loops(tau):
    anchor, bank = random_units(3, 4), random_units(10, 4)
    candidates = [[0, 4, 7, 2], [5, 1, 1, 9], [9, 3, 0, 6]]
    scores = torch.tensor([[anchor[b] @ bank[j] for j in row] for b, row in enumerate(candidates)], dtype=torch.float32)
    z = z_by_hand(anchor, bank, candidates, 10, tau)
    log_z = estimate_log_z(scores, tau, 10)
    assert log_z.item() == pytest.approx(math.log(z), rel=1e-5)
    got = crd_nce_loss(scores, log_z, 10, tau)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(crd_by_hand(anchor, bank, candidates, z, 10, tau), rel=1e-4)


def test_crd_method_matches_independent_computation_and_fixes_z_after_the_first_batch():
    n, tau = 10, 0.07
    d = tiny_distiller("crd", n=n)
    d.train()
    bank_s, bank_t = random_units(n, 4), random_units(n, 5)[:, :4]
    bank_t = unit(bank_t)
    d.memory_student.memory.copy_(torch.from_numpy(bank_s))
    d.memory_teacher.memory.copy_(torch.from_numpy(bank_t))
    x, index, negatives = torch.randn(3, 3, 2, 2), [9, 0, 4], [[1, 2, 3], [9, 9, 5], [0, 8, 7]]
    assert torch.isnan(d.log_z).all()
    out = d(batch_of(x, [0, 3, 1], index, negatives), Step())

    es, et = np_embed(d.embed_student, body(d.student, x)), np_embed(d.embed_teacher, body(d.teachers[0], x))
    cands = [[i, *neg] for i, neg in zip(index, negatives)]
    z_s, z_t = z_by_hand(es, bank_t, cands, n, tau), z_by_hand(et, bank_s, cands, n, tau)
    expected = crd_by_hand(es, bank_t, cands, z_s, n, tau) + crd_by_hand(et, bank_s, cands, z_t, n, tau)
    assert out.losses["crd"].item() == pytest.approx(0.8 * expected, rel=1e-4)
    logits = d.student(x)
    assert out.losses["ce"].item() == pytest.approx(F.cross_entropy(logits, torch.tensor([0, 3, 1])).item(), rel=1e-5)
    assert set(out.losses) == {"ce", "crd"}  # plain CRD: no KD term
    assert np.allclose(d.z.numpy(), [z_s, z_t], rtol=1e-4)
    # banks: the batch rows moved by momentum 0.5 and were renormalised, the others untouched
    for bank, old, emb in [(d.memory_student, bank_s, es), (d.memory_teacher, bank_t, et)]:
        for row, e in zip(index, emb):
            assert np.allclose(bank.memory[row].numpy(), unit(0.5 * old[row] + 0.5 * e), atol=1e-5)
        for row in set(range(n)) - set(index):
            assert np.allclose(bank.memory[row].numpy(), old[row], atol=0)

    # second batch: Z stays; the loss uses the stored Z and the updated banks
    z_first = d.log_z.clone()
    new_s, new_t = d.memory_student.memory.double().numpy(), d.memory_teacher.memory.double().numpy()
    x2, index2, negatives2 = torch.randn(2, 3, 2, 2) * 3, [9, 2], [[3, 4, 5], [6, 7, 8]]
    out2 = d(batch_of(x2, [1, 1], index2, negatives2), Step(global_step=1))
    assert torch.equal(d.log_z, z_first)
    es2, et2 = np_embed(d.embed_student, body(d.student, x2)), np_embed(d.embed_teacher, body(d.teachers[0], x2))
    cands2 = [[i, *neg] for i, neg in zip(index2, negatives2)]
    expected2 = crd_by_hand(es2, new_t, cands2, z_s, n, tau) + crd_by_hand(et2, new_s, cands2, z_t, n, tau)
    assert out2.losses["crd"].item() == pytest.approx(0.8 * expected2, rel=1e-4)


def test_crd_eval_call_leaves_banks_and_z_alone():
    d = tiny_distiller("crd")
    d.eval()
    banks = [d.memory_student.memory.clone(), d.memory_teacher.memory.clone()]
    out = d(batch_of(torch.randn(2, 3, 2, 2), [0, 1], [3, 4]), Step())
    assert torch.isfinite(out.loss)
    assert torch.isnan(d.log_z).all()
    assert torch.equal(d.memory_student.memory, banks[0]) and torch.equal(d.memory_teacher.memory, banks[1])


def test_crd_plus_kd_adds_the_kd_term():
    d = tiny_distiller("crd", params={"kd_weight": 0.9})
    d.train()
    x = torch.randn(3, 3, 2, 2)
    out = d(batch_of(x, [0, 1, 2], [0, 1, 2]), Step())
    with torch.no_grad():
        expected = 0.9 * kd_loss(d.student(x), d.teachers[0](x), 4.0).item()
    assert out.losses["kd"].item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- HKD graph
def np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


LOGITS_4 = [[3.0, 0.0, 0.0], [2.5, 0.5, 0.0], [0.0, 0.0, 2.0], [0.0, 1.0, 1.2]]


def neighbours_by_hand(logits, k, include_self):
    p = np_softmax(np.asarray(logits, dtype=np.float64))
    n = len(p)
    dist = [[1 - p[i] @ p[j] / np.linalg.norm(p[i]) / np.linalg.norm(p[j]) for j in range(n)] for i in range(n)]
    result = []
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j: dist[i][j])
        result.append({i, *others[: k - 1]} if include_self else set(others[:k]))
    return result


@pytest.mark.parametrize("k, include_self", [(2, True), (3, True), (2, False)])
def test_knn_graph_by_hand(k, include_self):
    adjacency = knn_adjacency(torch.tensor(LOGITS_4), k, include_self)
    expected = neighbours_by_hand(LOGITS_4, k, include_self)
    for i in range(4):
        assert {j for j in range(4) if adjacency[i, j] == 1} == expected[i]
    assert (adjacency.sum(1) == k).all()
    if (k, include_self) == (2, True):  # 0 and 1 are close, 2 and 3 are close
        assert expected == [{0, 1}, {1, 0}, {2, 3}, {3, 2}]


def test_one_hop_graph_convolution_by_hand():
    adjacency = knn_adjacency(torch.tensor(LOGITS_4), 2, include_self=False)
    h = torch.from_numpy(random_units(4, 3)).float()
    conv = OneHopGraphConv(3, 3)
    got = conv(h, adjacency).detach().double().numpy()
    a, hh = adjacency.double().numpy(), h.double().numpy()
    deg = a.sum(1)
    w, b = conv.linear.weight.detach().double().numpy(), conv.linear.bias.detach().double().numpy()
    for i in range(4):
        aggregated = sum(a[i, j] * hh[j] / math.sqrt(deg[i] * deg[j]) for j in range(4))
        out = unit(w @ np.concatenate([hh[i], aggregated]) + b)
        assert np.allclose(got[i], out, atol=1e-6)
        # every node receives from exactly k nodes, so the aggregation is their mean
        assert np.allclose(aggregated, hh[a[i] == 1].mean(0))


# ----------------------------------------------------------------------------- HKD loss
def info_nce_by_hand(anchor, positive, negatives, tau):
    total = 0.0
    for b in range(len(anchor)):
        logits = [float(anchor[b] @ positive[b]) / tau] + [float(anchor[b] @ m) / tau for m in negatives[b]]
        top = max(logits)
        total -= logits[0] - top - math.log(sum(math.exp(v - top) for v in logits))
    return total / len(anchor)


def gnn_by_hand(conv, h, logits, k, include_self):
    hood = neighbours_by_hand(logits, k, include_self)
    w, b = conv.linear.weight.detach().double().numpy(), conv.linear.bias.detach().double().numpy()
    return unit(np.stack([w @ np.concatenate([h[i], h[sorted(hood[i])].mean(0)]) + b for i in range(len(h))]))


@pytest.mark.parametrize("negative_bank", ["own", "other"])
def test_hkd_method_matches_independent_computation(negative_bank):
    n, tau, beta = 8, 0.07, 3.0
    labels = [0, 1, 2, 0, 1, 2, 0, 1]
    d = tiny_distiller("hkd", n=n, params={"knn": 2, "negative_bank": negative_bank}, train_labels=labels)
    d.train()
    bank_s, bank_t = random_units(n, 4), unit(random_units(n, 6)[:, :4])
    d.memory_student.memory.copy_(torch.from_numpy(bank_s))
    d.memory_teacher.memory.copy_(torch.from_numpy(bank_t))
    x, y, index = torch.randn(4, 3, 2, 2), [0, 1, 2, 0], [0, 1, 2, 3]
    negatives = [[1, 2, 4], [0, 2, 3], [0, 1, 6], [7, 5, 4]]
    out = d(batch_of(x, y, index, negatives), Step())

    es, et = np_embed(d.embed_student, body(d.student, x)), np_embed(d.embed_teacher, body(d.teachers[0], x))
    with torch.no_grad():
        zs, zt = d.student(x).double().numpy(), d.teachers[0](x).double().numpy()
    neg_s = bank_s if negative_bank == "own" else bank_t  # negatives of the student anchors
    neg_t = bank_t if negative_bank == "own" else bank_s
    individual = info_nce_by_hand(es, bank_t[index], neg_s[negatives], tau) + info_nce_by_hand(
        et, bank_s[index], neg_t[negatives], tau
    )
    gs = gnn_by_hand(d.gnn_student, es, zs, 2, True)
    gt = gnn_by_hand(d.gnn_teacher, et, zt, 2, True)
    holistic = info_nce_by_hand(gs, unit(0.75 * bank_t[index] + 0.25 * gt), neg_s[negatives], tau) + info_nce_by_hand(
        gt, unit(0.75 * bank_s[index] + 0.25 * gs), neg_t[negatives], tau
    )
    assert out.losses["hkd_individual"].item() == pytest.approx(beta * individual, rel=1e-4)
    assert out.losses["hkd_holistic"].item() == pytest.approx(beta * holistic, rel=1e-4)
    assert set(out.losses) == {"ce", "hkd_individual", "hkd_holistic"}
    # banks take the individual embeddings with momentum 0.9
    for row, e in zip(index, es):
        assert np.allclose(d.memory_student.memory[row].numpy(), unit(0.9 * bank_s[row] + 0.1 * e), atol=1e-5)
    for row in range(4, n):
        assert np.array_equal(d.memory_teacher.memory[row].double().numpy(), bank_t[row].astype(np.float32))


def test_hkd_negatives_come_from_other_classes_and_labels_are_recorded():
    labels = torch.arange(60) % 3
    d = tiny_distiller("hkd", n=60, params={"num_negatives": 50}, train_labels=labels)
    b = batch_of(torch.randn(4, 3, 2, 2), [0, 1, 2, 0], [0, 1, 2, 3])
    neg = d.negatives(b)
    assert neg.shape == (4, 50)
    for row, y in zip(neg, [0, 1, 2, 0]):
        assert (labels[row] != y).all()
    lazy = tiny_distiller("hkd", n=10)
    assert (lazy.labels == -1).all()
    lazy.train()
    lazy(batch_of(torch.randn(4, 3, 2, 2), [2, 0, 1, 3], [9, 0, 5, 4]), Step())
    assert lazy.labels.tolist() == [0, -1, -1, -1, 3, 1, -1, -1, -1, 2]
    for row, y in zip(lazy.negatives(batch_of(torch.randn(2, 3, 2, 2), [2, 1], [9, 5])), [2, 1]):
        assert (lazy.labels[row] != y).all()


def test_hkd_skips_the_graph_for_small_batches_but_updates_the_banks():
    d = tiny_distiller("hkd", n=10)  # k = 8, self included: needs 8 samples
    d.train()
    before = d.memory_student.memory.clone()
    out = d(batch_of(torch.randn(4, 3, 2, 2), [0, 1, 2, 3], [0, 1, 2, 3]), Step())
    assert out.losses["hkd_holistic"].item() == 0.0 and out.losses["hkd_individual"].item() > 0
    assert not torch.equal(d.memory_student.memory[:4], before[:4])
    assert torch.equal(d.memory_student.memory[4:], before[4:])
    assert d.graph_runs(8) and not d.graph_runs(7)
    d2 = tiny_distiller("hkd", n=10, params={"knn_include_self": False})
    assert d2.graph_runs(9) and not d2.graph_runs(8)


# ----------------------------------------------------------------------------- wiring
def zoo_distiller(method, params=None, n=32):
    teacher, student = create("resnet20", num_classes=10), create("resnet8", num_classes=10)
    base = {"num_negatives": 16}
    d = METHODS.get(method)(student, [teacher], {**base, **(params or {})}, input_shape=(3, 16, 16), num_samples=n)
    return d, student, teacher


def zoo_batch(b=8, n=32):
    return batch_of(torch.randn(b, 3, 16, 16), torch.arange(b) % 10, torch.arange(n - b, n))


@pytest.mark.parametrize("method", ["crd", "hkd"])
def test_zoo_pair_forward_backward(method):
    d, student, teacher = zoo_distiller(method)
    running = [m.running_mean.clone() for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    d.train()
    assert not teacher.training
    out = d(zoo_batch(), Step(epoch=3, epochs=240))
    assert out.logits.shape == (8, 10) and torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    after = [m.running_mean for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(running, after))
    heads = 2 * (64 * 128 + 128)  # resnet8 and resnet20 both pool 64 channels
    gnns = 2 * (256 * 128 + 128) if method == "hkd" else 0
    assert d.extra_parameter_count() == heads + gnns
    assert not any(name.startswith("memory_") for name, _ in d.named_parameters())
    if method == "hkd":
        assert out.losses["hkd_holistic"].item() > 0  # batch 8 >= k = 8: the graph ran


@pytest.mark.parametrize("method", ["crd", "hkd"])
def test_gradient_reaches_student_and_heads_never_the_teacher(method):
    d, student, teacher = zoo_distiller(method, {"ce_weight": 0.0})
    d.train()
    out = d(zoo_batch(), Step())
    out.loss.backward()
    trainable = {name: p for name, p in d.named_parameters() if not name.startswith("teachers.")}
    for prefix in [
        "student.stem",
        "student.stage3",
        "embed_student",
        "embed_teacher",
        *(["gnn_student", "gnn_teacher"] if method == "hkd" else []),
    ]:
        assert any(
            p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if n.startswith(prefix)
        ), prefix
    # the classifier only feeds the (detached) graph: without CE and KD it gets no gradient
    assert all(p.grad is None for n, p in trainable.items() if n.startswith("student.classifier"))
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("method", ["crd", "hkd"])
def test_checkpoint_round_trip_of_banks_labels_and_z(method):
    d, _, _ = zoo_distiller(method, {"negatives": "other_classes"})
    d.train()
    for step in range(2):
        d(zoo_batch(), Step(global_step=step)).loss.backward()
    buffer = io.BytesIO()
    torch.save(d.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    keys = {"memory_student.memory", "memory_teacher.memory", "labels", *(["log_z"] if method == "crd" else [])}
    assert keys <= set(state)
    torch.manual_seed(1)
    fresh, _, _ = zoo_distiller(method, {"negatives": "other_classes"})
    assert not torch.equal(fresh.memory_student.memory, d.memory_student.memory)
    fresh.load_state_dict(state)
    for key in keys:
        assert torch.equal(fresh.state_dict()[key], d.state_dict()[key]), key
    assert (fresh.labels[24:] >= 0).all() and (fresh.labels[:24] == -1).all()
    fresh.train()
    b = zoo_batch()
    b.extras["contrast_index"] = torch.randint(0, 32, (8, 16))
    assert fresh(b, Step()).loss.item() == pytest.approx(d(b, Step()).loss.item(), rel=1e-6)
    assert torch.equal(fresh.memory_teacher.memory, d.memory_teacher.memory)


@pytest.mark.parametrize("method", ["crd", "hkd"])
def test_losses_stay_float32_under_autocast(method):
    d, _, _ = zoo_distiller(method, {"kd_weight": 1.0})
    d.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d(zoo_batch(), Step())
    for name, value in out.losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
    out.loss.backward()
    assert d.memory_student.memory.dtype == torch.float32


def test_registered_with_paper_defaults():
    defaults = {
        "crd": {
            "ce_weight": 1.0,
            "kd_weight": 0.0,
            "temperature": 4.0,
            "beta": 0.8,
            "feature_dim": 128,
            "num_negatives": 16384,
            "nce_temperature": 0.07,
            "momentum": 0.5,
            "negatives": "other_classes",
            "student_layers": ["pool"],
        },
        "hkd": {
            "ce_weight": 1.0,
            "kd_weight": 0.0,
            "temperature": 4.0,
            "beta": 3.0,
            "feature_dim": 128,
            "num_negatives": 16384,
            "nce_temperature": 0.07,
            "momentum": 0.9,
            "negatives": "other_classes",
            "knn": 8,
            "knn_include_self": True,
            "holistic_bank_weight": 0.75,
            "negative_bank": "own",
            "student_layers": ["pool"],
        },
    }
    for name, expected in defaults.items():
        cls = METHODS.get(name)
        assert cls.teachers_required == (1, 1) and not cls.replays_teacher_logits
        assert cls.__doc__.splitlines()[0]
        params = cls.Params().model_dump()
        for key, value in expected.items():
            assert params[key] == value, (name, key)
    with pytest.raises(ValueError):
        METHODS.get("crd").Params(student_layers=["stage2", "stage3"])

"""Retrieval / re-ID: metrics against hand-computed cases, the held-out-class sources, the P x K
sampler, the metric-learning losses against brute force, and KD methods on the retrieval task."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import batch_of
from test_data import write_mnist_files

from kdforge.cli import main
from kdforge.config import build_config
from kdforge.core.errors import ConfigError
from kdforge.data import load_dataset
from kdforge.data.loader import pk_loader
from kdforge.data.sampler import pk_batches
from kdforge.data.tasks import TASKS, task_for
from kdforge.data.tasks.retrieval import RetrievalEvaluator, embedding_of, retrieval_metrics
from kdforge.data.types import TensorData
from kdforge.engine.trainer import Trainer
from kdforge.methods import METHODS
from kdforge.methods.base import Step
from kdforge.methods.metric import batch_hard_triplet, contrastive_pairs
from kdforge.models import create


def test_cmc_and_map_match_a_hand_computed_case():
    # 1-D embeddings: gallery at 1 (B), 2 (A), 3 (A), -4 (B)
    gallery = torch.tensor([[1.0], [2.0], [3.0], [-4.0]])
    gallery_ids = torch.tensor([1, 0, 0, 1])
    # query at 0 (A): order B A A B -> AP (1/2 + 2/3) / 2; query at 10 (B): A A B B -> (1/3 + 2/4) / 2;
    # query at 1.1 (B): B A A B -> (1 + 2/4) / 2; query 7 (identity 2) has no match and is skipped
    query = torch.tensor([[0.0], [10.0], [1.1], [7.0]])
    query_ids = torch.tensor([0, 1, 1, 2])
    metrics = retrieval_metrics(query, query_ids, gallery, gallery_ids)
    expected_map = ((1 / 2 + 2 / 3) / 2 + (1 / 3 + 2 / 4) / 2 + (1 + 2 / 4) / 2) / 3
    assert metrics["map"] == pytest.approx(100 * expected_map)
    assert metrics["rank1"] == pytest.approx(100 / 3)
    assert metrics["rank5"] == metrics["rank10"] == pytest.approx(100.0)
    assert metrics["recall10"] == pytest.approx(100.0)
    assert metrics["queries"] == 3


def test_leave_one_out_excludes_each_query_itself():
    # two tight pairs: every sample's nearest other sample shares its identity
    points = torch.tensor([[0.0, 1.0], [0.1, 1.0], [1.0, 0.0], [1.0, 0.1]])
    evaluator = TASKS.get("retrieval")().evaluator()
    evaluator.update(points, torch.tensor([0, 0, 1, 1]))
    metrics = evaluator.finish()
    assert metrics["rank1"] == 100.0 and metrics["map"] == 100.0
    flipped = RetrievalEvaluator()
    flipped.update(points, torch.tensor([0, 1, 0, 1]))  # nearest neighbours now all of another identity
    assert flipped.finish()["rank1"] == 0.0


def test_query_gallery_rows_and_a_split_without_gallery_is_one_line():
    evaluator = RetrievalEvaluator()
    evaluator.update(torch.eye(3), torch.tensor([[0, 1], [0, 1], [1, 1]]))
    with pytest.raises(Exception, match="both queries") as caught:
        evaluator.finish()
    assert "\n" not in str(caught.value)


def test_embedding_contract_embed_then_pool_then_output():
    net = create("embed_cnn", num_classes=5, in_channels=1, width=0.25, dim=12).eval()
    x = torch.rand(3, 1, 28, 28)
    assert net(x).shape == (3, 5) and embedding_of(net, x).shape == (3, 12)
    lenet = create("lenet", num_classes=5, in_channels=1).eval()
    assert embedding_of(lenet, x).shape == (3, lenet.feature_dim)  # the pool feature point
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 7))
    assert embedding_of(plain, x).shape == (3, 7)


def test_retrieval_mnist_holds_out_classes_with_a_fixed_query_split(tmp_path):
    arrays = write_mnist_files(tmp_path / "MNIST" / "raw", train=60, test=40)
    splits = load_dataset("retrieval_mnist", root=tmp_path, queries=2)
    official_test = torch.as_tensor(arrays["t10k-labels-idx1-ubyte"].astype("int64"))
    assert splits.info.task == "retrieval" and splits.info.num_classes == 5
    assert set(splits.train.labels.tolist()) == {0, 1, 2, 3, 4}
    assert set(official_test[splits.test.indices].tolist()) == {5, 6, 7, 8, 9}  # never seen in training
    targets = splits.test.targets
    assert targets.shape == (20, 2) and int(targets[:, 1].sum()) == 10  # 2 queries per held-out digit
    again = load_dataset("retrieval_mnist", root=tmp_path, queries=2)
    assert torch.equal(again.test.targets, targets)
    other = load_dataset("retrieval_mnist", root=tmp_path, queries=2, split_seed=1)
    assert not torch.equal(other.test.targets, targets)
    with pytest.raises(ConfigError, match="train_classes") as caught:
        load_dataset("retrieval_mnist", root=tmp_path, train_classes=[0, 11])
    assert "\n" not in str(caught.value)


def test_pk_batches_hold_p_identities_with_k_samples_each_and_are_reproducible():
    labels = torch.arange(70) % 7
    labels[:3] = 0  # uneven identities
    batches = pk_batches(labels, p=3, k=4, batches=20, seed=5)
    for batch in batches:
        ids = labels[batch]
        assert len(ids.unique()) == 3
        assert all(int((ids == i).sum()) == 4 for i in ids.unique())
        assert all((ids[j * 4 : (j + 1) * 4] == ids[j * 4]).all() for j in range(3))  # K consecutive per identity
    assert torch.equal(batches, pk_batches(labels, p=3, k=4, batches=20, seed=5))
    assert not torch.equal(batches, pk_batches(labels, p=3, k=4, batches=20, seed=6))
    # every identity is visited: the identity cycle is reshuffled when it runs out
    assert set(labels[batches.flatten()].tolist()) == set(range(7))


def test_pk_loader_epochs_and_one_line_errors():
    data = TensorData(images=torch.zeros(40, 1, 4, 4, dtype=torch.uint8), labels=torch.arange(40) % 5)
    loader = pk_loader(data, 8, {"name": "pk", "k": 2}, seed=0)
    assert len(loader) == 5
    first = [b.targets.tolist() for b in loader]
    loader.set_epoch(1)
    second = [b.targets.tolist() for b in loader]
    loader.set_epoch(0)
    assert [b.targets.tolist() for b in loader] == first and second != first
    assert all(len(b) == 8 for b in first)
    for sampler, message in (({"k": 3}, "does not divide"), ({"p": 3, "k": 2}, "differs from")):
        with pytest.raises(ConfigError, match=message) as caught:
            pk_loader(data, 8, sampler)
        assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="only 5"):
        pk_loader(data, 12, {"k": 2})


def _brute_distance(a, b):
    return float(((a - b) ** 2).sum().sqrt())


def test_batch_hard_triplet_matches_brute_force():
    torch.manual_seed(0)
    emb = torch.randn(8, 3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])  # identity 3 has no positive: left out
    margin = 0.5
    terms = []
    for a in range(8):
        pos = [_brute_distance(emb[a], emb[p]) for p in range(8) if p != a and labels[p] == labels[a]]
        neg = [_brute_distance(emb[a], emb[n]) for n in range(8) if labels[n] != labels[a]]
        if pos and neg:
            terms.append(max(0.0, margin + max(pos) - min(neg)))
    assert float(batch_hard_triplet(emb, labels, margin)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_contrastive_matches_brute_force():
    torch.manual_seed(1)
    emb, labels, margin = torch.randn(6, 4), torch.tensor([0, 1, 0, 2, 1, 0]), 2.0
    terms = []
    for i, j in itertools.combinations(range(6), 2):
        d = _brute_distance(emb[i], emb[j])
        terms.append(d**2 if labels[i] == labels[j] else max(0.0, margin - d) ** 2)
    assert float(contrastive_pairs(emb, labels, margin)) == pytest.approx(sum(terms) / len(terms) / 2, rel=1e-5)


def test_kd_with_annealed_temperature_and_rkd_on_embeddings_train_on_retrieval():
    student = create("embed_cnn", num_classes=5, in_channels=1, width=0.25, dim=8)
    teacher = create("embed_cnn", num_classes=5, in_channels=1, width=0.5, dim=16)
    task = task_for(type("Info", (), {"task": "retrieval", "name": "toy"})())
    batch = batch_of(torch.rand(10, 1, 12, 12), classes=5)
    params = {"temperature": {"kind": "exponential", "start": 10, "end": 1, "by": "epoch"}}
    kd = METHODS.get("kd")(student, [teacher], params)
    kd.use_task(task)
    temperatures = [float(kd(batch, Step(epoch=e, epochs=5)).metrics["temperature"]) for e in (0, 4)]
    assert temperatures == [pytest.approx(10.0), pytest.approx(1.0)]
    rkd = METHODS.get("rkd")(student, [teacher], {"student_layers": ["embedding"]})
    rkd.use_task(task)
    out = rkd(batch, Step())
    assert {"ce", "rkd_distance", "rkd_angle"} <= set(out.losses) and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="does not support the retrieval task"):
        METHODS.get("dkd")(student, [teacher], {}).use_task(task)


def test_metric_run_end_to_end_reports_map_on_held_out_classes(tmp_path, capsys):
    write_mnist_files(tmp_path / "MNIST" / "raw", train=80, test=40)
    recipe = {
        "name": "reid",
        "data": {
            "name": "retrieval_mnist",
            "root": str(tmp_path),
            "augment": False,
            "options": {"queries": 2},
            "sampler": {"name": "pk", "k": 2},
        },
        "student": {"name": "embed_cnn", "kwargs": {"width": 0.25, "dim": 8}},
        "method": {"name": "metric", "contrastive_weight": 0.5},
        "train": {"epochs": 2, "batch_size": 10, "progress": "none", "scheduler": {"name": "constant"}},
    }
    summary = Trainer(build_config(recipe), tmp_path / "run").fit()
    assert summary["task"] == "retrieval" and summary["best"]["metric"] == "map"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"rank1", "rank5", "map", "recall10"} <= set(records[-1]["test"])
    assert {"loss_ce", "loss_triplet", "loss_contrastive"} <= set(records[-1]["train"])
    assert 0.0 <= summary["final"]["test"]["map"] <= 100.0
    # `kdforge eval` scores the model file through the same task: the same mAP
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run" / "checkpoints" / "model_last.pt"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["map"] == pytest.approx(summary["final"]["test"]["map"])


def test_crd_distils_the_embedding_on_retrieval_with_other_identity_negatives():
    student = create("embed_cnn", num_classes=5, in_channels=1, width=0.25, dim=8)
    teacher = create("embed_cnn", num_classes=5, in_channels=1, width=0.5, dim=16)
    train = TensorData(images=torch.randint(0, 255, (20, 1, 12, 12), dtype=torch.uint8), labels=torch.arange(20) % 5)
    crd = METHODS.get("crd").from_data(
        student, [teacher], {"student_layers": ["embedding"], "num_negatives": 8, "feature_dim": 4}, data=train
    )
    crd.use_task(task_for(type("Info", (), {"task": "retrieval", "name": "toy"})()))
    out = crd(batch_of(torch.rand(10, 1, 12, 12), classes=5), Step())
    assert {"ce", "crd"} <= set(out.losses) and torch.isfinite(out.loss)
    out.loss.backward()
    assert student.neck[0].weight.grad is not None  # the embedding itself is trained by CRD

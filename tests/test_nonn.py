"""NoNN: filter graph, partitions, the nonn loss, training end to end, and real distributed serving."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdforge.config import build_config
from kdforge.core.checkpoint import atomic_save, model_record, read_model_file
from kdforge.core.errors import ConfigError
from kdforge.data import load_dataset
from kdforge.methods import METHODS, Step
from kdforge.methods.nonn import NoNN, mixing_matrix
from kdforge.models import create
from kdforge.models.nonn import NoNNSystem, fill_missing
from kdforge.nonn import Partition, partition_teacher
from kdforge.nonn.graph import coactivation_graph, correlation_graph, threshold_graph
from kdforge.nonn.partition import (
    balanced_sizes,
    kway_spectral_groups,
    louvain_groups,
    partition_filters,
    partition_statistics,
    recursive_spectral_groups,
    spectral_groups,
)

ROOT = Path(__file__).resolve().parents[1]
DIGITS = load_dataset("digits")
INFO = DIGITS.info


# --------------------------------------------------------------------------- graph
ACTS = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 3.0], [-1.0, 4.0, 2.0]])


def test_hebbian_graph_pinned_on_a_hand_made_tensor():
    # scaled rows: [1, .5, 0], [0, 1, 1], [0, 1, .5] (negatives clipped, divided by the row max)
    # pairs: (0,1) 1*.5/(.5+1) = 1/3; (1,2) 1*1/(0+1) = 1 and 1*.5/(.5+1) = 1/3
    w = coactivation_graph(ACTS, "hebbian", top_k=3)
    raw = np.array([[0, 1 / 3, 0], [1 / 3, 0, 4 / 3], [0, 4 / 3, 0]])
    np.testing.assert_allclose(w, raw / (4 / 3), atol=1e-12)
    # the framework's "non-coactivation" weight a_f a_g |a_f - a_g|: (0,1) .25; (1,2) 0 + .25
    np.testing.assert_allclose(
        coactivation_graph(ACTS, "noncoactivation", top_k=3), [[0, 1, 0], [1, 0, 1], [0, 1, 0]], atol=1e-12
    )
    # top-1 keeps a single filter per image, so no pair ever forms
    assert not coactivation_graph(ACTS, "hebbian", top_k=1).any()
    # top-2 on image 3 keeps filters 1 and 2 (filter 0 is negative), on image 1 filters 0 and 1
    np.testing.assert_allclose(coactivation_graph(ACTS, "hebbian", top_k=2), raw / (4 / 3), atol=1e-12)


def test_correlation_graph_and_threshold():
    acts = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    acts[:, 1] = acts[:, 0] * 2 + 0.1 * acts[:, 1]
    acts[:, 3] = 1.0  # constant filter: no edges
    w = correlation_graph(acts)
    expected = np.clip(np.corrcoef(acts[:, :3].numpy().T), 0, 1)
    np.fill_diagonal(expected, 0)
    np.testing.assert_allclose(w[:3, :3], expected, atol=1e-10)
    assert not w[3].any() and not w[:, 3].any()
    kept = threshold_graph(np.array([[0, 1, 2, 3], [1, 0, 4, 5], [2, 4, 0, 6], [3, 5, 6, 0.0]]), 50)
    assert kept[np.triu_indices(4, 1)].tolist() == [0, 0, 0, 4, 5, 6]


# --------------------------------------------------------------------------- partitions
def planted(n_per: int = 8, blocks: int = 2, seed: int = 0) -> tuple[np.ndarray, list[set[int]]]:
    rng = np.random.default_rng(seed)
    n = n_per * blocks
    label = np.repeat(np.arange(blocks), n_per)
    perm = rng.permutation(n)  # community members are not contiguous indices
    label = label[perm]
    w = np.where(label[:, None] == label[None, :], rng.uniform(0.6, 1.0, (n, n)), rng.uniform(0, 0.1, (n, n)))
    w = np.triu(w, 1)
    w = w + w.T
    return w, [set(np.flatnonzero(label == b).tolist()) for b in range(blocks)]


@pytest.mark.parametrize("method", ["spectral", "spectral_recursive", "spectral_kway", "louvain"])
def test_partitions_recover_planted_communities(method):
    w, truth = planted()
    part = partition_filters(w, 2, method, percentile=50, discard_largest=False)
    assert sorted(map(set, part.groups), key=min) == sorted(truth, key=min)
    assert part.statistics["within_fraction"] > 0.8


def test_louvain_follows_nonn_mapping_and_spectral_is_balanced():
    w, truth = planted(n_per=6, blocks=3)
    w = np.pad(w, (0, 2))  # filters 18 and 19 are isolated: singletons, merged into one group
    # NoNN's mapping: groups by size (6, 6, 6, 2); the largest (ties: lowest filter first, i.e. the
    # community of filter 0) is discarded, the next two seed the students, {18, 19} joins the one
    # with the fewest filters (ties: the first)
    groups = louvain_groups(w, 2, percentile=None, resolution=1.0)
    kept = sorted((c for c in truth if 0 not in c), key=min)
    assert sorted(map(set, groups), key=min) == [kept[0] | {18, 19}, kept[1]]
    report: dict = {}
    split = louvain_groups(w, 4, percentile=None, resolution=1.0, underfull="split", report=report)
    assert report["splits"] == 1 and sorted(len(g) for g in split) == [2, 3, 3, 6]
    with pytest.raises(ConfigError, match="spectral partition"):
        louvain_groups(w, 4, percentile=None, resolution=1.0, underfull="error")
    rng = np.random.default_rng(1)
    dense = rng.uniform(size=(13, 13))
    dense = dense + dense.T
    for fn in (spectral_groups, recursive_spectral_groups, kway_spectral_groups):
        for n in (2, 3, 4, 5):
            groups = fn(dense, n)
            sizes = sorted(len(g) for g in groups)
            assert sizes[-1] - sizes[0] <= 1 and sum(sizes) == 13, (fn.__name__, n)
            assert sorted(f for g in groups for f in g) == list(range(13))
    assert balanced_sizes(10, 4) == [3, 3, 2, 2]


def test_partition_file_round_trip_with_statistics(tmp_path):
    w = np.array([[0, 4, 1, 0], [4, 0, 0, 2], [1, 0, 0, 3], [0, 2, 3, 0.0]])
    stats = partition_statistics(w, [[0, 1], [2, 3]])
    assert stats["sizes"] == [2, 2] and stats["within_weight"] == [4.0, 3.0]
    assert stats["within_total"] == 7.0 and stats["between_total"] == 3.0
    assert stats["within_fraction"] == pytest.approx(0.7)
    assert stats["within_density"] == 3.5 and stats["between_density"] == 0.75
    discarded = partition_statistics(w, [[0], [1]])
    assert discarded["discarded"] == 2 and discarded["discarded_weight"] == 6.0

    part = Partition([[1, 0], [3]], 4, "louvain", {"graph": "hebbian"}).with_statistics(w)
    path = part.save(tmp_path / "p.json")
    loaded = Partition.load(path)
    assert loaded.groups == [[0, 1], [3]] and loaded.discarded == [2]
    assert loaded.statistics == part.statistics and loaded.settings == {"graph": "hebbian"}
    assert json.loads(path.read_text())["format"] == "kdforge-nonn-partition"
    with pytest.raises(ConfigError, match="two groups"):
        Partition([[0, 1], [1]], 4)
    with pytest.raises(ConfigError, match="nonn-partition"):
        Partition.load(tmp_path / "missing.json")


# --------------------------------------------------------------------------- model and loss
def digits_teacher(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    teacher = create("lenet", num_classes=10, in_channels=1, input_size=(8, 8))
    record = model_record(
        teacher,
        name="lenet",
        kwargs={},
        num_classes=10,
        in_channels=1,
        input_size=(8, 8),
        dataset=dataclasses.asdict(INFO),
    )
    path = tmp_path / "teacher.pt"
    atomic_save(record, path)
    return path


def small_system(groups=None, students=3) -> NoNNSystem:
    return create(
        "nonn",
        num_classes=10,
        in_channels=1,
        input_size=(8, 8),
        student="lenet",
        student_kwargs={"width": 0.5},
        num_students=None if groups else students,
        groups=groups,
    )


def test_fill_missing_zeros_and_neighbors():
    a, b, c = torch.ones(2, 3), 3 * torch.ones(2, 3), 5 * torch.ones(2, 3)
    zeros = fill_missing([a, None, c], "zeros")
    assert torch.equal(zeros[1], torch.zeros(2, 3))
    assert torch.equal(fill_missing([a, None, c], "neighbors")[1], 3 * torch.ones(2, 3))
    assert torch.equal(fill_missing([None, b, c], "neighbors")[0], b)  # one neighbour at the end
    assert torch.equal(fill_missing([a, None, None, c], "neighbors")[1], a)  # filled from originals only
    assert torch.equal(mixing_matrix(3, 0.5), torch.tensor([[0.5, 0.5, 0], [0.25, 0.5, 0.25], [0, 0.5, 0.5]]))


def test_nonn_loss_pinned_against_an_independent_computation():
    torch.manual_seed(0)
    teacher = create("lenet", num_classes=10, in_channels=1, input_size=(8, 8))
    groups = [[0, 5, 9, 2], [1, 3, 4, 6, 7], [8, 10, 11, 12, 13, 14, 15]]
    system = small_system(groups)
    params = {"alpha": 0.7, "temperature": 3.0, "beta": 50.0, "redundancy": 0.4}
    distiller = METHODS.get("nonn")(system, [teacher], params)
    assert system.fill == "neighbors"  # redundancy -> neighbour fill by default
    batch_images = torch.randn(6, 1, 8, 8)
    targets = torch.randint(0, 10, (6,))
    from kdforge.data.batch import Batch

    batch = Batch({"image": batch_images}, targets, torch.arange(6))
    out = distiller(batch, Step())

    with torch.no_grad():
        t_feat = teacher.stage2(teacher.stage1(batch_images))
        t_logits = teacher(batch_images)
        maps = [s.stage2(s.stage1(batch_images)) for s in system.students]
        pooled = [s(batch_images) for s in system.students]
        logits = system.head(torch.cat(pooled, 1))
        ce = F.cross_entropy(logits, targets)
        p_t = F.softmax(t_logits / 3, 1)
        kd = 9 * (p_t * (p_t.log() - F.log_softmax(logits / 3, 1))).sum(1).mean()
        group_maps = [t_feat[:, g].pow(2).mean(1) for g in groups]
        at = 0.0
        for i, s_map in enumerate(maps):
            nbrs = [j for j in (i - 1, i + 1) if 0 <= j < 3]
            target = 0.6 * group_maps[i] + 0.4 * sum(group_maps[j] for j in nbrs) / len(nbrs)
            a_t = target.flatten(1) / target.flatten(1).norm(dim=1, keepdim=True)
            a_s = s_map.pow(2).mean(1).flatten(1)
            a_s = a_s / a_s.norm(dim=1, keepdim=True)
            at = at + (a_s - a_t).pow(2).mean()
    torch.testing.assert_close(out.logits.detach(), logits)
    torch.testing.assert_close(out.losses["ce"].detach(), 0.3 * ce)
    torch.testing.assert_close(out.losses["kd"].detach(), 0.7 * kd)
    torch.testing.assert_close(out.losses["at"].detach(), 50.0 * at)

    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in system.head.parameters())
    assert all(any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters()) for s in system.students)
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="'nonn' model"):
        METHODS.get("nonn")(create("lenet", in_channels=1), [teacher])


def test_method_computes_the_partition_from_training_images():
    torch.manual_seed(0)
    teacher = create("lenet", num_classes=10, in_channels=1, input_size=(8, 8))
    system = small_system(students=2)
    distiller = NoNN(
        system,
        [teacher],
        {"partition": "spectral", "graph": "correlation"},
        train_data=DIGITS.train.select(torch.arange(200)),
        normalization=(INFO.mean, INFO.std),
    )
    assert len(system.groups) == 2 and sorted(len(g) for g in system.groups) == [8, 8]
    assert system.saved_kwargs["partition"]["statistics"]["sizes"] == [8, 8]
    assert distiller.members.shape == (2, 16) and "members" not in distiller.state_dict()
    from kdforge.data import Augmentation

    same = partition_teacher(
        teacher,
        DIGITS.train.images[:200],
        "stage2",
        2,
        graph="correlation",
        normalize=Augmentation.for_dataset(INFO).normalize,
    )
    assert same.groups == system.groups


# --------------------------------------------------------------------------- end to end
def test_two_epoch_training_saves_a_loadable_system(tmp_path):
    teacher = digits_teacher(tmp_path)
    config = build_config(
        {
            "name": "nonn",
            "data": {"name": "digits", "augment": False, "train_subset": 300},
            "student": {
                "name": "nonn",
                "kwargs": {"student": "lenet", "student_kwargs": {"width": 0.5}, "num_students": 2},
            },
            "teachers": [{"checkpoint": str(teacher)}],
            "method": {
                "name": "nonn",
                "partition": "louvain",
                "graph": "correlation",
                "percentile": 80,
                "redundancy": 0.5,
                "beta": 100,
            },
            "train": {
                "epochs": 2,
                "batch_size": 64,
                "optimizer": {"name": "sgd", "lr": 0.02},
                "scheduler": {"name": "cosine"},
                "grad_clip": 5.0,
                "progress": "none",
            },
        }
    )
    from kdforge.engine.trainer import Trainer

    trainer = Trainer(config, tmp_path / "run")
    summary = trainer.fit()
    assert summary["status"] == "finished" and summary["epochs_done"] == 2
    lines = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert {"loss_ce", "loss_kd", "loss_at"} <= set(lines[-1]["train"])
    record = read_model_file(tmp_path / "run/checkpoints/model_last.pt")
    kwargs = record["model"]["kwargs"]
    assert record["model"]["name"] == "nonn" and kwargs["fill"] == "neighbors"
    assert len(kwargs["groups"]) == 2 and kwargs["partition"]["method"] == "louvain"
    from kdforge.nonn.serve import load_system

    system = load_system(tmp_path / "run/checkpoints/model_last.pt")
    x = torch.randn(4, 1, 8, 8)
    deployed = trainer.distiller.inference_model().eval()
    with torch.no_grad():
        torch.testing.assert_close(system(x), deployed(x))
    # `kdforge eval` reads the same file through the ordinary model-file path
    from kdforge.cli import main

    assert main(["eval", str(tmp_path / "run/checkpoints/model_last.pt")]) == 0


def test_nonn_partition_command_writes_the_file(tmp_path, capsys):
    from kdforge.cli import main

    teacher = digits_teacher(tmp_path)
    code = main(
        [
            "nonn-partition",
            str(teacher),
            "--students",
            "3",
            "--method",
            "spectral_kway",
            "--graph",
            "correlation",
            "--images",
            "300",
            "--out",
            str(tmp_path / "p.json"),
        ]
    )
    assert code == 0 and "spectral_kway partition of 16 'stage2' filters" in capsys.readouterr().out
    part = Partition.load(tmp_path / "p.json")
    assert part.num_groups == 3 and part.statistics["balance"] <= 6 / 5
    assert part.source["images"] == 300 and part.source["layer"] == "stage2"
    # a recipe can point the method at the file instead of computing a partition
    from kdforge.core.checkpoint import load_weights

    lenet = create("lenet", num_classes=10, in_channels=1, input_size=(8, 8))
    load_weights(lenet, read_model_file(teacher)["state_dict"], "teacher")
    system = small_system(students=3)
    NoNN(system, [lenet], {"partition_file": str(tmp_path / "p.json")})
    assert system.groups == part.groups and system.partition["method"] == "spectral_kway"
    with pytest.raises(ValueError, match="num_students to 3"):
        NoNN(small_system(students=2), [lenet], {"partition_file": str(tmp_path / "p.json")})


# --------------------------------------------------------------------------- serving
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A 3-student system file, its devices as real processes, and one more (slow) device 2."""
    from kdforge.nonn.serve import DeviceCluster

    folder = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    system = small_system([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15]])
    system.fill = "neighbors"
    record = model_record(
        system,
        name="nonn",
        kwargs={"student": "lenet", "student_kwargs": {"width": 0.5}, **system.saved_kwargs},
        num_classes=10,
        in_channels=1,
        input_size=(8, 8),
        dataset=dataclasses.asdict(INFO),
    )
    path = folder / "system.pt"
    atomic_save(record, path)
    slow = subprocess.Popen(
        [sys.executable, "-m", "kdforge.nonn.serve", "device", "--model", str(path), "--index", "2", "--delay", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    cluster = DeviceCluster(path).start()
    line = DeviceCluster._read_line(slow, time.monotonic() + 120)
    try:
        assert line.startswith("READY"), line
        slow_address = (line.split()[1], int(line.split()[2]))
        yield path, cluster, slow_address
    finally:
        cluster.stop()
        slow.kill()
        slow.wait(timeout=30)
        slow.stdout.close()
        slow.stderr.close()


def test_served_answers_match_in_process_inference(served):
    from kdforge.nonn.serve import Aggregator, encode, frame_bytes, load_system

    path, cluster, _ = served
    system = load_system(path)
    images = DIGITS.test.images[:7]
    x = (images.float() / 255 - INFO.mean[0]) / INFO.std[0]
    with Aggregator.from_model_file(path, cluster.addresses, deadline=5.0) as agg:
        answer = agg.classify(x)
        assert answer.failed == [] and answer.devices == 3
        with torch.no_grad():
            torch.testing.assert_close(answer.logits, system(x), atol=1e-5, rtol=1e-5)
        # bytes: the same request frame to each device; one features frame back from each
        request = encode({"op": "infer", "id": agg.request_id}, x)
        assert answer.bytes_sent == 3 * len(request)
        one = frame_bytes({"op": "features", "id": agg.request_id, "device": 0}, (7, system.student_dim))
        assert answer.bytes_received == 3 * one
        pixels = agg.classify(images)  # raw uint8 pixels, normalised on the devices
        torch.testing.assert_close(pixels.logits, answer.logits, atol=1e-4, rtol=1e-4)
        assert pixels.bytes_sent < answer.bytes_sent


def test_aggregator_server_answers_a_remote_client(served):
    import threading

    from kdforge.nonn.serve import (
        Aggregator,
        AggregatorServer,
        classify_remote,
        load_system,
    )

    path, cluster, _ = served
    x = torch.randn(2, 1, 8, 8)
    server = AggregatorServer(Aggregator.from_model_file(path, cluster.addresses, deadline=5.0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        logits, header = classify_remote(server.address, x)
    finally:
        server.close()
        server.aggregator.close()
    assert header["failed"] == []
    with torch.no_grad():
        torch.testing.assert_close(logits, load_system(path)(x), atol=1e-5, rtol=1e-5)


def test_late_device_is_failed_at_the_deadline(served):
    from kdforge.nonn.serve import Aggregator, load_system

    path, cluster, slow_address = served
    system = load_system(path)
    x = torch.randn(2, 1, 8, 8)
    with Aggregator.from_model_file(path, [*cluster.addresses[:2], slow_address], deadline=1.5) as agg:
        answer = agg.classify(x)
    assert answer.failed == [2] and answer.late == [2] and answer.down == []
    assert 1.45 <= answer.seconds < 3.0  # the slow device answers after 5 s; the answer came at the deadline
    with torch.no_grad(), system.failing([2]):
        expected = system(x)  # device 2 replaced by its neighbour's (device 1's) features
    torch.testing.assert_close(answer.logits, expected, atol=1e-5, rtol=1e-5)


def test_killed_device_still_gets_an_answer_within_the_deadline(served):
    from kdforge.nonn.serve import Aggregator, encode, frame_bytes, load_system

    path, cluster, _ = served
    system = load_system(path)
    x = torch.randn(3, 1, 8, 8)
    with Aggregator.from_model_file(path, cluster.addresses, deadline=2.0) as agg:
        assert agg.classify(x).failed == []  # connections open before the kill
        cluster.kill(1)
        assert cluster.alive() == [True, False, True]
        answer = agg.classify(x)
        assert answer.failed == [1] and answer.down == [1]
        assert answer.seconds < 2.0
        for fill in ("neighbors", "zeros"):
            agg.fill = fill
            answer = agg.classify(x)
            with torch.no_grad(), system.failing([1], fill):
                expected = system(x)
            torch.testing.assert_close(answer.logits, expected, atol=1e-5, rtol=1e-5)
        # only the two live devices were sent the request (the dead one refuses the connection)
        assert answer.bytes_sent == 2 * len(encode({"op": "infer", "id": agg.request_id}, x))
        one = frame_bytes({"op": "features", "id": agg.request_id, "device": 0}, (3, system.student_dim))
        assert answer.bytes_received == 2 * one


def test_serve_nonn_command_evaluates_with_a_killed_device(served):
    path, _, _ = served
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdforge",
            "serve-nonn",
            str(path),
            "--eval",
            "60",
            "--batch-size",
            "20",
            "--kill",
            "0",
            "--deadline",
            "2",
            "--uint8",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["images"] == 60 and report["killed"] == [0]
    assert report["failed_devices_per_batch"] == {"0": 3}
    assert report["agreement_with_in_process"] == 100.0
    assert report["max_batch_seconds"] < 2.0
    assert report["one_image_frames"]["raw_uint8_pixels"] == 64


def test_frames_round_trip_and_reject_garbage():
    from kdforge.nonn.serve import FrameReader, ProtocolError, encode, frame_bytes

    x = torch.arange(12, dtype=torch.float32).view(3, 4)
    frame = encode({"op": "features", "id": 7}, x)
    assert len(frame) == frame_bytes({"op": "features", "id": 7}, (3, 4))
    reader = FrameReader()
    assert reader.feed(frame[:10]) == []
    ((header, tensor, size),) = reader.feed(frame[10:])
    assert header["id"] == 7 and size == len(frame) and torch.equal(tensor, x)
    with pytest.raises(ProtocolError):
        FrameReader().feed(b"GET / HTTP/1.1\r\n\r\n")

"""KD-guided DARTS: the relaxed edge, discretisation, genotype round-trip through `kdforge train`,
an end-to-end `kdforge search` (with an annealed-temperature KD objective and --resume) on
fabricated MNIST files, and one-line recipe errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from test_data import write_mnist_files

from kdforge.cli import main
from kdforge.compress.arch import load_model_file
from kdforge.config import build_config
from kdforge.core.errors import ConfigError
from kdforge.engine.search import SearchSettings, load_search_recipe, temperature_at
from kdforge.engine.trainer import Trainer
from kdforge.models import create
from kdforge.models.darts import OPS, PRIMITIVES, GenotypeNetwork, MixedOp, SearchNetwork, derive_genotype


def test_mixed_op_is_the_softmax_weighted_sum_of_its_operations():
    torch.manual_seed(0)
    edge = MixedOp(4, 1, PRIMITIVES).eval()
    x = torch.randn(2, 4, 6, 6)
    outputs = [op(x) for op in edge.ops]
    alphas = torch.randn(len(PRIMITIVES))
    weights = torch.softmax(alphas, 0)
    expected = sum(w * o for w, o in zip(weights, outputs))
    assert torch.allclose(edge(x, weights), expected, atol=1e-6)
    one_hot = torch.zeros(len(PRIMITIVES))
    one_hot[PRIMITIVES.index("max_pool_3x3")] = 1.0
    assert torch.allclose(edge(x, one_hot), torch.nn.functional.max_pool2d(x, 3, 1, 1))
    # the supernet feeds every cell the softmax of its alphas
    net = SearchNetwork(num_classes=3, in_channels=1, channels=2, layers=3, steps=2)
    normal, reduce = net.edge_weights()
    assert torch.allclose(normal.sum(1), torch.ones(len(normal))) and normal.shape == (5, len(PRIMITIVES))
    assert net(torch.rand(2, 1, 12, 12)).shape == (2, 3)


def test_derive_keeps_the_top_edges_with_their_argmax_operation_and_ignores_none():
    steps, ops = 2, PRIMITIVES
    normal = torch.full((5, len(ops)), 0.01)
    # node 2 (edges 0, 1 from inputs 0, 1): sep_conv_3x3 on input 1, avg_pool on input 0
    normal[0, ops.index("avg_pool_3x3")] = 0.5
    normal[1, ops.index("sep_conv_3x3")] = 0.9
    # node 3 (edges 2, 3, 4 from inputs 0, 1, 2): 'none' dominates edge 2 but is never chosen;
    # the best non-none weights are skip (0.7, input 2) and dil_conv (0.6, input 0)
    normal[2, ops.index("none")] = 0.99
    normal[2, ops.index("dil_conv_3x3")] = 0.6
    normal[3, ops.index("max_pool_3x3")] = 0.2
    normal[4, ops.index("skip_connect")] = 0.7
    genotype = derive_genotype(normal, normal.clone(), steps, ops, top_k=2)
    assert genotype["normal"] == [
        ["avg_pool_3x3", 0],
        ["sep_conv_3x3", 1],
        ["dil_conv_3x3", 0],
        ["skip_connect", 2],
    ]
    assert genotype["normal_concat"] == [2, 3] and genotype["steps"] == 2
    net = GenotypeNetwork(genotype, num_classes=4, in_channels=1, channels=4, layers=3)
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 4)
    assert isinstance(net.cells[0].ops[1][1], torch.nn.Conv2d)  # sep_conv_3x3's depth-wise conv
    with pytest.raises(ConfigError, match="unknown operation 'sep_conv_7x7'"):
        GenotypeNetwork({**genotype, "normal": [["sep_conv_7x7", 0]] * 4}, 4, 1)


def test_annealed_temperature_runs_from_high_to_one():
    settings = SearchSettings(epochs=5, objective="kd_annealed", temperature_start=10.0, anneal="linear")
    assert [temperature_at(settings, e) for e in range(5)] == pytest.approx([10, 7.75, 5.5, 3.25, 1])
    exponential = SearchSettings(epochs=3, objective="kd_annealed", temperature_start=9.0)
    assert [temperature_at(exponential, e) for e in range(3)] == pytest.approx([9, 3, 1])
    assert temperature_at(SearchSettings(objective="kd_fixed", temperature=4.0), 2) == 4.0
    assert temperature_at(SearchSettings(objective="ce"), 0) == 1.0


def _teacher(tmp_path):
    recipe = {
        "name": "teacher",
        "data": {"name": "mnist", "root": str(tmp_path), "augment": False},
        "student": {"name": "lenet", "kwargs": {"width": 0.5}},
        "method": {"name": "ce"},
        "train": {"epochs": 1, "batch_size": 16, "progress": "none"},
    }
    Trainer(build_config(recipe), tmp_path / "teacher").fit()
    return tmp_path / "teacher" / "checkpoints" / "model_last.pt"


def _search_recipe(tmp_path, teacher=None, **search):
    recipe = {
        "name": "tiny",
        "data": {"name": "mnist", "root": str(tmp_path), "augment": False},
        "search": {
            "epochs": 2,
            "batch_size": 8,
            "max_batches": 2,
            "channels": 2,
            "layers": 3,
            "steps": 2,
            "eval_samples": 20,
            **search,
        },
        "derived": {"channels": 4, "layers": 3},
    }
    if teacher is not None:
        recipe["teacher"] = {"checkpoint": str(teacher)}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_kdforge_search_end_to_end_with_annealed_kd_and_resume(tmp_path, capsys):
    write_mnist_files(tmp_path / "MNIST" / "raw", train=80, test=20)
    recipe = _search_recipe(tmp_path, _teacher(tmp_path), objective="kd_annealed", temperature_start=8.0)
    out = tmp_path / "search"
    assert main(["search", str(recipe), "--out", str(out), "--set", "search.epochs=1"]) == 0
    assert main(["search", str(recipe), "--out", str(out)]) == 2  # a finished search is not overwritten
    assert "--resume" in capsys.readouterr().err
    assert main(["search", str(recipe), "--out", str(out), "--resume", "--set", "search.epochs=3"]) == 0
    history = [json.loads(line) for line in (out / "alpha_history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [0, 1, 2]
    temperatures = [r["temperature"] for r in history]
    assert temperatures[0] == pytest.approx(8.0) and temperatures[-1] == pytest.approx(1.0)
    assert temperatures == sorted(temperatures, reverse=True)
    assert all(abs(sum(row) - 1.0) < 1e-3 for row in history[-1]["alphas_normal"])
    genotype = json.loads((out / "genotype.json").read_text())
    assert genotype == history[-1]["genotype"]
    assert all(op in OPS and op != "none" for op, _ in genotype["normal"] + genotype["reduce"])
    summary = json.loads((out / "search_summary.json").read_text())
    assert summary["objective"] == "kd_annealed" and summary["first_order"] is True
    assert summary["derived_parameters"] == sum(
        p.numel() for p in GenotypeNetwork(genotype, 10, 1, channels=4, layers=3).parameters()
    )


def test_the_searched_genotype_trains_with_kdforge_train_and_rebuilds(tmp_path):
    write_mnist_files(tmp_path / "MNIST" / "raw", train=64, test=20)
    out = tmp_path / "search"
    assert main(["search", str(_search_recipe(tmp_path, objective="ce", epochs=1)), "--out", str(out)]) == 0
    student = yaml.safe_load((out / "student.yaml").read_text())["student"]
    genotype = json.loads((out / "genotype.json").read_text())
    assert student["kwargs"]["genotype"] == genotype
    recipe = {
        "name": "derived",
        "data": {"name": "mnist", "root": str(tmp_path), "augment": False},
        "student": student,
        "method": {"name": "ce"},
        "train": {"epochs": 1, "batch_size": 16, "progress": "none"},
    }
    Trainer(build_config(recipe), tmp_path / "run").fit()
    model, _ = load_model_file(tmp_path / "run" / "checkpoints" / "model_last.pt")
    reference = create(
        "darts_net", num_classes=10, in_channels=1, genotype=str(out / "genotype.json"), channels=4, layers=3
    )
    assert model.genotype == genotype
    assert [(n, p.shape) for n, p in model.named_parameters()] == [
        (n, p.shape) for n, p in reference.named_parameters()
    ]


def test_bad_search_recipes_fail_in_one_line(tmp_path):
    write_mnist_files(tmp_path / "MNIST" / "raw", train=40, test=10)
    cases = [
        ({"epoch": 3}, "epoch"),
        ({"objective": "kd_annealed"}, "teacher"),
        ({"primitives": ["sep_conv_3x3", "sep_conv_9x9"]}, "sep_conv_9x9"),
        ({"objective": "kd_sometimes"}, "objective"),
    ]
    for search, needle in cases:
        with pytest.raises(ConfigError, match=needle) as caught:
            load_search_recipe(_search_recipe(tmp_path, **search))
        assert "\n" not in str(caught.value)


def test_search_on_the_retrieval_task_with_pk_batches(tmp_path):
    write_mnist_files(tmp_path / "MNIST" / "raw", train=120, test=40)
    path = _search_recipe(tmp_path, objective="ce", epochs=1, batch_size=10, max_batches=2)
    recipe = yaml.safe_load(path.read_text())
    recipe["data"] = {
        "name": "retrieval_mnist",
        "root": str(tmp_path),
        "augment": False,
        "options": {"queries": 2},
        "sampler": {"name": "pk", "k": 2},
    }
    path.write_text(yaml.safe_dump(recipe))
    assert main(["search", str(path), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "search_summary.json").read_text())
    assert summary["task"] == "retrieval" and "map" in summary["arch_split"]  # ranked by pooled features

"""Cross-modal methods: modality_kd's masked CE (hand-checked), CCL's losses (hand-checked) and its
gradient routing, and one-line errors for bad input names."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdforge.config import build_config
from kdforge.core.errors import ConfigError
from kdforge.data.batch import Batch
from kdforge.data.sources.common import info_for
from kdforge.data.types import DataSplits, TensorData
from kdforge.engine.build import build_distiller, student_view
from kdforge.methods import METHODS
from kdforge.methods.base import Step
from kdforge.methods.ccl import label_aware_nce, symmetric_kl


class Passthrough(nn.Module):
    """Logits = the input itself (a network whose output is hand-checkable)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale


def _paired_batch(labelled=(True, False)):
    return Batch(
        inputs={"sensor": torch.zeros(2, 2), "image": torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])},
        targets=torch.tensor([0, 1]),
        index=torch.arange(2),
        extras={"labelled": torch.tensor(labelled)},
        primary="sensor",
    )


def test_modality_kd_masks_the_ce_of_unlabelled_samples():
    teacher = Passthrough()
    teacher.kdforge_input = "image"
    params = {"temperature": 1.0, "kd_weight": 0.5}
    distiller = METHODS.get("modality_kd")(Passthrough(), [teacher], params)
    out = distiller(_paired_batch(), Step())
    # student uniform (0.5, 0.5); teacher sample 0 (0.75, 0.25), sample 1 uniform: KL 0
    kl0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert out.losses["kd"].item() == pytest.approx(0.5 * kl0 / 2, rel=1e-6)
    # CE over the labelled sample only: -log 0.5, weight 1 - alpha
    assert out.losses["ce"].item() == pytest.approx(0.5 * math.log(2.0), rel=1e-6)
    none_labelled = distiller(_paired_batch((False, False)), Step())
    assert none_labelled.losses["ce"].item() == 0.0


def test_modality_kd_default_anneals_alpha_and_selection_keeps_unlabelled():
    teacher = Passthrough()
    teacher.kdforge_input = "image"
    distiller = METHODS.get("modality_kd")(Passthrough(), [teacher], {"select": "correct"})
    start = distiller(_paired_batch(), Step(global_step=0, total_steps=11)).metrics["kd_weight"]
    end = distiller(_paired_batch(), Step(global_step=10, total_steps=11)).metrics["kd_weight"]
    assert (start, end) == (pytest.approx(0.95), pytest.approx(0.1))
    # sample 0: labelled and the teacher is right -> distilled; sample 1: unlabelled -> distilled
    assert distiller(_paired_batch(), Step()).metrics["distilled_fraction"].item() == 1.0
    wrong = _paired_batch()
    wrong.targets = torch.tensor([1, 1])  # teacher says 0 for sample 0: not distilled
    assert distiller(wrong, Step()).metrics["distilled_fraction"].item() == 0.5


def test_label_aware_nce_against_a_hand_computed_case():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 0])
    tau = 0.5
    cos = [[1.0, 1 / math.sqrt(2), 0.0], [0.0, 1 / math.sqrt(2), 1.0], [1 / math.sqrt(2), 1.0, 1 / math.sqrt(2)]]
    total = 0.0
    for i in range(3):
        exps = [math.exp(c / tau) for c in cos[i]]
        p = [e / sum(exps) for e in exps]
        positives = [j for j in range(3) if y[j] == y[i]]
        negatives = [j for j in range(3) if y[j] != y[i]]
        total += sum(-math.log(p[j]) for j in positives) / len(positives)
        total += sum(-math.log(1 - p[j]) for j in negatives) / len(negatives)
    assert label_aware_nce(a, b, y, tau).item() == pytest.approx(total / 3, rel=1e-5)
    # a batch of one class has no negatives: only the pull term
    same = torch.zeros(3, dtype=torch.long)
    assert torch.isfinite(label_aware_nce(a, b, same, tau))


def test_symmetric_kl_hand_value():
    p = torch.tensor([[math.log(3.0), 0.0]])  # (0.75, 0.25)
    q = torch.zeros(1, 2)  # (0.5, 0.5)
    kl_pq = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    kl_qp = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert symmetric_kl(p, q).item() == pytest.approx(0.5 * (kl_pq + kl_qp), rel=1e-6)


class Tiny(nn.Module):
    """Linear features (``pool``) and a classifier: inputs of any width D."""

    def __init__(self, width: int, features: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Linear(width, features)
        self.pool = nn.ReLU()
        self.classifier = nn.Linear(features, classes)
        self.feature_points = {"pool": "pool", "logits": "classifier"}
        self.input_shape = (width,)

    def forward(self, x):
        return self.classifier(self.pool(self.body(x)))


def test_ccl_each_side_reaches_only_its_own_parameters():
    torch.manual_seed(0)
    teacher = Tiny(5, features=4)
    teacher.kdforge_input = "audio"
    teacher.kdforge_input_shape = (5,)
    distiller = METHODS.get("ccl")(Tiny(7), [teacher], {"nce_temperature": 0.5}, input_shape=(7,))
    batch = Batch(
        inputs={"image": torch.randn(8, 7), "audio": torch.randn(8, 5)},
        targets=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]),
        index=torch.arange(8),
    )
    groups = {g.name: g.parameters for g in distiller.optimizer_groups()}
    assert set(groups) == {"main", "composition"}
    assert distiller.projections[0].weight.shape == (4, 6)  # student feature -> teacher feature size
    out = distiller(batch, Step())
    out.losses["ccl_student"].backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in groups["composition"])
    assert distiller.student.body.weight.grad.abs().sum() > 0
    distiller.zero_grad(set_to_none=True)
    out.losses["ccl_composition"].backward()
    assert all(p.grad is None for p in groups["main"])
    assert all(p.grad is not None for p in groups["composition"])
    assert all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------- recipe errors
def _splits(unlabelled: bool = False) -> DataSplits:
    n = 24
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)
    audio = torch.randn(n, 1, 6, 10)
    extras = {"labelled": torch.arange(n) < 12} if unlabelled else {}
    train = TensorData(images, torch.arange(n) % 3, extra_inputs={"audio": audio}, extras=extras)
    test = TensorData(images[:6], torch.arange(6) % 3, extra_inputs={"audio": audio[:6]})
    names = ["a", "b", "c"]
    image_info = info_for("pairs", (1, 8, 8), names, (0.5,), (0.25,), "image")
    audio_info = info_for("pairs", (1, 6, 10), names, (0.0,), (1.0,), "spectrogram")
    import dataclasses

    info = dataclasses.replace(image_info, extra_inputs={"audio": dataclasses.replace(audio_info, input_name="audio")})
    return DataSplits(train=train, val=None, test=test, info=info)


def _config(student_input="audio", teacher_input="image", method="kd"):
    return build_config(
        {
            "name": "x",
            "data": {"name": "pairs"},
            "student": {"name": "lenet", "input": student_input},
            "teachers": [{"name": "lenet", "input": teacher_input}],
            "method": {"name": method},
            "train": {"epochs": 1},
        }
    )


def test_a_misspelt_input_is_one_line_with_the_closest_name():
    with pytest.raises(
        ConfigError,
        match=r"student.input 'audoi' is not an input of dataset 'pairs' \(did you mean 'audio'\?\); "
        r"its inputs: image, audio",
    ):
        student_view(_splits(), _config(student_input="audoi"))
    splits = student_view(_splits(), _config())
    assert splits.info.input_name == "audio" and splits.info.image_size == (6, 10)
    with pytest.raises(ConfigError, match=r"teachers.0.input 'imgae'.*did you mean 'image'"):
        build_distiller(_config(teacher_input="imgae"), splits.info, splits.train)


def test_cross_modal_teachers_need_a_cross_modal_method_and_unlabelled_data_a_masking_one():
    splits = student_view(_splits(), _config())
    distiller, _ = build_distiller(_config(), splits.info, splits.train)
    assert distiller.teachers[0].kdforge_input == "image"
    with pytest.raises(ConfigError, match="method 'at' runs every network on one input"):
        build_distiller(_config(method="at"), splits.info, splits.train)
    few = student_view(_splits(unlabelled=True), _config())
    with pytest.raises(ConfigError, match="12 unlabelled samples"):
        build_distiller(
            _config(teacher_input="audio", method="ce").model_copy(update={"teachers": []}), few.info, few.train
        )
    build_distiller(_config(method="modality_kd"), few.info, few.train)  # masks its CE: accepted

"""NoNN (Bhardwaj, Lin, Sartor, Marculescu, CODES+ISSS 2019, arXiv 1907.11804) with the balanced,
redundant partitions of Jeong, Park and Yang (Electronics 10(14):1614, 2021). The graph and the
Louvain mapping follow the NoNN framework (``SLDGroup/NoNN_framework``); the spectral partitions and
the averaging are reconstructed from the Electronics paper's abstract (no public code). See
docs/nonn.md.

The student is the zoo model ``nonn`` (N students + a linear head on their concatenated pooled
features). The teacher's final-stage filters are split into N groups P_1..P_N (see
:mod:`kdforge.nonn.partition`); student i mimics the attention of group i only::

    A_j   = mean_{c in P_j} |F_t[:, c]|^p                       (B x H x W, not normalised)
    T_i   = (1 - r) A_i + r * mean_{j in nbr(i)} A_j            (r = redundancy; nbr = i-1, i+1)
    L     = (1 - alpha) CE(z, y) + alpha T^2 KL(softmax(z_t/T) || softmax(z/T))
            + beta * sum_i mean_{b,hw} (a(S_i) - T_i / ||T_i||)^2

where ``z = head([GAP(S_1), ..., GAP(S_N)])``, ``S_i`` is student i's last stage and
``a(S) = vec(mean_c |S_c|^p) / ||.||_2`` (kdforge's ``at``; maps of different sizes: the larger
feature map is average-pooled first). ``r = 0`` is NoNN; ``r > 0`` is the averaging redundancy.

The partition comes, in this order, from ``partition_file`` (made by ``kdforge nonn-partition``),
from the student model's own ``groups`` (a model file that already has one), or is computed at
construction from the teacher's activations on the training images (``partition`` names the
method). It is stored in the model file (the ``nonn`` model's ``groups``/``partition`` kwargs),
so one recipe goes from teacher to partition to students.

Defaults (our choices, not values taken from the papers): alpha 0.9, T 4 (Hinton KD as in
kdforge's ``kd``), beta 1000 with the mean-of-squares AT convention of kdforge's ``at``
(RepDistiller), p 2; the graph settings (hebbian weight, top-k 50, 99th percentile, resolution 0.7)
are those of the NoNN framework.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdforge.data import Augmentation
from kdforge.data.batch import Batch
from kdforge.data.splits import evaluation_subset
from kdforge.methods.base import METHODS, Distiller, MethodParams, Output, Step
from kdforge.methods.features import full_precision, guess_input_shape, pool_to_common_size, resolve_layers
from kdforge.methods.losses import kd_loss
from kdforge.models.nonn import NoNNSystem, neighbors
from kdforge.models.taps import FeatureTap
from kdforge.nonn import partition_teacher
from kdforge.nonn.partition import Partition


class NoNNParams(MethodParams):
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the KD term; CE gets 1 - alpha")
    temperature: float = Field(4.0, gt=0)
    beta: float = Field(1000.0, ge=0, description="weight of the summed per-student AT terms")
    p: float = Field(2.0, gt=0)
    teacher_layer: str = "last_stage"
    student_layer: str = "last_stage"
    partition: Literal["louvain", "spectral", "spectral_recursive", "spectral_kway"] = "spectral"
    partition_file: str | None = Field(None, description="JSON from `kdforge nonn-partition`")
    graph: Literal["hebbian", "noncoactivation", "correlation"] = "hebbian"
    top_k: int | None = Field(50, ge=1)
    percentile: float | None = Field(99.0, ge=0, le=100, description="Louvain's edge threshold")
    resolution: float = Field(0.7, gt=0)
    normalized_laplacian: bool = False
    discard_largest: bool = True
    louvain_underfull: Literal["split", "error"] = Field(
        "split", description="fewer communities than students: split the largest group, or fail"
    )
    partition_images: int | None = Field(
        None, ge=1, description="N training images (seeded, class-balanced); None: all"
    )
    partition_seed: int = 0
    redundancy: float = Field(0.0, ge=0, lt=1, description="share of the neighbours' attention in a target")
    fill: Literal["zeros", "neighbors"] | None = Field(
        None, description="how a failed student is replaced; None: neighbors when redundancy > 0"
    )
    device_dropout: float = Field(0.0, ge=0, lt=1, description="train with each student failed at this rate")


def group_attention(feature: Tensor, members: Tensor, p: float = 2.0) -> Tensor:
    """``A_j = mean_{c in P_j} |F_c|^p`` for every group at once: B x N x H x W.

    ``members`` is N x C with ``1 / |P_j|`` on group j's filters and 0 elsewhere.
    """
    return torch.einsum("nc,bchw->bnhw", members, feature.float().abs().pow(p))


def mixing_matrix(count: int, redundancy: float) -> Tensor:
    """N x N: row i puts ``1 - r`` on i and ``r`` shared equally by its neighbours."""
    mix = torch.eye(count)
    if redundancy > 0 and count > 1:
        for i in range(count):
            around = neighbors(i, count)
            mix[i, i] = 1.0 - redundancy
            for j in around:
                mix[i, j] = redundancy / len(around)
    return mix


@METHODS.register("nonn")
class NoNN(Distiller):
    """NoNN (Bhardwaj et al. 2019): N disjoint students mimic the attention of the teacher's filter groups; + KD on their joint head."""  # noqa: E501

    name = "nonn"
    Params = NoNNParams
    teachers_required = (1, 1)

    def __init__(self, student, teachers=(), params=None, train_data=None, normalization=None) -> None:
        super().__init__(student, teachers, params)
        if not isinstance(student, NoNNSystem):
            raise ValueError(
                "method 'nonn' trains the 'nonn' model: write student: {name: nonn, kwargs: "
                "{student: resnet8, num_students: 4}}"
            )
        p: NoNNParams = self.params  # type: ignore[assignment]
        teacher = self.teachers[0]
        self.system: NoNNSystem = student
        self.teacher_layer = resolve_layers(teacher, [p.teacher_layer])[0]
        self.student_layer = resolve_layers(student.students[0], [p.student_layer])[0]
        self.teacher_tap = FeatureTap(teacher, self.teacher_layer, detach=True)
        self.student_taps = [FeatureTap(s, self.student_layer) for s in student.students]

        self.normalization = normalization
        partition = self._partition(train_data)
        channels = self._teacher_channels(train_data)
        if partition.num_filters != channels:
            raise ValueError(
                f"the partition covers {partition.num_filters} filters but the teacher's "
                f"'{self.teacher_layer}' has {channels}; partition this teacher's layer"
            )
        if partition.num_groups != student.num_students:
            raise ValueError(
                f"the partition has {partition.num_groups} groups but the nonn model has "
                f"{student.num_students} students; set num_students to {partition.num_groups}"
            )
        info = {k: v for k, v in partition.to_dict().items() if k not in ("groups", "format", "version")}
        student.set_partition(partition.groups, info)
        student.fill = p.fill or ("neighbors" if p.redundancy > 0 else "zeros")
        self.partition_record = partition

        members = torch.zeros(partition.num_groups, channels)
        for j, group in enumerate(partition.groups):
            members[j, group] = 1.0 / len(group)
        self.register_buffer("members", members, persistent=False)
        self.register_buffer("mix", mixing_matrix(partition.num_groups, p.redundancy), persistent=False)

    # ------------------------------------------------------------------ partition
    def _normalizer(self):
        """uint8 images -> what the networks see: ``(x / 255 - mean) / std`` as in training."""
        if self.normalization is None:
            return lambda images: images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        mean, std = self.normalization
        return Augmentation(mean=tuple(mean), std=tuple(std)).normalize

    def _teacher_channels(self, train_data) -> int:
        if train_data is not None:
            probe = self._normalizer()(train_data.images[:2])
        else:
            shape = guess_input_shape(self.system.students[0]) or (3, 32, 32)
            probe = torch.zeros(2, *shape)
        teacher = self.teachers[0]
        with torch.no_grad():
            self.teacher_tap(probe)
        channels = int(self.teacher_tap.features[self.teacher_layer].shape[1])
        self.teacher_tap.clear()
        teacher.eval()
        return channels

    def _partition(self, train_data):
        p: NoNNParams = self.params  # type: ignore[assignment]
        system = self.system
        if p.partition_file:
            return Partition.load(p.partition_file)
        if system.groups is not None:  # the model (file) already carries its partition
            info = dict(system.partition or {})
            num_filters = info.get("num_filters") or self._teacher_channels(train_data)
            return Partition(
                system.groups,
                int(num_filters),
                info.get("method", "given"),
                info.get("settings", {}),
                info.get("statistics", {}),
                info.get("source", {}),
            )
        if train_data is None:
            raise ValueError(
                "method 'nonn' computes its partition from the training images, but none were given; "
                "pass train_data= (the trainer does) or set partition_file"
            )
        images = train_data.images[evaluation_subset(train_data.labels, p.partition_images)]
        return partition_teacher(
            self.teachers[0],
            images,
            self.teacher_layer,
            system.num_students,
            method=p.partition,
            graph=p.graph,
            top_k=p.top_k,
            percentile=p.percentile,
            resolution=p.resolution,
            seed=p.partition_seed,
            normalized=p.normalized_laplacian,
            discard_largest=p.discard_largest,
            underfull=p.louvain_underfull,
            normalize=self._normalizer(),
            source={"split": getattr(train_data, "name", None) or "train"},
        )

    # ------------------------------------------------------------------ loss
    def attention_targets(self, teacher_feature: Tensor) -> Tensor:
        """``T_i / ||T_i||`` for every student: B x N x HW."""
        p: NoNNParams = self.params  # type: ignore[assignment]
        groups = group_attention(teacher_feature, self.members, p.p)
        mixed = torch.einsum("in,bnhw->bihw", self.mix, groups)
        return F.normalize(mixed.flatten(2), dim=2)

    def at_terms(self, student_maps: list[Tensor], teacher_feature: Tensor) -> Tensor:
        """``mean_{b,hw}(a(S_i) - target_i)^2`` for each student i (a vector of N terms)."""
        p: NoNNParams = self.params  # type: ignore[assignment]
        terms = []
        targets = None
        for i, s_map in enumerate(student_maps):
            s_pooled, t_pooled = pool_to_common_size(s_map, teacher_feature)
            if targets is None or targets.shape[-1] != t_pooled.shape[2] * t_pooled.shape[3]:
                targets = self.attention_targets(t_pooled)
            a_s = F.normalize(s_pooled.float().abs().pow(p.p).mean(1).flatten(1), dim=1)
            terms.append((a_s - targets[:, i]).pow(2).mean())
        return torch.stack(terms)

    def forward(self, batch: Batch, step: Step) -> Output:
        p: NoNNParams = self.params  # type: ignore[assignment]
        x = batch.image
        with torch.no_grad():
            teacher_logits, teacher_features = self.teacher_tap(x)
        teacher_feature = teacher_features[self.teacher_layer]
        teacher_logits = teacher_logits.float()
        self.teacher_tap.clear()

        pooled: list[Tensor | None] = []
        maps = []
        for student, tap in zip(self.system.students, self.student_taps):
            pooled.append(student(x))
            maps.append(tap.features[self.student_layer])
            tap.clear()
        metrics = {}
        if self.training and p.device_dropout > 0 and len(pooled) > 1:
            dropped = torch.rand(len(pooled)) < p.device_dropout
            if bool(dropped.all()):
                dropped[int(torch.randint(len(pooled), (1,)))] = False
            pooled = [None if d else f for d, f in zip(dropped.tolist(), pooled)]
            metrics["dropped"] = float(dropped.sum())
        logits = self.system.combine(pooled)
        with full_precision(logits):
            ce = F.cross_entropy(logits.float(), batch.targets)
            kd = kd_loss(logits.float(), teacher_logits, p.temperature)
            at = self.at_terms(maps, teacher_feature)
        losses = {"ce": (1.0 - p.alpha) * ce, "kd": p.alpha * kd, "at": p.beta * at.sum()}
        return Output(logits, {k: v for k, v in losses.items()}, metrics)

"""Memory banks and the shared machinery of the contrastive methods (``crd``, ``hkd``).

Both methods embed the penultimate features of the student and of the teacher into a small unit
sphere (``EmbedHead``: linear map + L2 normalisation) and contrast each embedding with rows of
two *memory banks*, one per network, holding an embedding for every training sample:

* ``MemoryBank`` is an ``N x D`` buffer (saved in checkpoints, so a resumed run continues with
  the same banks; never a parameter). Rows start uniform in ``[-s, s]``, ``s = 1 / sqrt(D / 3)``
  (the reference code's init, whose rows already have norm close to 1), L2-normalised unless
  ``normalise_init=False``. ``update(index, e)`` sets ``m_i <- n(momentum * m_i + (1 - momentum) e_i)``
  for the batch rows only.
* Rows are addressed by ``Batch.index``, the dense position 0..N-1 of the sample in the run's
  train split; ``N`` is the ``num_samples`` constructor keyword (the trainer passes the size of
  the train split).
* Negatives: ``K`` indices per anchor, drawn uniformly from every other index
  (``sample_other_indices``) or from the indices whose label differs from the anchor's
  (``sample_other_classes``; labels are known from the ``train_labels`` keyword when given, else
  recorded from the batches as they are seen, an unseen index counting as "another class").
  ``batch.extras["contrast_index"]`` (B x K, int64) replaces the sampling: a dataset wrapper or a
  test can fix the negatives.
* Several processes (DDP): every rank holds a full copy of both banks. Each step gathers the
  (index, student embedding, teacher embedding, label) rows of every rank and applies the same
  update everywhere (``gather_rows``), so the banks stay equal on all ranks and equal those of one
  process at the same global batch. Without this, DDP's buffer broadcast would copy rank 0's banks
  over the others at each forward and rows seen only by other ranks would never move.

``ContrastiveDistiller`` is the base of both methods: it taps one feature layer of each network
(``pool`` by default), keeps the teacher's logits (for a KD term and HKD's graph), sizes the
embedding heads by one no-grad forward on zeros of ``input_shape`` and owns the two banks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdforge.core.errors import ConfigError
from kdforge.data.batch import Batch
from kdforge.methods.features import (
    FeatureDistiller,
    FeatureParams,
    full_precision,
    input_shape_for,
    probe_feature_shapes,
)
from kdforge.methods.losses import kd_loss

#: key of ``Batch.extras`` holding explicit negative indices (B x K)
NEGATIVES_KEY = "contrast_index"


def l2_normalise(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows divided by their L2 norm (the last dimension)."""
    return F.normalize(x, dim=-1, eps=eps)


class EmbedHead(nn.Module):
    """``n(W f + b)``: flatten, linear map to ``dim_out``, L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return l2_normalise(self.linear(x.flatten(1)))


def check_index(index: Tensor, num_samples: int) -> None:
    """Raise a ConfigError naming the fix when an index does not address a bank row."""
    if index.numel() == 0:
        return
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= num_samples:
        bad = high if high >= num_samples else low
        raise ConfigError(
            f"sample index {bad} does not address a memory bank of {num_samples} rows: "
            "num_samples must be the size of the train split the batches come from (the trainer "
            "passes it), and Batch.index the position 0..N-1 of each sample in it"
        )


def bank_scores(anchor: Tensor, memory: Tensor, index: Tensor, mode: str = "auto") -> Tensor:
    """``out[b, k] = <anchor[b], memory[index[b, k]]>`` (B x K), the memory without gradient.

    Two exact ways: gathering the ``B x K x D`` rows (cheap when K is much smaller than N) or one
    ``B x N`` matrix product followed by a gather (memory bounded by the bank's size whatever K).
    ``auto`` picks the product when ``64 K >= N`` (the crossover measured on one CPU core).
    """
    memory = memory.detach()
    batch, k = index.shape
    if mode == "auto":
        mode = "matmul" if 64 * k >= memory.shape[0] else "gather"
    if mode == "gather":
        rows = memory[index.reshape(-1)].view(batch, k, -1)
        return torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2)
    if mode == "matmul":
        # the product saves the bank for its backward pass; the bank is updated in place before
        # that, so the product gets its own copy when a gradient will flow
        saved = memory.clone() if anchor.requires_grad else memory
        return (anchor @ saved.t()).gather(1, index)
    raise ValueError(f"bank_scores: unknown mode {mode!r}; use auto, gather or matmul")


def world_size() -> int:
    """Processes in the default ``torch.distributed`` group (1 when it is not initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


@torch.no_grad()
def gather_rows(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Each tensor concatenated along dim 0 over the ranks, in rank order (detached).

    A no-op in one process. Ranks may hold different numbers of rows (padded for the collective).
    """
    if world_size() == 1:
        return tuple(t.detach() for t in tensors)
    dist = torch.distributed
    count = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    most = max(sizes)
    gathered = []
    for tensor in tensors:
        tensor = tensor.detach().contiguous()
        padded = tensor.new_zeros((most, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, sizes)]))
    return tuple(gathered)


class MemoryBank(nn.Module):
    """``N x D`` unit rows (a buffer) updated by momentum at the batch's indices."""

    def __init__(self, num_samples: int, dim: int, momentum: float, normalise_init: bool = True) -> None:
        super().__init__()
        if num_samples < 2:
            raise ConfigError(f"a memory bank needs at least 2 samples, got num_samples={num_samples}")
        self.momentum = float(momentum)
        bound = 1.0 / math.sqrt(dim / 3.0)
        memory = torch.rand(num_samples, dim).mul_(2 * bound).sub_(bound)
        self.register_buffer("memory", l2_normalise(memory) if normalise_init else memory)

    @property
    def num_samples(self) -> int:
        return int(self.memory.shape[0])

    def rows(self, index: Tensor) -> Tensor:
        """A copy of the rows at ``index`` (any shape), without gradient."""
        check_index(index, self.num_samples)
        return self.memory[index].detach()

    def scores(self, anchor: Tensor, index: Tensor, mode: str = "auto") -> Tensor:
        """Inner products of each anchor with its rows: ``anchor`` B x D, ``index`` B x K."""
        check_index(index, self.num_samples)
        return bank_scores(anchor, self.memory, index, mode)

    @torch.no_grad()
    def blend(self, index: Tensor, values: Tensor, weight: float) -> Tensor:
        """``n(weight * m_index + (1 - weight) * values)``, without gradient; the bank is untouched."""
        check_index(index, self.num_samples)
        mixed = self.memory[index] * weight + values.detach().to(self.memory.dtype) * (1.0 - weight)
        return l2_normalise(mixed)

    @torch.no_grad()
    def update(self, index: Tensor, values: Tensor) -> None:
        """``m_i <- n(momentum * m_i + (1 - momentum) * v_i)`` for the rows in ``index`` only."""
        index = index.long()
        self.memory.index_copy_(0, index, self.blend(index, values, self.momentum))

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, dim={self.memory.shape[1]}, momentum={self.momentum}"


def sample_other_indices(
    positive: Tensor, num_samples: int, k: int, generator: torch.Generator | None = None
) -> Tensor:
    """``k`` indices per row, uniform over ``0..N-1`` without ``positive[b]`` (with replacement)."""
    draw = torch.randint(0, num_samples - 1, (positive.shape[0], k), generator=generator, device=positive.device)
    return draw + (draw >= positive.unsqueeze(1)).long()


def sample_other_classes(
    anchor_labels: Tensor,
    labels: Tensor,
    k: int,
    generator: torch.Generator | None = None,
    rounds: int = 16,
) -> Tensor:
    """``k`` indices per row, uniform over the indices j with ``labels[j] != anchor_labels[b]``.

    With replacement. ``labels`` may hold -1 for samples whose label is unknown: they count as
    another class. Rejection sampling (exact); rows still holding a same-class draw after
    ``rounds`` redraws (a class covering almost the whole set) are redrawn from the exact
    distribution by ``torch.multinomial``.
    """
    n = labels.shape[0]
    anchor = anchor_labels.long().unsqueeze(1)
    draws = torch.randint(0, n, (anchor.shape[0], k), generator=generator, device=labels.device)
    for _ in range(rounds):
        same = labels[draws] == anchor
        count = int(same.sum())
        if count == 0:
            return draws
        draws[same] = torch.randint(0, n, (count,), generator=generator, device=labels.device)
    rows = (labels[draws] == anchor).any(1).nonzero().squeeze(1)
    weights = (labels.unsqueeze(0) != anchor[rows]).float()
    if bool((weights.sum(1) == 0).any()):
        raise ConfigError(
            "no negative of another class exists: every training sample has the anchor's label; "
            "use negatives: other_indices"
        )
    draws[rows] = torch.multinomial(weights, k, replacement=True, generator=generator)
    return draws


def info_nce(anchor: Tensor, positive: Tensor, negative_scores: Tensor, temperature: float) -> Tensor:
    """``CE([<a, p>, s_1..s_K] / tau, 0)`` averaged over the batch."""
    logits = torch.cat([(anchor * positive).sum(1, keepdim=True), negative_scores], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


class ContrastiveParams(FeatureParams):
    """Fields shared by ``crd`` and ``hkd``; each method sets its paper defaults."""

    kd_weight: float = Field(0.0, ge=0)
    temperature: float = Field(4.0, gt=0)
    beta: float = Field(1.0, ge=0)
    feature_dim: int = Field(128, ge=1)
    num_negatives: int = Field(16384, ge=1)
    nce_temperature: float = Field(0.07, gt=0)
    momentum: float = Field(0.5, ge=0, le=1)
    negatives: Literal["other_indices", "other_classes"] = "other_indices"
    bank_init: Literal["normalised", "uniform"] = "normalised"
    student_layers: list[str] = Field(default_factory=lambda: ["pool"], min_length=1, max_length=1)
    teacher_layers: list[str] | None = Field(None, min_length=1, max_length=1)


class ContrastiveDistiller(FeatureDistiller):
    """Embedding heads, two memory banks and negative sampling around one tapped layer pair."""

    Params = ContrastiveParams

    def __init__(
        self,
        student: nn.Module,
        teachers=(),
        params=None,
        input_shape: Sequence[int] | None = None,
        num_samples: int | None = None,
        train_labels: Sequence[int] | Tensor | None = None,
    ) -> None:
        super().__init__(student, teachers, params)
        p: ContrastiveParams = self.params  # type: ignore[assignment]
        name = self.method_name()
        if num_samples is None:
            raise ConfigError(
                f"{name} keeps a memory bank row per training sample and needs num_samples (the size of "
                f"the train split); pass num_samples=len(train_split), or build it with "
                f"METHODS.get('{name}').from_data(student, teachers, params, data=train_split)"
            )
        self.num_samples = int(num_samples)
        if self.num_samples < 2:
            raise ConfigError(f"{name}: num_samples must be at least 2, got {self.num_samples}")
        self.num_negatives = min(p.num_negatives, self.num_samples - 1)
        if self.num_negatives < p.num_negatives:
            warnings.warn(
                f"{name}: num_negatives={p.num_negatives} exceeds the {self.num_samples - 1} other "
                f"training samples; using {self.num_negatives}",
                stacklevel=2,
            )
        self.input_shape = input_shape_for(name, self.student, input_shape)
        teacher = self.teachers[0]
        # a teacher on another input of paired data (cross-modal) is probed with its own input's shape
        other_input = getattr(teacher, "kdforge_input", None) not in (None, getattr(student, "kdforge_input", None))
        teacher_input = getattr(teacher, "kdforge_input_shape", None) if other_input else None
        ((student_shape,),) = probe_feature_shapes(
            name, self.input_shape, [(self.student, self.student_tap, self.student_layers)]
        )
        ((teacher_shape,),) = probe_feature_shapes(
            name, teacher_input or self.input_shape, [(teacher, self.teacher_tap, self.teacher_layers)]
        )
        student_dim, teacher_dim = math.prod(student_shape), math.prod(teacher_shape)
        self.embed_student = EmbedHead(student_dim, p.feature_dim)
        self.embed_teacher = EmbedHead(teacher_dim, p.feature_dim)
        normalise = p.bank_init == "normalised"
        self.memory_student = MemoryBank(self.num_samples, p.feature_dim, p.momentum, normalise)
        self.memory_teacher = MemoryBank(self.num_samples, p.feature_dim, p.momentum, normalise)
        # labels of the train split: -1 until known (from train_labels or from the batches seen)
        self.register_buffer("labels", torch.full((self.num_samples,), -1, dtype=torch.long))
        if train_labels is not None:
            given = torch.as_tensor(train_labels, dtype=torch.long).flatten()
            if given.shape[0] != self.num_samples:
                raise ConfigError(
                    f"{name}: train_labels has {given.shape[0]} entries but num_samples is {self.num_samples}"
                )
            self.labels.copy_(given)
        #: random generator of the negative sampling (None: torch's global one, saved on resume)
        self.generator: torch.Generator | None = None

    # ------------------------------------------------------------------ construction
    # ------------------------------------------------------------------ per batch
    def run_pair(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Student logits and feature (with graph); teacher logits and feature (no graph)."""
        logits, _ = self.student_tap(batch.image)
        (student_feat,) = self._collect(self.student_tap, self.student_layers, "student")
        with torch.no_grad():
            teacher_logits, _ = self.teacher_tap(self.input_of(self.teachers[0], batch))
        (teacher_feat,) = self._collect(self.teacher_tap, self.teacher_layers, "teacher")
        self.student_tap.clear()
        self.teacher_tap.clear()
        return logits, student_feat, teacher_logits.detach().float(), teacher_feat

    def embed(self, student_feat: Tensor, teacher_feat: Tensor) -> tuple[Tensor, Tensor]:
        expected = (self.embed_student.linear.in_features, self.embed_teacher.linear.in_features)
        got = (student_feat[0].numel(), teacher_feat[0].numel())
        if got != expected:
            raise ConfigError(
                f"{self.method_name()}: the embedding heads were built for features of {expected[0]} / "
                f"{expected[1]} values (input_shape {self.input_shape}) but got {got[0]} / {got[1]}; "
                "pass input_shape=(C, H, W) matching the data"
            )
        return self.embed_student(student_feat.float()), self.embed_teacher(teacher_feat.float())

    def record_labels(self, batch: Batch) -> None:
        """Remember the labels of the batch's samples (every rank's, for other-class negatives)."""
        if self.params.negatives == "other_classes":  # type: ignore[attr-defined]
            check_index(batch.index, self.num_samples)
            if batch.targets.is_floating_point():
                raise ConfigError(
                    f"{self.method_name()}: negatives: other_classes needs integer class labels; "
                    "use negatives: other_indices"
                )
            index, labels = gather_rows(batch.index.long(), batch.targets.long())
            self.labels.index_copy_(0, index, labels)

    def negatives(self, batch: Batch) -> Tensor:
        """B x K negative indices: ``batch.extras["contrast_index"]`` if given, else sampled."""
        given = batch.extras.get(NEGATIVES_KEY)
        if given is not None:
            if given.dim() != 2 or given.shape[0] != len(batch) or given.shape[1] < 1:
                raise ConfigError(
                    f"batch.extras['{NEGATIVES_KEY}'] must be B x K negative indices, got shape {tuple(given.shape)}"
                )
            check_index(given, self.num_samples)
            return given.long()
        if self.params.negatives == "other_classes":  # type: ignore[attr-defined]
            return sample_other_classes(batch.targets, self.labels, self.num_negatives, self.generator)
        return sample_other_indices(batch.index.long(), self.num_samples, self.num_negatives, self.generator)

    def update_banks(self, index: Tensor, student_embed: Tensor, teacher_embed: Tensor) -> None:
        """After the step's scores: move each bank's rows of the (global) batch toward the new embeddings."""
        if self.training:
            index, student_embed, teacher_embed = gather_rows(index.long(), student_embed, teacher_embed)
            self.memory_student.update(index, student_embed)
            self.memory_teacher.update(index, teacher_embed)

    def classification_losses(self, logits: Tensor, teacher_logits: Tensor, batch: Batch) -> dict[str, Tensor]:
        """``ce_weight * CE`` and ``kd_weight * T^2 KL`` (each only when its weight is non-zero)."""
        p: ContrastiveParams = self.params  # type: ignore[assignment]
        losses = self.ce_losses(logits, batch)
        if p.kd_weight:
            with full_precision(logits):
                losses["kd"] = p.kd_weight * kd_loss(logits.float(), teacher_logits, p.temperature)
        return losses


__all__ = [
    "NEGATIVES_KEY",
    "ContrastiveDistiller",
    "ContrastiveParams",
    "EmbedHead",
    "MemoryBank",
    "bank_scores",
    "check_index",
    "gather_rows",
    "info_nce",
    "l2_normalise",
    "sample_other_classes",
    "sample_other_indices",
]

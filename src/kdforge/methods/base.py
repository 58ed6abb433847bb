"""The Distiller contract: every method is an ``nn.Module`` with one ``forward(batch, step)``.

A Distiller owns

* the **student** (or, for online methods, the group of peers; ``inference_model()`` says which
  network is deployed),
* frozen **teachers**, always in ``eval()`` mode and without gradients,
* the method's **extra trainable modules** (adapters, projection heads, memory banks...), which
  are counted and reported.

``forward`` returns ``Output(logits, losses, metrics)``: the trainer sums ``losses`` (each already
weighted), logs every term separately, and logs ``metrics`` without backpropagating them.
Hyperparameters are declared in a nested pydantic ``Params`` model with the paper's defaults, so a
recipe's ``method:`` section is validated field by field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import ConfigDict, ValidationInfo, field_validator
from torch import nn

from kdforge.core.registry import Registry
from kdforge.core.schedules import Schedule
from kdforge.core.validation import StrictScalars, finite_numbers
from kdforge.data.batch import Batch
from kdforge.data.tasks import Task, task_for

METHODS: Registry[type[Distiller]] = Registry("method", group="kdforge.methods")


@dataclass
class Step:
    """Where training is: schedules read ``progress`` (per step) or ``epoch_progress``.

    (Not frozen: Fabric's precision plugins rebuild dataclass arguments field by field.)
    """

    epoch: int = 0
    epochs: int = 1
    global_step: int = 0
    total_steps: int = 1
    #: learning rate of the first optimizer group at this step (set by the trainer; proximal steps use it)
    lr: float = 0.0

    @property
    def progress(self) -> float:
        return min(self.global_step / max(self.total_steps - 1, 1), 1.0)

    @property
    def epoch_progress(self) -> float:
        return min(self.epoch / max(self.epochs - 1, 1), 1.0)

    def value(self, schedule: Schedule) -> float:
        """Evaluate a schedule at this point of training."""
        return schedule(self.epoch_progress if schedule.by == "epoch" else self.progress)


@dataclass
class Output:
    """What a Distiller returns for one batch."""

    logits: torch.Tensor
    losses: dict[str, torch.Tensor]
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> torch.Tensor:
        return sum(self.losses.values())  # type: ignore[return-value]


@dataclass
class OptimizerGroup:
    """A set of parameters stepped by its own optimizer (e.g. FFSD's Adam-trained decoders).

    ``optimizer`` overrides fields of the run's optimizer settings (``{"name": "adam", "lr": 1e-3}``);
    ``None`` means the run's optimizer as configured.
    """

    name: str
    parameters: list[nn.Parameter]
    optimizer: dict[str, Any] | None = None


#: softmax temperatures above this make typical logits' distributions uniform to float32 precision,
#: and the T^2 factor of the KD loss then multiplies rounding error into the loss (it can turn negative)
MAX_TEMPERATURE = 100.0


def is_temperature_field(name: str) -> bool:
    return name == "temperature" or name.endswith("_temperature")


def is_weight_field(name: str) -> bool:
    return name in ("weight", "alpha", "beta") or name.endswith(("_weight", "_weights")) or name.startswith("lambda_")


class MethodParams(StrictScalars):
    """Base for a method's hyperparameters: unknown keys are errors.

    Every subclass also gets, field by field: no NaN or infinity in any float; no boolean where a
    number is expected and only true/false where a boolean is; temperatures (``temperature``,
    ``*_temperature``) in (0, 100]; weights (``weight``, ``*_weight``, ``alpha``, ``beta``,
    ``lambda_*``) >= 0, whether written as numbers or as schedules.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _ranges(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name or ""
        numbers = finite_numbers(value)
        if any(not math.isfinite(n) for n in numbers):
            raise ValueError("must be a finite number (not nan or inf)")
        bad = [n for n in numbers if not 0.0 < n <= MAX_TEMPERATURE] if is_temperature_field(name) else []
        if bad:
            raise ValueError(
                f"a temperature must be in (0, {MAX_TEMPERATURE:g}], got {bad[0]:g}: above that softmax is "
                "uniform to float32 precision and the T^2-scaled loss is rounding noise"
            )
        bad = [n for n in numbers if n < 0.0] if is_weight_field(name) else []
        if bad:
            raise ValueError(f"a loss weight must be >= 0, got {bad[0]:g} (a negative weight maximises that loss)")
        return value


class Distiller(nn.Module):
    """Base class of every method. Subclasses set ``Params`` and implement ``forward``."""

    Params: ClassVar[type[MethodParams]] = MethodParams
    #: how many teachers the method needs: (minimum, maximum or None for no limit)
    teachers_required: ClassVar[tuple[int, int | None]] = (0, 0)
    #: True when the method reads its teachers only through ``teacher_logits`` (so a teacher bank
    #: can replace them entirely); methods that tap teacher features leave it False
    replays_teacher_logits: ClassVar[bool] = False
    #: how many optimizer steps the trainer takes on each batch (free adversarial training replays
    #: a batch m times); the schedules and ``global_step`` still advance once per batch
    batch_replays: int = 1
    #: True when the loss's scale depends on the batch size (a mean over the B x B pairs of a
    #: batch, e.g. SP and PKT scale as 1/B): the trainer then refuses a partial last batch, which
    #: would be over-weighted. tests/test_batch_scale.py checks every method's declaration.
    batch_size_dependent: ClassVar[bool] = False
    #: True when the method runs each teacher on its own input (``input_of``), so a teacher may read
    #: another input of paired multimodal data than the student (cross-modal distillation)
    cross_modal: ClassVar[bool] = False
    #: True when the method masks its supervised term with ``batch.extras["labelled"]`` (few-label
    #: data whose other samples are unlabelled; see ``label_mask``)
    uses_label_mask: ClassVar[bool] = False
    #: the tasks (``kdforge.data.tasks.TASKS`` names) the method is written for; the trainer
    #: refuses a dataset of another task in one line. Methods that take their supervised term from
    #: ``supervised_loss`` and touch no class probabilities can list more.
    tasks: ClassVar[tuple[str, ...]] = ("classification",)

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module] = (),
        params: MethodParams | dict | None = None,
    ) -> None:
        super().__init__()
        self.params = params if isinstance(params, MethodParams) else self.Params(**(params or {}))
        low, high = self.teachers_required
        if len(teachers) < low or (high is not None and len(teachers) > high):
            wanted = f"{low}" if low == high else f"{low} or more" if high is None else f"{low}-{high}"
            fix = "add them under 'teachers:'" if len(teachers) < low else "remove the extra 'teachers:' entries"
            raise ValueError(
                f"method '{self.method_name()}' needs {wanted} teacher(s), got {len(teachers)}; {fix} in the recipe"
            )
        self.student = student
        self.teachers = nn.ModuleList(teachers)
        for teacher in self.teachers:
            teacher.requires_grad_(False)
            teacher.eval()
        #: what the data asks for; ``use_task`` sets it (the trainer and ``from_data`` do)
        self.task: Task = task_for(None)

    @classmethod
    def from_data(
        cls,
        student: nn.Module,
        teachers: Sequence[nn.Module] = (),
        params: MethodParams | dict | None = None,
        data: Any = None,
        **extra: Any,
    ) -> Distiller:
        """Build the method with what it needs to know about the data, as the trainer does.

        ``data`` is the train split (a ``TensorData``), a ``DataSplits``, a ``Batch`` or a tensor of
        images: the method receives the keywords its constructor declares among ``input_shape``
        (C, H, W of one image), ``num_samples`` and ``train_labels`` (CRD's memory banks),
        ``train_data`` and ``normalization``. Keywords in ``extra`` win over the inferred ones.

        >>> crd = METHODS.get("crd").from_data(student, [teacher], {}, data=splits.train)
        """
        import inspect

        offered: dict[str, Any] = {}
        info = getattr(data, "info", None)
        train = getattr(data, "train", data)  # DataSplits -> its train split
        if info is not None:
            offered["normalization"] = (tuple(info.mean), tuple(info.std))
        if hasattr(train, "images") and hasattr(train, "labels"):  # TensorData
            offered.update(
                input_shape=tuple(train.images.shape[1:]),
                num_samples=len(train),
                train_labels=train.labels,
                train_data=train,
            )
        elif isinstance(train, Batch):
            offered["input_shape"] = tuple(train.image.shape[1:])
        elif isinstance(train, torch.Tensor):
            offered["input_shape"] = tuple(train.shape[1:])
        elif data is not None:
            raise TypeError(
                f"from_data: data must be a TensorData, DataSplits, Batch or image tensor, got {type(data).__name__}"
            )
        accepted = inspect.signature(cls.__init__).parameters
        keywords = {k: v for k, v in offered.items() if k in accepted}
        keywords.update(extra)
        distiller = cls(student, teachers, params, **keywords)
        if info is not None:
            distiller.use_task(task_for(info))
        return distiller

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything the optimizer must step: the student's parameters and the method's own
        trainable modules (adapters, projection heads, peers), never the frozen teachers'.

        >>> optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.05, momentum=0.9)
        """
        return [p for group in self.optimizer_groups() for p in group.parameters]

    # ----------------------------------------------------------------- contract
    def forward(self, batch: Batch, step: Step) -> Output:  # pragma: no cover - abstract
        raise NotImplementedError

    def inference_model(self) -> nn.Module:
        """The network that is evaluated and deployed."""
        return self.student

    def optimizer_groups(self) -> list[OptimizerGroup]:
        """Parameter groups and their optimizers; the default is one optimizer for everything."""
        return [OptimizerGroup("main", [p for p in self.parameters() if p.requires_grad])]

    def on_epoch_start(self, step: Step) -> None:
        """Called before each training epoch (curricula, growing networks, bank refreshes)."""

    def after_optimizer_step(self, step: Step) -> None:
        """Called right after the optimizers stepped and zeroed their gradients (proximal operators,
        pruning masks); ``step.lr`` is the learning rate just used."""

    def summary_metrics(self) -> dict[str, Any]:
        """Method-specific numbers for the run's ``summary.json`` (under ``method_summary``; e.g.
        sparsity and compression rates); empty by default."""
        return {}

    # ----------------------------------------------------------------- tasks
    @classmethod
    def check_task(cls, task_name: str, dataset: str = "the data") -> None:
        """Raise a one-line ValueError when the method is not written for ``task_name``."""
        if task_name not in cls.tasks:
            able = sorted(name for name in METHODS.names() if task_name in getattr(METHODS.get(name), "tasks", ()))
            raise ValueError(
                f"method '{cls.method_name()}' does not support the {task_name} task of {dataset} (it supports "
                f"{', '.join(cls.tasks)}); methods for {task_name}: {', '.join(able) or 'none'}"
            )

    def use_task(self, task: Task) -> None:
        """Score and supervise through ``task`` (checked against ``tasks``)."""
        self.check_task(task.name, getattr(task.info, "name", "the data"))
        self.task = task

    def supervised_loss(self, prediction: torch.Tensor, targets: torch.Tensor, **options: Any) -> torch.Tensor:
        """The task's loss on the labels: cross-entropy for classification, MSE for regression."""
        return self.task.supervised_loss(prediction, targets, **options)

    # ----------------------------------------------------------------- helpers
    @classmethod
    def method_name(cls) -> str:
        return getattr(cls, "name", cls.__name__)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        for teacher in self.teachers:
            teacher.eval()  # teachers never leave eval mode (BN statistics stay frozen)
        return self

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters outside the deployed network and the teachers (adapters, heads,
        memory banks, and for online methods the peers that are not deployed)."""
        deployed = {id(p) for p in self.inference_model().parameters()}
        return [
            param
            for name, param in self.named_parameters()
            if param.requires_grad and id(param) not in deployed and not name.startswith("teachers.")
        ]

    def evaluation_models(self) -> dict[str, nn.Module]:
        """Further networks to evaluate each epoch beside ``inference_model()`` (an online group's
        peers, branches and ensemble); their test top-1 is logged under ``members``."""
        return {}

    def extra_parameter_count(self) -> int:
        return sum(p.numel() for p in self.extra_parameters())

    @staticmethod
    def input_of(model: nn.Module, batch: Batch) -> torch.Tensor:
        """The input ``model`` reads: ``batch.inputs[model.kdforge_input]`` when the run gave it
        one (a teacher on another input of paired data), else ``batch.image``."""
        name = getattr(model, "kdforge_input", None)
        if name is None or name == batch.primary:
            return batch.image
        if name not in batch.inputs:
            raise KeyError(f"the batch has no input '{name}' (inputs: {', '.join(batch.inputs)})")
        return batch.inputs[name]

    @staticmethod
    def label_mask(batch: Batch) -> torch.Tensor | None:
        """Bool mask of the samples whose label may be used (None: all of them)."""
        return batch.extras.get("labelled")

    def teacher_logits(self, batch: Batch) -> list[torch.Tensor]:
        """Logits of every teacher on ``batch``.

        A teacher bank may have put pre-computed logits in ``batch.extras["teacher_logits"]``
        (shape K x B x C); they are used instead of running the teachers.
        """
        stored = batch.extras.get("teacher_logits")
        if stored is not None:
            return [t.float() for t in stored.unbind(0)]
        with torch.inference_mode():
            outputs = [teacher(self.input_of(teacher, batch)) for teacher in self.teachers]
        # clone: inference tensors cannot be saved for the student's backward pass
        return [out.float().clone() for out in outputs]

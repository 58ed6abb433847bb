"""The training loop: short, ours, on top of Lightning Fabric (devices, DDP, precision); a run that is
one float32 CPU process uses the lighter stand-in of engine/runtime.py instead.

A run directory holds::

    config.yaml          the resolved recipe (every default written out)
    metrics.jsonl        one JSON line per epoch: train loss terms, lr, images/s, test (and val) metrics
    summary.json         status (running / interrupted / failed with its cause / finished), final and best
                         metrics, cost
    curves.png           loss and accuracy against epoch
    checkpoints/
      state.pt           everything --resume needs (written atomically after every epoch)
      model_last.pt      the deployable network after the last finished epoch
      model_best.pt      the deployable network at the best epoch on the selection split

The best epoch is chosen on the validation split when there is one, otherwise on the test set;
``summary.json`` says which (``selection_split``), so a number chosen on the test set is never passed
off as a clean one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from kdforge.compress.fold import fold_frozen_teachers
from kdforge.compress.footprint import compression_report
from kdforge.config import RunConfig, build_config
from kdforge.core.allocator import tune_allocator
from kdforge.core.checkpoint import (
    STATE_FORMAT,
    atomic_save,
    atomic_write_text,
    load_file,
    model_record,
)
from kdforge.core.errors import ConfigError, KDForgeError, StorageError
from kdforge.core.runlock import RunLock
from kdforge.core.signals import PARENT_ENV, StopFlag
from kdforge.core.storage import ensure_writable_dir, remove_stale_temps, storage_message
from kdforge.data import Batch, DataSplits, TensorData, make_loader
from kdforge.data.tasks import Task, task_for
from kdforge.engine.build import (
    ModelSpec,
    build_augmentation,
    build_data,
    build_distiller,
    input_augmentations,
    model_input_shape,
    student_view,
)
from kdforge.engine.divergence import LossWatch, RunDiverged, likely_cause, nonfinite_tensors
from kdforge.engine.optim import build_optimizer, lr_function, set_learning_rate
from kdforge.engine.probe import compile_decision, estimated_step_seconds, has_conv2d, probe_channels_last
from kdforge.engine.record import device_description, run_record
from kdforge.engine.runtime import LocalRuntime, local_runtime_applies
from kdforge.methods import Distiller, Output, Step
from kdforge.models.precision import run_in_bfloat16
from kdforge.models.profile import count_flops

Callback = Callable[["Trainer", int, dict[str, Any]], None]


class RunInterrupted(KDForgeError):
    """Training stopped early (Ctrl-C); the run directory is consistent and can be resumed."""


def _make_fabric(config: RunConfig):
    accelerator = config.train.accelerator
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.accelerator is cuda but this process sees no CUDA GPU (torch.cuda.is_available() is False); "
            "use accelerator: auto (the GPU when there is one, else the CPU) or cpu"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.accelerator is mps but no Apple GPU is available; use accelerator: auto or cpu")
    strategy = config.train.strategy
    if config.train.devices > 1 and strategy == "auto":
        strategy = "ddp"
    precision = resolve_precision(config.train.precision, accelerator)
    if local_runtime_applies(accelerator, config.train.devices, strategy, precision):
        return LocalRuntime()  # one CPU process at 32-true: no Lightning import (engine/runtime.py)
    from lightning.fabric import Fabric

    fabric = Fabric(
        accelerator=config.train.accelerator,
        devices=config.train.devices,
        strategy=strategy,
        precision=precision,  # type: ignore[arg-type]
    )
    # Lightning keeps "which rank am I" in one process-wide setting that a Fabric sets only from a
    # cluster environment; an earlier run in the same process (a notebook, a test) could leave
    # another rank there, and the loggers' rank-0-only methods would then do nothing.
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    rank_zero_only.rank = fabric.global_rank  # type: ignore[attr-defined]
    return fabric


def resolve_precision(precision: str, accelerator: str) -> str:
    """The Fabric precision of a run: ``auto`` is bf16-mixed on a CUDA GPU that supports bfloat16,
    else 32-true; 16-mixed (float16 with loss scaling) is refused on the CPU, where Lightning would
    quietly switch to bf16-mixed."""
    cuda = accelerator in ("cuda", "auto") and torch.cuda.is_available()
    if precision == "auto":
        return "bf16-mixed" if cuda and torch.cuda.is_bf16_supported() else "32-true"
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not cuda and not torch.backends.mps.is_available())
    if precision == "16-mixed" and on_cpu:
        raise ConfigError(
            "train.precision 16-mixed (float16 with loss scaling) needs a GPU and this run is on the CPU; "
            "use bf16-mixed (bfloat16 autocast, supported on the CPU) or 32-true"
        )
    return precision


def _fabric_precision(fabric: Any, requested: str) -> str:
    """The precision Fabric runs with ("32-true", "bf16-mixed", ...), or the recipe's when unknown."""
    return str(getattr(getattr(fabric.strategy, "precision", None), "precision", None) or requested)


@dataclasses.dataclass
class _EpochTotals:
    """Sums over one epoch's batches on this rank: loss terms (tensors), metrics, images."""

    losses: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    images: int = 0

    def add(self, output: Output, batch_size: int, replays: int) -> None:
        """Add one forward's loss terms and metrics, weighted by the batch size (and split over replays)."""
        for name, value in output.losses.items():
            self.losses[name] = self.losses.get(name, 0.0) + value.detach() * batch_size / replays
        for name, value in output.metrics.items():  # tensors stay on the device (no per-step sync)
            value = value.detach() if isinstance(value, torch.Tensor) else float(value)
            self.metrics[name] = self.metrics.get(name, 0.0) + value * batch_size / replays


class Trainer:
    """Train one run described by a RunConfig into ``out_dir``.

    ``callbacks`` are called after every epoch as ``callback(trainer, epoch, record)``; a callback
    may raise ``KeyboardInterrupt`` (tests use this to interrupt a run at a known point).
    """

    def __init__(
        self,
        config: RunConfig,
        out_dir: str | Path,
        *,
        resume: bool = False,
        callbacks: Sequence[Callback] = (),
        fabric: Any = None,
    ) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.callbacks = list(callbacks)
        self.fabric = fabric or _make_fabric(config)
        self.history: list[dict[str, Any]] = []
        self.stop_flag = StopFlag()

    # ------------------------------------------------------------------ paths
    @property
    def state_path(self) -> Path:
        return self.out_dir / "checkpoints" / "state.pt"

    def _check_run_directory(self) -> None:
        """Refuse to overwrite an existing run, and refuse to resume one with another recipe."""
        saved = self.out_dir / "config.yaml"
        if self.resume:
            if saved.is_file():
                previous = build_config(yaml.safe_load(saved.read_text()))
                differences = [
                    d
                    for d in _differences(previous.to_dict(), self.config.to_dict())
                    if d.split(":")[0] not in RESUME_FREE_KEYS
                ]
                if differences:
                    raise ConfigError(
                        f"run directory '{self.out_dir}' was started with a different recipe "
                        f"({differences[0]}); resume with the same recipe or choose another --out"
                    )
            return
        if self.state_path.exists() or (self.out_dir / "summary.json").exists():
            raise ConfigError(
                f"run directory '{self.out_dir}' already holds a run; pass --resume to continue it "
                "or choose another --out"
            )

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        config = self.config
        fabric = self.fabric
        if config.train.num_threads:
            torch.set_num_threads(config.train.num_threads)
        if fabric.world_size > 1 and os.environ.get("LOCAL_RANK", "0") == "0":
            # the processes Fabric starts for the other local ranks stop when this one dies (even by
            # kill -9 or a timeout), instead of waiting in a collective for half an hour
            os.environ[PARENT_ENV] = str(os.getpid())
        try:
            fabric.launch()
        finally:  # only the processes started by launch() inherit it, never a later command in this process
            os.environ.pop(PARENT_ENV, None)
        # before data and networks are allocated: a CPU step then reuses freed memory (core/allocator.py)
        self.allocator = tune_allocator(config.train.allocator, fabric.device.type)
        if fabric.is_global_zero:
            ensure_writable_dir(self.out_dir)  # before any data is loaded: a bad --out fails at once
            # one writer per run directory: a second train/bench on the same --out is refused
            if getattr(self, "lock", None) is None:
                self.lock = RunLock(self.out_dir).acquire()
            self._check_run_directory()
            # temporary files of atomic writes killed half-way (kill -9); safe: we hold the lock
            remove_stale_temps(self.out_dir, self.out_dir / "checkpoints")
        fabric.barrier()
        fabric.seed_everything(config.seed, verbose=False)

        self.data: DataSplits = student_view(build_data(config.data), config)
        if config.train.progress != "none":  # the run's first line says where it trains
            precision = _fabric_precision(fabric, config.train.precision)
            shown = "" if precision == "32-true" else f", {precision}"
            self.fabric.print(
                f"[{config.name}] {self.data.summary()}; training on {device_description(fabric.device)}{shown}"
            )
        self.info = self.data.info
        self.task = task_for(self.info)
        torch.manual_seed(config.seed)  # model initialisation depends on the seed only
        distiller, self.spec = build_distiller(config, self.info, self.data.train)
        self.distiller: Distiller = distiller
        self.teacher_folding = None
        if config.train.fold_teacher_bn and len(distiller.teachers):
            _compression_summary(self)  # compression rates are against the teacher as trained
            self.teacher_folding = fold_frozen_teachers(
                list(distiller.teachers), trained=_non_teacher_parameters(distiller)
            )
        self.teacher_precision = None
        if config.train.teacher_precision == "bf16" and len(distiller.teachers):
            # frozen teachers only (as for BatchNorm folding): a network that keeps training stays float32
            shared = {id(p) for p in _non_teacher_parameters(distiller)}
            frozen = [
                t
                for t in distiller.teachers
                if not t.training and not any(p.requires_grad or id(p) in shared for p in t.parameters())
            ]
            for teacher in frozen:
                run_in_bfloat16(teacher, fabric.device.type)
            self.teacher_precision = {
                "precision": "bf16",
                "teachers": len(frozen),
                **(
                    {"left_float32": len(distiller.teachers) - len(frozen)}
                    if len(frozen) < len(distiller.teachers)
                    else {}
                ),
            }

        augmentation = build_augmentation(config.data, self.info)
        self._on_device: dict[int, Any] = {}
        self.data_on_device = resident_decision(
            config.data.on_device, self.data.train, fabric.device, _device_memory(fabric.device)
        )
        self.train_loader = make_loader(
            self._resident(self.data.train),
            config.train.batch_size,
            num_workers=config.data.num_workers,
            shuffle=True,
            drop_last=config.train.drop_last,
            seed=config.seed,
            augmentation=augmentation,
            train=True,
            rank=fabric.global_rank,
            world_size=fabric.world_size,
            device=fabric.device,  # uint8 images travel to the device, augmentation runs there
            input_augmentations=input_augmentations(config.data, self.info),  # paired data's other inputs
            sampler=config.data.sampler.model_dump() if config.data.sampler else None,
        )
        self.eval_augmentation = augmentation
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"train.batch_size={config.train.batch_size} with drop_last leaves no batch for "
                f"{len(self.data.train)} training images; lower the batch size"
            )
        partial = self.train_loader.partial_batch_size
        if partial and distiller.batch_size_dependent:
            raise ConfigError(
                f"method '{config.method.name}' has a loss whose scale depends on the batch size, and "
                f"train.drop_last: false leaves a last batch of {partial} images (not "
                f"{config.train.batch_size}) that it would over-weight; set train.drop_last: true or a "
                f"batch size that divides the {self.train_loader.samples_per_rank} training images"
            )
        self.total_steps = self.steps_per_epoch * config.train.epochs
        self.memory_format = self._choose_memory_format(augmentation)
        self.compilation = self._choose_compile(augmentation)

        groups = distiller.optimizer_groups()
        optimizers = [build_optimizer(g, config.train.optimizer) for g in groups]
        self.base_lrs = [{**config.train.optimizer.model_dump(), **(g.optimizer or {})}["lr"] for g in groups]
        self.lr_at = [
            lr_function(config.train.scheduler, lr, config.train.epochs, self.steps_per_epoch) for lr in self.base_lrs
        ]
        self.group_names = [g.name for g in groups]
        self.model, *self.optimizers = fabric.setup(distiller, *optimizers)
        self.bank = self._teacher_bank(augmentation)

        self.start_epoch = 0
        self.global_step = 0
        self.train_seconds = 0.0
        self.wall_seconds_before = 0.0  # wall time of earlier sessions of a resumed run
        self.best: dict[str, Any] = {}
        self.loss_watch = LossWatch()
        # read step losses every step on the CPU, every 25 steps on an accelerator (no per-step sync)
        self.loss_sync_every = 1 if fabric.device.type == "cpu" else 25
        self._pending_losses: list[tuple[int, torch.Tensor]] = []
        self._last_loss = math.nan
        if self.resume and self.state_path.exists():
            self._load_state()
        if fabric.is_global_zero:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), self.out_dir / "config.yaml")
            self._rewrite_metrics()
        self.experiment_loggers = self._experiment_loggers() if fabric.is_global_zero else None

    def _choose_memory_format(self, augmentation) -> dict[str, Any]:
        """Lay out the networks as ``train.channels_last`` says (engine/probe.py): ``auto`` gives
        channels_last to every network with 2-D convolutions (faster for every zoo network's
        training step and teacher forward we measured; benchmarks/RESULTS.md), except on MPS;
        ``probe`` times both layouts on the run's device; true/false force it."""
        setting = self.config.train.channels_last
        distiller = self.distiller
        teachers = list(distiller.teachers)
        decision: dict[str, Any]
        if setting == "auto":
            usable = self.fabric.device.type != "mps"
            decision = {
                "student": usable and has_conv2d(distiller.inference_model()),
                "teachers": [usable and has_conv2d(t) for t in teachers],
                "reason": "auto: channels_last for networks with 2-D convolutions" if usable else "auto: MPS",
            }
        elif setting == "probe":
            decision = self._probe_memory_format(augmentation, teachers)
        else:
            decision = {"student": bool(setting), "teachers": [bool(setting)] * len(teachers)}
            decision["reason"] = f"train.channels_last: {str(bool(setting)).lower()}"
        if decision["student"]:
            for name, module in distiller.named_children():
                if name != "teachers":
                    module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        for teacher, nhwc in zip(teachers, decision["teachers"]):
            teacher.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)  # type: ignore[call-overload]
        return decision

    def _earlier_choice(self, key: str) -> Any:
        """``summary.json[key]`` of the run being resumed (None for a fresh run)."""
        summary = self.out_dir / "summary.json"
        if not (self.resume and summary.exists()):
            return None
        try:
            return json.loads(summary.read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            return None

    def _probe_batch(self, augmentation) -> Batch:
        """The first training batch, in order and unaugmented, on the run's device (for timing)."""
        probe_loader = make_loader(
            self.data.train,
            min(self.config.train.batch_size, len(self.data.train)),
            shuffle=False,
            augmentation=augmentation,
            train=False,
            device=self.fabric.device,
        )
        return next(iter(probe_loader))

    def _choose_compile(self, augmentation) -> dict[str, Any]:
        """Compile the student as ``train.compile`` says (engine/probe.py ``compile_decision``); a
        resumed run keeps its first session's choice. A compilation that fails on the warm-up step
        leaves the student eager, with the reason recorded, instead of stopping the run."""
        earlier = self._earlier_choice("compile")
        if isinstance(earlier, dict) and isinstance(earlier.get("compiled"), bool):
            decision = dict(earlier)
        else:
            student = self.distiller.student

            def step_seconds() -> float:
                flops = count_flops(copy.deepcopy(student).cpu().eval(), self.info.sample_shape)
                return estimated_step_seconds(flops, self.config.train.batch_size, self.fabric.device.type)

            try:
                decision = compile_decision(
                    self.config.train.compile,
                    total_steps=self.total_steps,
                    device_type=self.fabric.device.type,
                    step_seconds=step_seconds,
                )
            except Exception as exc:  # noqa: BLE001 - an estimate never stops a run
                decision = {"compiled": False, "reason": f"auto: no estimate ({type(exc).__name__}: {exc})"}
            if self.fabric.world_size > 1:  # every rank follows rank 0
                decision = self.fabric.broadcast(decision, src=0)
        if decision["compiled"] and _has_forward_hooks(self.distiller.student):
            decision = {
                "compiled": False,
                "reason": f"{decision['reason']}; not compiled: the method taps the student's features with forward "
                "hooks, which a compiled graph does not run",
            }
            if self.config.train.compile is True:
                self.fabric.print(f"[{self.config.name}] train.compile ignored: {decision['reason']}")
        if decision["compiled"]:
            decision = self._compile_student(decision, augmentation)
        return decision

    def _task_loss(self, prediction: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.task.supervised_loss(prediction, targets)

    def _student_layout(self, image: torch.Tensor) -> torch.Tensor:
        nhwc = self.memory_format["student"] and image.dim() == 4
        return image.contiguous(memory_format=torch.channels_last) if nhwc else image

    def _compile_student(self, decision: dict[str, Any], augmentation) -> dict[str, Any]:
        """torch.compile the student in place and compile one training step now, on a batch of the
        run (weights, BatchNorm statistics and gradients restored afterwards), so that a compiler
        failure is found before training and the warm-up time is measured apart."""
        student = self.distiller.student
        student.to(self.fabric.device)
        saved = {k: v.detach().clone() for k, v in student.state_dict().items()}
        was_training = student.training
        started = time.perf_counter()
        try:
            student.compile()
            batch = self._probe_batch(augmentation)
            student.train()
            with self.fabric.autocast():
                prediction = student(self._student_layout(batch.image))
            self._task_loss(prediction.float(), batch.targets).backward()
        except Exception as exc:  # noqa: BLE001 - an eager student still trains
            student._compiled_call_impl = None  # back to the eager forward
            decision = {
                **decision,
                "compiled": False,
                "reason": f"{decision['reason']}; compilation failed "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}), eager kept",
            }
        else:
            decision = {**decision, "warmup_seconds": time.perf_counter() - started}
        finally:
            student.zero_grad(set_to_none=True)
            student.load_state_dict(saved)
            student.train(was_training)
        return decision

    def _probe_memory_format(self, augmentation, teachers: list[nn.Module]) -> dict[str, Any]:
        """Time both layouts once; a resumed run reuses its first session's choice (same numerics)."""
        earlier = self._earlier_choice("memory_format")
        if isinstance(earlier, dict) and len(earlier.get("teachers", [])) == len(teachers):
            return earlier
        batch = self._probe_batch(augmentation)
        for teacher in teachers:
            teacher.to(self.fabric.device)
        try:
            decision = probe_channels_last(
                self.distiller.inference_model(), teachers, batch.image, batch.targets, loss=self._task_loss
            )
        except Exception as exc:  # noqa: BLE001 - a probe never stops a run; the default layout stays
            decision = {"student": False, "teachers": [False] * len(teachers)}
            decision["reason"] = f"probe failed ({type(exc).__name__}: {exc}); contiguous layout kept"
        if self.fabric.world_size > 1:  # every rank uses rank 0's choice
            decision = self.fabric.broadcast(decision, src=0)
        return decision

    def _teacher_bank(self, augmentation):
        """The stored teacher outputs to replay, when the recipe asks for them and the method can use them."""
        settings = self.config.teacher_bank
        if not settings.enabled or not len(self.distiller.teachers):
            return None
        if any(
            getattr(t, "kdforge_input", self.info.input_name) != self.info.input_name for t in self.distiller.teachers
        ):
            self.fabric.print(
                f"[{self.config.name}] teacher_bank ignored: a teacher reads another input; its teachers run live"
            )
            return None
        if not self.distiller.replays_teacher_logits:
            self.fabric.print(
                f"[{self.config.name}] teacher_bank ignored: method '{self.config.method.name}' "
                "uses teacher features, so its teachers run live"
            )
            return None
        if settings.top_k is not None and self.task.name != "classification":
            raise ConfigError(
                f"teacher_bank.top_k keeps the largest class logits, which means nothing for the {self.task.name} "
                "task (its outputs are stored whole); remove top_k"
            )
        from kdforge.engine.bank import TeacherBank, unusable_reason

        reason = unusable_reason(self.data.train, augmentation)
        if reason is not None:
            self.fabric.print(f"[{self.config.name}] teacher_bank ignored: {reason}; its teachers run live")
            return None
        return TeacherBank(
            settings.directory,
            list(self.distiller.teachers),
            [t.checkpoint for t in self.config.teachers],
            self.data.train,
            self.info.name,
            augmentation,
            self.config.seed,
            top_k=settings.top_k,
            device=self.fabric.device,
        )

    def _experiment_loggers(self):
        """train.loggers (kdforge.engine.loggers): rank 0 sends each epoch's record and the recipe."""
        names = self.config.train.logger_names()
        if not names:
            return None
        if self.config.train.tensorboard and self.config.train.progress != "none":
            self.fabric.print(f"[{self.config.name}] train.tensorboard is deprecated; use train.loggers: [tensorboard]")
        from kdforge.engine.loggers import ExperimentLoggers

        loggers = ExperimentLoggers(
            names, dict(self.config.train.logger_options), self.out_dir, self.config.name, self.config.to_dict()
        )
        loggers.start(self.history)
        return loggers

    # ------------------------------------------------------------------ state
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """Distiller weights without the frozen teachers (they come from their own files)."""
        return {k: v for k, v in self.distiller.state_dict().items() if not k.startswith("teachers.")}

    def _save_state(self, next_epoch: int) -> None:
        state = {
            "format": STATE_FORMAT,
            "version": 1,
            "epoch": next_epoch,
            "global_step": self.global_step,
            "train_seconds": self.train_seconds,
            "wall_seconds": self._wall_seconds(),
            "distiller": self._trainable_state(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "rng": torch.get_rng_state(),
            "history": json.dumps(self.history),
            "best": json.dumps(self.best),
            "loss_reference": json.dumps(self.loss_watch.reference),
        }
        atomic_save(state, self.state_path)

    def _load_state(self) -> None:
        state = load_file(self.state_path)
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"'{self.state_path}' is not a kdforge training state; choose another --out")
        missing, unexpected = self.distiller.load_state_dict(state["distiller"], strict=False)
        missing = [k for k in missing if not k.startswith("teachers.")]
        if missing or unexpected:
            raise ConfigError(
                f"'{self.state_path}' does not fit this recipe's networks (e.g. {(missing or unexpected)[0]}); "
                "resume with the recipe the run was started with"
            )
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        torch.set_rng_state(state["rng"])
        self.start_epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.train_seconds = float(state["train_seconds"])
        self.wall_seconds_before = float(state.get("wall_seconds", 0.0))
        self.history = json.loads(state["history"])
        self.best = json.loads(state["best"])
        self.loss_watch = LossWatch(json.loads(state.get("loss_reference", "[]")))

    def _wall_seconds(self) -> float:
        return self.wall_seconds_before + time.perf_counter() - self.session_started

    def _rewrite_metrics(self) -> None:
        """metrics.jsonl always matches the saved state (an epoch logged after the last state is dropped)."""
        lines = "".join(json.dumps(record) + "\n" for record in self.history)
        atomic_write_text(lines, self.out_dir / "metrics.jsonl")

    def _save_model(self, path: Path, metrics: dict[str, Any]) -> None:
        spec: ModelSpec = self.spec
        record = model_record(
            self.distiller.inference_model(),
            name=spec.name,
            # a model may complete its constructor arguments during setup (NoNN's partition)
            kwargs={**spec.kwargs, **getattr(self.distiller.inference_model(), "saved_kwargs", {})},
            num_classes=spec.num_classes,
            in_channels=spec.in_channels,
            input_size=spec.input_size,
            dataset=dataclasses.asdict(self.info),
            metrics=metrics,
        )
        record["data"] = self.config.data.model_dump(mode="json")  # eval/export reuse root and options
        if self.config.imports:  # what an error should tell a later process to --import
            record["imports"] = list(self.config.imports)
        if getattr(spec, "architecture", None):  # LMA / pruned / QAT networks (kdforge.compress.arch)
            record["model"]["architecture"] = spec.architecture
        atomic_save(record, path)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        try:
            return self._fit()
        finally:
            lock = getattr(self, "lock", None)
            if lock is not None:
                lock.release()

    def _fit(self) -> dict[str, Any]:
        self.session_started = time.perf_counter()
        self.setup()
        epochs = self.config.train.epochs
        if self.start_epoch >= epochs and self.fabric.is_global_zero:
            return self._finish(status="finished")
        try:
            with StopFlag() as self.stop_flag:
                for epoch in range(self.start_epoch, epochs):
                    record = self._run_epoch(epoch)
                    self._check_finite_epoch(epoch, record)  # every rank: the weights are the same
                    self.history.append(record)
                    if self.fabric.is_global_zero:
                        with self.stop_flag.deferred():  # a signal waits until the epoch's files are written
                            self._end_of_epoch(epoch, record)
                    self.fabric.barrier()
                    for callback in self.callbacks:
                        callback(self, epoch, record)
                    self.stop_flag.check()
                with self.stop_flag.deferred(check=False):  # the run is complete: a late signal changes nothing
                    return self._finish(status="finished") if self.fabric.is_global_zero else {}
        except KeyboardInterrupt:
            if self.fabric.is_global_zero:
                with StopFlag().deferred(check=False):
                    self._finish(status="interrupted")
            raise RunInterrupted(
                f"interrupted; the run directory '{self.out_dir}' is intact: resume with --resume"
            ) from None
        except (KDForgeError, OSError) as exc:
            message = str(exc) if isinstance(exc, KDForgeError) else storage_message(exc, self.out_dir)
            if self.fabric.is_global_zero:
                self._record_failure(message)
            if isinstance(exc, KDForgeError):
                raise
            raise StorageError(message) from None
        except Exception as exc:  # an unexpected crash: recorded as failed (with its cause), then re-raised
            if self.fabric.is_global_zero:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                self._record_failure(f"crashed with {type(exc).__name__}: {first}"[:500])
            raise

    def _record_failure(self, message: str) -> None:
        """Mark the run 'failed' with its cause in summary.json (best effort: the disk may be full)."""
        try:
            with StopFlag().deferred(check=False):
                self._write_summary("failed", error=message)
                loggers = getattr(self, "experiment_loggers", None)
                if loggers is not None:
                    loggers.close("failed")
        except (OSError, KDForgeError):
            pass

    def _check_finite_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        """Refuse to save an epoch whose weights (or mean loss) are not finite: the files of the
        last finite epoch stay as they are."""
        bad = nonfinite_tensors(self.distiller)
        loss = record["train"].get("loss", 0.0)
        if bad or not math.isfinite(loss):
            what = f"weights became non-finite ('{bad[0]}')" if bad else f"the epoch's mean loss is {loss}"
            raise RunDiverged(
                f"run diverged in epoch {epoch + 1}: {what}; likely cause: {likely_cause(self)}; {self._kept_files()}"
            )

    def _kept_files(self) -> str:
        if (self.out_dir / "checkpoints" / "model_last.pt").exists():
            return "checkpoints/model_last.pt keeps the last finite epoch"
        return "no epoch finished, so no model file was written"

    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch: every training batch, then the epoch's record (and evaluation when it is due)."""
        bank_seconds = self._start_epoch(epoch)
        totals = _EpochTotals()
        bar = self._progress_bar(epoch)
        started = time.perf_counter()
        for batch in self.train_loader:
            step = self._prepare_batch(batch, epoch)
            loss_value = self._train_step(batch, step, epoch, totals)
            totals.images += len(batch)
            self.global_step += 1
            self._log_step(bar, loss_value, totals.images, started)
        self._flush_losses(None, None, epoch)
        seconds = time.perf_counter() - started
        if bar is not None:
            bar.close()
        self.train_seconds += seconds
        record = self._epoch_record(epoch, totals, seconds, bank_seconds)
        if self._evaluation_due(epoch):
            self._evaluate_epoch(record)
        return record

    def _start_epoch(self, epoch: int) -> float:
        """Reshuffle, train mode, the method's epoch hook, this epoch's teacher bank; returns the bank's seconds."""
        self.train_loader.set_epoch(epoch)
        self.model.train()
        self.distiller.on_epoch_start(self._step(epoch))
        if self.bank is None:
            return 0.0
        started = time.perf_counter()
        if self.fabric.is_global_zero:  # one rank fills the epoch; the others read it
            self.bank.ensure_epoch(epoch)
        self.fabric.barrier()
        return time.perf_counter() - started

    def _prepare_batch(self, batch, epoch: int) -> Step:
        """Set this step's learning rates; lay the batch out for the step; returns the Step."""
        step = self._step(epoch)
        lrs = [lr_at(self.global_step) for lr_at in self.lr_at]
        for optimizer, lr in zip(self.optimizers, lrs):
            set_learning_rate(optimizer, lr)
        if self.memory_format["student"]:
            batch.inputs = {
                k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v
                for k, v in batch.inputs.items()
            }
        if self.bank is not None:
            batch.extras["teacher_logits"] = self.bank.lookup(epoch, batch.index)
        step.lr = lrs[0]
        return step

    def _train_step(self, batch, step: Step, epoch: int, totals: _EpochTotals) -> float:
        """Forward, backward and optimizer steps on one batch; returns the (last) loss.

        A method may replay each batch (free adversarial training): one optimizer step per
        replay, while the schedules and global_step advance once per batch.
        """
        replays = max(int(self.distiller.batch_replays), 1)
        for _ in range(replays):
            output = self.model(batch, step)
            loss_value = self._watch_loss(output, batch, epoch)
            self.fabric.backward(output.loss)
            self._optimizer_step()
            self.distiller.after_optimizer_step(step)
            totals.add(output, len(batch), replays)
        self.stop_flag.check()  # SIGTERM: stop between steps, never inside a save
        return loss_value

    def _watch_loss(self, output: Output, batch, epoch: int) -> float:
        """The step's loss value for the progress bar, checked by the divergence rules.

        On the CPU each step's loss is read at once (free). On an accelerator reading it would
        wait for the device every step, so the losses are kept on the device and read together
        every ``loss_sync_every`` steps and at the epoch's end (one wait); a divergence is then
        reported at most that many steps late, with the step it happened at, and the weights are
        checked before anything is saved either way. Returns the last loss read (NaN before any).
        """
        self._pending_losses.append((self.global_step, output.loss.detach()))
        if len(self._pending_losses) >= self.loss_sync_every:
            self._flush_losses(output, batch, epoch)
        return self._last_loss

    def _flush_losses(self, output: Output | None, batch, epoch: int) -> None:
        """Read the pending step losses (one device sync) and apply the divergence rules in order."""
        if not self._pending_losses:
            return
        steps = [s for s, _ in self._pending_losses]
        values = torch.stack([v.float().reshape(()) for _, v in self._pending_losses]).tolist()
        self._pending_losses = []
        for at, value in zip(steps, values):
            self._last_loss = value
            self._check_loss(value, output, batch, epoch, at)

    def _check_loss(self, loss_value: float, output: Output | None, batch, epoch: int, at: int) -> None:
        """A NaN, infinite or exploding loss stops the run (kdforge.engine.divergence)."""
        problem = self.loss_watch.check(loss_value)
        if problem is None:
            return
        if output is None:  # found at the epoch's end: the culprit analysis has no step at hand
            raise RunDiverged(
                f"run diverged at epoch {epoch + 1}, step {at}: {problem}; likely cause: the learning rate "
                f"(or a temperature or loss weight); {self._kept_files()}"
            )
        terms = {k: float(v.detach()) for k, v in output.losses.items()}
        worst = max(terms, key=lambda k: abs(terms[k]) if math.isfinite(terms[k]) else math.inf) if terms else None
        term = f" (loss term '{worst}' = {terms[worst]:.3g})" if worst and len(terms) > 1 else ""
        raise RunDiverged(
            f"run diverged at epoch {epoch + 1}, step {at}: {problem}{term}; likely cause: "
            f"{likely_cause(self, batch)}; {self._kept_files()}"
        )

    def _optimizer_step(self) -> None:
        """Clip (when asked), step and zero every optimizer."""
        for optimizer in self.optimizers:
            if self.config.train.grad_clip:
                self.fabric.clip_gradients(self.model, optimizer, max_norm=self.config.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def _log_step(self, bar, loss_value: float, images: int, started: float) -> None:
        """Advance the progress bar; every 10 steps show the loss and images/s."""
        if bar is None:
            return
        bar.update(1)
        if self.global_step % 10 == 0:
            seconds = time.perf_counter() - started
            speed = {"img_s": f"{images / max(seconds, 1e-9):.0f}"}
            loss = {"loss": f"{loss_value:.3f}"} if math.isfinite(loss_value) else {}  # none read yet on a GPU
            bar.set_postfix(**loss, **speed)

    def _epoch_record(self, epoch: int, totals: _EpochTotals, seconds: float, bank_seconds: float) -> dict[str, Any]:
        """The epoch's metrics.jsonl line: loss terms and metrics summed over every rank, cost, lr."""
        images = totals.images
        total_images = self.fabric.all_reduce(torch.tensor(float(images), device=self.fabric.device), reduce_op="sum")
        losses = {k: float(self.fabric.all_reduce(v, reduce_op="sum") / total_images) for k, v in totals.losses.items()}
        return {
            "epoch": epoch,
            "train": {
                "loss": sum(losses.values()),
                **{f"loss_{k}": v for k, v in losses.items()},
                **{k: float(v) / max(images, 1) for k, v in totals.metrics.items()},
                "images_per_second": float(total_images) / max(seconds, 1e-9),
                "seconds": seconds,
                **({"teacher_bank_seconds": bank_seconds} if self.bank is not None else {}),
            },
            "lr": {name: lr_at(max(self.global_step - 1, 0)) for name, lr_at in zip(self.group_names, self.lr_at)},
        }

    def _evaluation_due(self, epoch: int) -> bool:
        last_epoch = epoch == self.config.train.epochs - 1
        return (epoch + 1) % self.config.train.eval_every == 0 or last_epoch

    def _evaluate_epoch(self, record: dict[str, Any]) -> None:
        """Add test (and val) metrics of the deployed network, and each group member's primary test
        metric (top-1 for classification)."""
        record["test"] = self.evaluate(self.data.test)
        if self.data.val is not None:
            record["val"] = self.evaluate(self.data.val)
        members = self.distiller.evaluation_models()
        if members:
            primary = self.task.primary
            record["members"] = {name: self.evaluate(self.data.test, model)[primary] for name, model in members.items()}

    def _step(self, epoch: int) -> Step:
        return Step(epoch, self.config.train.epochs, self.global_step, self.total_steps)

    def _progress_bar(self, epoch: int):
        mode = self.config.train.progress
        if mode == "none" or not self.fabric.is_global_zero:
            return None
        if mode == "auto" and not sys.stderr.isatty():
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.config.train.epochs}", leave=False)

    def _resident(self, split):
        """``split`` on the accelerator when ``data_on_device`` says so (one copy per split, kept)."""
        if not self.data_on_device.get("resident") or not isinstance(split, TensorData):
            return split
        key = id(split)
        if key not in self._on_device:
            self._on_device[key] = (split, split.to(self.fabric.device))  # the original keeps the id unique
        return self._on_device[key][1]

    @torch.no_grad()
    def evaluate(self, split, model: nn.Module | None = None) -> dict[str, float]:
        """The task's metrics (top-1, top-5 and mean CE for classification) of the deployed network
        (or ``model``), each rank on its own shard."""
        return evaluate_model(
            model if model is not None else self.distiller.inference_model(),
            self._resident(split),
            self.eval_augmentation,
            self.config.train.eval_batch_size,
            rank=self.fabric.global_rank,
            world_size=self.fabric.world_size,
            reduce=lambda t: self.fabric.all_reduce(t.to(self.fabric.device), reduce_op="sum").cpu(),
            autocast=self.fabric.autocast,
            channels_last=self.memory_format["student"],
            device=self.fabric.device,
            num_workers=self.config.data.num_workers,
            task=self.task,
        )

    # ------------------------------------------------------------------ bookkeeping
    def _selection_split(self) -> str:
        return "val" if self.data.val is not None else "test"

    def _end_of_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        checkpoints = self.out_dir / "checkpoints"
        split = self._selection_split()
        if split in record:
            primary = self.task.primary  # "top1" for classification, "mae" for regression
            value = record[split][primary]
            if not self.best or self.task.is_better(value, self.best[primary]):
                self.best = {
                    "epoch": epoch,
                    primary: value,
                    "metric": primary,
                    "split": split,
                    "test": record.get("test"),
                }
                self._save_model(checkpoints / "model_best.pt", {"epoch": epoch, **record.get("test", {})})
        self._save_model(checkpoints / "model_last.pt", {"epoch": epoch, **record.get("test", {})})
        with open(self.out_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self._save_state(epoch + 1)
        self._write_summary("running")
        if self.experiment_loggers is not None:
            self.experiment_loggers.log_epoch(record)
        epochs = self.config.train.epochs
        every = max(1, math.ceil(epochs / 10))  # about ten lines per run, whatever its length
        if self.config.train.progress != "none" and ((epoch + 1) % every == 0 or epoch == 0):
            test = record.get("test", {})
            shown = f" test {self.task.describe(test)}" if test else ""
            self.fabric.print(
                f"[{self.config.name}] epoch {epoch + 1}/{self.config.train.epochs} "
                f"loss {record['train']['loss']:.4f}{shown} "
                f"({record['train']['images_per_second']:.0f} img/s)"
            )

    def _write_summary(self, status: str, error: str | None = None) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        student = self.distiller.inference_model()
        summary = {
            "name": self.config.name,
            "status": status,
            **({"error": error} if error else {}),
            "method": self.config.method.name,
            "dataset": self.info.name,
            "task": self.task.name,
            "student": self.spec.name,
            "teachers": [t.name or "" for t in self.config.teachers],
            "seed": self.config.seed,
            "epochs_done": len(self.history),
            "epochs": self.config.train.epochs,
            "final": {"epoch": last.get("epoch"), "test": last.get("test"), "val": last.get("val")},
            "best": self.best,
            "selection_split": self._selection_split(),
            "student_parameters": sum(p.numel() for p in student.parameters()),
            "extra_parameters": self.distiller.extra_parameter_count(),
            **({"teacher_bn_folding": self.teacher_folding} if self.teacher_folding else {}),
            "memory_format": self.memory_format,
            "compile": getattr(self, "compilation", None),
            **({"teacher_precision": tp} if (tp := getattr(self, "teacher_precision", None)) else {}),
            "allocator": getattr(self, "allocator", None),
            "data_on_device": getattr(self, "data_on_device", None),
            **({"method_summary": extra} if (extra := self.distiller.summary_metrics()) else {}),
            "train_seconds": self.train_seconds,
            "wall_seconds": self._wall_seconds(),
            "seconds_per_batch": self.train_seconds / max(self.global_step, 1),
            "global_step": self.global_step,
            "world_size": self.fabric.world_size,
            "precision": _fabric_precision(self.fabric, self.config.train.precision),
            "record": run_record(self.fabric.device, self.config.seed),
            "compression": _compression_summary(self),
        }
        atomic_write_text(json.dumps(summary, indent=2) + "\n", self.out_dir / "summary.json")
        return summary

    def _finish(self, status: str) -> dict[str, Any]:
        summary = self._write_summary(status)
        if self.history:
            from kdforge.engine.curves import plot_curves

            plot_curves(self.history, self.out_dir / "curves.png", title=self.config.name)
        loggers = getattr(self, "experiment_loggers", None)
        if loggers is not None:
            loggers.close(status)
        return summary


def _compression_summary(trainer: Trainer) -> dict[str, Any]:
    """The ``compression`` entry of a run's summary.json, measured once per session and cached:
    parameters, FLOPs, size, CPU latency and rates against the first teacher
    (:func:`kdforge.compress.footprint.compression_report`).

    Student = the deployed network; teacher = the run's first teacher (none for teacher-less
    runs). Latency uses few repeats (2 warm-up, 5 timed) so a summary costs about a second; it
    never fails a run (an error is recorded instead).
    """
    cached = getattr(trainer, "_compression_summary", None)
    if cached is not None:
        return cached
    try:
        info = trainer.info
        shape = model_input_shape(info)
        teachers = list(getattr(trainer.distiller, "teachers", []) or [])
        report = compression_report(
            trainer.distiller.inference_model(), shape, teachers[0] if teachers else None, warmup=2, repeats=5
        )
    except Exception as exc:  # noqa: BLE001 - a report must never stop training
        report = {"error": f"{type(exc).__name__}: {exc}"}
    trainer._compression_summary = report
    return report


def evaluate_model(
    model: nn.Module,
    split,
    augmentation,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: Callable[[], Any] | None = None,
    channels_last: bool = False,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    task: Task | None = None,
) -> dict[str, float]:
    """Evaluate a network on a split (TensorData or StreamData) through ``task``'s evaluator:
    top-1, top-5 (%) and mean cross-entropy for classification (the default), MAE, RMSE and MSE
    for regression."""
    task = task or task_for(None)
    was_training = model.training
    model.eval()
    if world_size > 1 and not task.shardable:  # e.g. retrieval ranks a whole gallery: every rank sees all
        rank, world_size, reduce = 0, 1, None
    if world_size > 1:  # a strided shard per rank, without the padding a training sampler adds
        split = split.select(torch.arange(rank, len(split), world_size))
    loader = make_loader(
        split, batch_size, num_workers=num_workers, shuffle=False, augmentation=augmentation, train=False, device=device
    )
    evaluator = task.evaluator()
    with torch.inference_mode():
        for batch in loader:
            channels = channels_last and batch.image.dim() == 4  # tabular rows have no channel layout
            image = batch.image.contiguous(memory_format=torch.channels_last) if channels else batch.image
            with autocast() if autocast else nullcontext():
                prediction = task.predict(model, image)
            evaluator.update(prediction, batch.targets)
    model.train(was_training)
    return evaluator.finish(reduce)


#: settings a resumed run may change: they decide how often and how visibly the run is evaluated
#: and logged, or how many threads it uses, not what it trains (config.yaml records the new values)
RESUME_FREE_KEYS = frozenset(
    {
        "train.eval_every",
        "train.eval_batch_size",
        "train.progress",
        "train.num_threads",
        "train.tensorboard",
        "train.loggers",
        "train.logger_options",
        "data.num_workers",
    }
)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, path + ".")
        elif a != b:
            found.append(f"{path}: {a!r} then, {b!r} now")
    return found


def _device_memory(device: torch.device) -> int | None:
    """Total memory of a CUDA device in bytes (None elsewhere)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


def resident_decision(setting: bool | str, split: Any, device: torch.device, memory: int | None) -> dict[str, Any]:
    """Whether in-memory splits live on the accelerator (``data.on_device``): ``{"resident", "reason"}``.

    On a GPU, gathering a batch from a resident uint8 tensor replaces a pageable host gather and
    copy per step (CIFAR-10's training images are 150 MB). ``auto`` keeps a split there when it
    takes at most a quarter of the device's memory; the CPU and streamed data never need it.
    """
    if device.type == "cpu":
        return {"resident": False, "reason": "the run is on the CPU"}
    if not isinstance(split, TensorData):
        return {"resident": False, "reason": "streamed data is read by DataLoader workers (pinned memory)"}
    if setting is True or setting is False:
        return {"resident": bool(setting), "reason": f"data.on_device: {str(setting).lower()}"}
    if device.type != "cuda" or memory is None:
        return {"resident": False, "reason": f"auto: only on CUDA devices, not {device.type}"}
    fits = split.nbytes <= memory // 4
    return {
        "resident": fits,
        "reason": f"auto: the training split takes {split.nbytes / 2**20:.0f} MiB, "
        f"{'within' if fits else 'over'} a quarter of the GPU's {memory / 2**30:.0f} GiB",
    }


def _has_forward_hooks(model: nn.Module) -> bool:
    """Whether a FeatureTap (or any forward hook) listens to ``model`` or one of its modules."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _non_teacher_parameters(distiller: Distiller) -> list[nn.Parameter]:
    """Every parameter of the distiller reachable outside ``teachers.`` (shared ones included)."""
    return [p for name, p in distiller.named_parameters(remove_duplicate=False) if not name.startswith("teachers.")]

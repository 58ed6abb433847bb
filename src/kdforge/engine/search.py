"""KD-guided differentiable architecture search (``kdforge search``).

DARTS (Liu, Simonyan & Yang, ICLR 2019) with the search objective of KDAS-ReID (Algorithms 14(5):137,
2021): the supernet's weights and its architecture weights (alphas) are both trained on a
distillation loss from a frozen teacher whose temperature is annealed from high to 1, instead of on
cross-entropy. The cell space and the relaxation are :mod:`kdforge.models.darts`.

Procedure (first-order DARTS: the architecture gradient is taken at the current weights, without
the unrolled second-order term; this is the variant the DARTS paper reports as "first order", and
the one that fits a CPU):

1. the training split is divided, seeded, into a *weight* part and an *architecture* part
   (``search.arch_fraction`` of it);
2. every step takes one batch of each: an Adam step on the alphas with the architecture batch's
   loss, then an SGD step (cosine learning rate, gradient clipping) on the weights with the weight
   batch's loss;
3. the loss (``search.objective``) is ``ce`` (the task's supervised loss, DARTS), ``kd_fixed``
   (``T^2 KL(p_t^T || p_s^T)`` at ``search.temperature``) or ``kd_annealed`` (the same with
   ``T(e)`` from ``search.temperature_start`` down to 1 over the epochs, ``search.anneal`` linear,
   exponential or step); ``search.ce_weight`` adds the supervised loss to the KD objectives;
4. after every epoch the alphas (softmaxed, per edge), the epoch's genotype and the losses are
   appended to ``alpha_history.jsonl`` and the state is saved (``--resume`` continues from it);
5. at the end the discrete genotype (top-k edges per node, argmax operation per edge) is written to
   ``genotype.json`` and ``student.yaml`` (the ``student:`` entry of a training recipe: ``darts_net``
   with the genotype inline, at ``derived.channels`` and ``derived.layers``).

Works on any task whose supervised loss reads logits: classification, and retrieval (identity
logits; the supernet is ranked by its pooled features).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, ValidationError
from torch import nn

from kdforge.config import DataConfig, ModelConfig, Strict, apply_override, parse_override, read_yaml
from kdforge.core.allocator import tune_allocator
from kdforge.core.checkpoint import atomic_save, atomic_write_text
from kdforge.core.errors import ConfigError
from kdforge.core.schedules import as_schedule
from kdforge.core.validation import validation_message
from kdforge.data import make_loader
from kdforge.data.tasks import task_for
from kdforge.engine.build import build_augmentation, build_data, build_model
from kdforge.engine.trainer import evaluate_model
from kdforge.methods.losses import kd_loss
from kdforge.models.darts import PRIMITIVES, GenotypeNetwork, SearchNetwork, check_primitives

STATE = "search_state.pt"
HISTORY = "alpha_history.jsonl"


class SearchSettings(Strict):
    channels: int = Field(8, ge=1, description="supernet: channels of the first cells")
    layers: int = Field(3, ge=1, description="supernet: cells (reduction cells at 1/3 and 2/3)")
    steps: int = Field(3, ge=1, le=6, description="intermediate nodes per cell")
    primitives: list[str] = Field(default_factory=lambda: list(PRIMITIVES), description="candidate operations")
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(64, ge=2)
    max_batches: int | None = Field(None, ge=1, description="cap on the steps of an epoch")
    arch_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="share of train used for the alphas")
    objective: Literal["ce", "kd_fixed", "kd_annealed"] = "kd_annealed"
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="kd_fixed: the temperature")
    temperature_start: float = Field(10.0, ge=1.0, le=100.0, description="kd_annealed: T at the first epoch")
    anneal: Literal["linear", "exponential", "step"] = "exponential"
    ce_weight: float = Field(0.0, ge=0.0, description="kd objectives: weight of the supervised loss added")
    w_lr: float = Field(0.025, gt=0.0)
    w_lr_min: float = Field(0.001, ge=0.0)
    w_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    w_weight_decay: float = Field(3e-4, ge=0.0)
    grad_clip: float = Field(5.0, gt=0.0)
    alpha_lr: float = Field(3e-3, gt=0.0)
    alpha_weight_decay: float = Field(1e-3, ge=0.0)
    top_k: int = Field(2, ge=1, description="incoming edges kept per node")
    eval_samples: int = Field(1000, ge=10, description="architecture-split samples scored after each epoch")


class DerivedSettings(Strict):
    channels: int = Field(16, ge=1, description="the derived network's first-cell channels")
    layers: int = Field(5, ge=1, description="the derived network's cells")


class SearchRecipe(Strict):
    name: str = Field(..., min_length=1)
    seed: int = Field(0, ge=0, lt=2**32)
    data: DataConfig
    teacher: ModelConfig | None = Field(default=None, description="needed by the kd objectives")
    search: SearchSettings = Field(default_factory=SearchSettings)  # type: ignore[arg-type]
    derived: DerivedSettings = Field(default_factory=DerivedSettings)  # type: ignore[arg-type]


def load_search_recipe(path: str | Path, overrides: list[str] = ()) -> SearchRecipe:  # type: ignore[assignment]
    """Read a search recipe (YAML) with ``--set`` overrides, or raise a one-line ConfigError."""
    data = read_yaml(path)
    for text in overrides:
        apply_override(data, *parse_override(text))
    try:
        recipe = SearchRecipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, SearchRecipe)) from None
    check_primitives(recipe.search.primitives)
    if recipe.search.objective != "ce" and recipe.teacher is None:
        raise ConfigError(
            f"search.objective '{recipe.search.objective}' distils from a teacher; add 'teacher:' (a trained model "
            "file) or use objective: ce"
        )
    if recipe.teacher is not None and recipe.teacher.checkpoint is None and recipe.search.objective != "ce":
        raise ConfigError("teacher has no checkpoint: an untrained teacher teaches noise; set teacher.checkpoint")
    return recipe


def temperature_at(settings: SearchSettings, epoch: int) -> float:
    """The search temperature of ``epoch`` (0-based); 1 for the ce objective."""
    if settings.objective == "ce":
        return 1.0
    if settings.objective == "kd_fixed":
        return settings.temperature
    schedule = as_schedule({"kind": settings.anneal, "start": settings.temperature_start, "end": 1.0, "by": "epoch"})
    return schedule(epoch / max(settings.epochs - 1, 1))


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Search:
    """One search run in ``out_dir`` (see the module docstring)."""

    def __init__(self, recipe: SearchRecipe, out_dir: str | Path, resume: bool = False, log=print) -> None:
        self.recipe, self.out_dir, self.log = recipe, Path(out_dir), log
        s = recipe.search
        state_path = self.out_dir / STATE
        if resume and not state_path.is_file():
            raise ConfigError(f"nothing to resume in '{self.out_dir}': it has no {STATE}; drop --resume")
        if not resume and (state_path.is_file() or (self.out_dir / "genotype.json").is_file()):
            raise ConfigError(f"'{self.out_dir}' already holds a search; pass --resume or another --out")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.allocator = tune_allocator("auto", "cpu")  # the search runs on the CPU (core/allocator.py)
        torch.manual_seed(recipe.seed)
        splits = build_data(recipe.data)
        self.info = splits.info
        self.task = task_for(self.info)
        self.augmentation = build_augmentation(recipe.data, self.info)
        generator = torch.Generator().manual_seed(recipe.seed)
        order = torch.randperm(len(splits.train), generator=generator)
        arch_count = int(round(len(order) * s.arch_fraction))
        if arch_count < s.batch_size or len(order) - arch_count < s.batch_size:
            raise ConfigError(
                f"search: {len(order)} training samples split {len(order) - arch_count}/{arch_count} leave no batch "
                f"of {s.batch_size} on one side; lower search.batch_size or change search.arch_fraction"
            )
        self.weight_split = splits.train.select(order[arch_count:].sort().values, name="search-weights")
        self.arch_split = splits.train.select(order[:arch_count].sort().values, name="search-arch")
        self.teacher: nn.Module | None = None
        if s.objective != "ce" and recipe.teacher is not None:
            teacher, _ = build_model(recipe.teacher, self.info, "teacher")
            self.teacher = teacher.eval().requires_grad_(False)
        self.model = SearchNetwork(
            self.info.num_classes, self.info.in_channels, s.channels, s.layers, s.steps, s.primitives
        )
        self.w_opt = torch.optim.SGD(
            self.model.weight_parameters(), lr=s.w_lr, momentum=s.w_momentum, weight_decay=s.w_weight_decay
        )
        self.a_opt = torch.optim.Adam(
            self.model.arch_parameters(), lr=s.alpha_lr, betas=(0.5, 0.999), weight_decay=s.alpha_weight_decay
        )
        self.lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.w_opt, s.epochs, eta_min=s.w_lr_min)
        self.start_epoch = 0
        self.seconds = 0.0
        if resume:
            state = torch.load(state_path, map_location="cpu", weights_only=False)
            self.model.load_state_dict(state["model"])
            self.w_opt.load_state_dict(state["w_opt"])
            self.a_opt.load_state_dict(state["a_opt"])
            self.lr_schedule.load_state_dict(state["lr_schedule"])
            torch.set_rng_state(state["rng"])
            self.start_epoch = int(state["epoch"])
            self.seconds = float(state.get("seconds", 0.0))
            self._trim_history(self.start_epoch)
        atomic_write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), self.out_dir / "search.yaml")

    # ------------------------------------------------------------------ loop
    def loss(self, logits: torch.Tensor, batch: Any, temperature: float) -> torch.Tensor:
        s = self.recipe.search
        if s.objective == "ce" or self.teacher is None:
            return self.task.supervised_loss(logits, batch.targets)
        with torch.no_grad():
            teacher_logits = self.teacher(batch.image).float()
        loss = kd_loss(logits, teacher_logits, temperature)
        if s.ce_weight:
            loss = loss + s.ce_weight * self.task.supervised_loss(logits, batch.targets)
        return loss

    def _loader(self, split: Any, seed: int) -> Any:
        s = self.recipe.search
        sampler = self.recipe.data.sampler
        return make_loader(
            split,
            s.batch_size,
            shuffle=True,
            drop_last=True,
            seed=seed,
            augmentation=self.augmentation,
            train=True,
            sampler=sampler.model_dump() if sampler is not None else None,
        )

    def run(self) -> dict[str, Any]:
        s = self.recipe.search
        weights_loader = self._loader(self.weight_split, self.recipe.seed)
        arch_loader = self._loader(self.arch_split, self.recipe.seed + 1)
        for epoch in range(self.start_epoch, s.epochs):
            started = time.perf_counter()
            temperature = temperature_at(s, epoch)
            weights_loader.set_epoch(epoch)
            arch_loader.set_epoch(epoch)
            self.model.train()
            sums, count = [0.0, 0.0], 0
            for index, (w_batch, a_batch) in enumerate(zip(weights_loader, arch_loader)):
                if s.max_batches is not None and index >= s.max_batches:
                    break
                # architecture step (first order: at the current weights)
                self.a_opt.zero_grad(set_to_none=True)
                arch_loss = self.loss(self.model(a_batch.image), a_batch, temperature)
                arch_loss.backward()
                self.a_opt.step()
                # weight step
                self.w_opt.zero_grad(set_to_none=True)
                weight_loss = self.loss(self.model(w_batch.image), w_batch, temperature)
                weight_loss.backward()
                nn.utils.clip_grad_norm_(self.model.weight_parameters(), s.grad_clip)
                self.w_opt.step()
                sums[0] += float(weight_loss.detach())
                sums[1] += float(arch_loss.detach())
                count += 1
            self.lr_schedule.step()
            self.seconds += time.perf_counter() - started
            metrics = self._score()
            normal, reduce = self.model.edge_weights()
            genotype = self.model.derive(s.top_k)
            record = {
                "epoch": epoch,
                "temperature": temperature,
                "loss_weights": sums[0] / max(count, 1),
                "loss_arch": sums[1] / max(count, 1),
                "arch_split": metrics,
                "alphas_normal": [[round(float(v), 5) for v in row] for row in normal.detach()],
                "alphas_reduce": [[round(float(v), 5) for v in row] for row in reduce.detach()],
                "genotype": genotype,
            }
            self._save_state(epoch + 1)
            with open(self.out_dir / HISTORY, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            shown = self.task.describe(metrics)
            self.log(
                f"[{self.recipe.name}] search epoch {epoch + 1}/{s.epochs} T {temperature:.2f} "
                f"loss {record['loss_weights']:.4f} (arch {record['loss_arch']:.4f}) {shown} "
                f"normal {' '.join(op for op, _ in genotype['normal'])}"
            )
        return self._finish()

    @torch.no_grad()
    def _score(self) -> dict[str, float]:
        s = self.recipe.search
        split = self.arch_split.select(torch.arange(min(s.eval_samples, len(self.arch_split))))
        return evaluate_model(self.model, split, batch_size=256, augmentation=self.augmentation, task=self.task)

    def _save_state(self, next_epoch: int) -> None:
        atomic_save(
            {
                "epoch": next_epoch,
                "model": self.model.state_dict(),
                "w_opt": self.w_opt.state_dict(),
                "a_opt": self.a_opt.state_dict(),
                "lr_schedule": self.lr_schedule.state_dict(),
                "rng": torch.get_rng_state(),
                "seconds": self.seconds,
            },
            self.out_dir / STATE,
        )

    def _trim_history(self, epochs_done: int) -> None:
        path = self.out_dir / HISTORY
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["epoch"] < epochs_done]
            atomic_write_text("".join(line + "\n" for line in kept), path)

    def _finish(self) -> dict[str, Any]:
        s, d = self.recipe.search, self.recipe.derived
        genotype = self.model.derive(s.top_k)
        atomic_write_text(json.dumps(genotype, indent=1) + "\n", self.out_dir / "genotype.json")
        student = {"name": "darts_net", "kwargs": {"genotype": genotype, "channels": d.channels, "layers": d.layers}}
        atomic_write_text(yaml.safe_dump({"student": student}, sort_keys=False), self.out_dir / "student.yaml")
        derived = GenotypeNetwork(genotype, self.info.num_classes, self.info.in_channels, d.channels, d.layers)
        summary = {
            "name": self.recipe.name,
            "status": "finished",
            "dataset": self.info.name,
            "task": self.task.name,
            "objective": s.objective,
            "temperatures": [temperature_at(s, e) for e in range(s.epochs)],
            "epochs": s.epochs,
            "search_seconds": self.seconds,
            "supernet_parameters": _parameters(self.model) - sum(p.numel() for p in self.model.arch_parameters()),
            "derived_parameters": _parameters(derived),
            "teacher_parameters": _parameters(self.teacher) if self.teacher is not None else None,
            "genotype": genotype,
            "arch_split": self._score(),
            "first_order": True,
            "allocator": self.allocator,
        }
        atomic_write_text(json.dumps(summary, indent=1) + "\n", self.out_dir / "search_summary.json")
        self.log(
            f"[{self.recipe.name}] genotype written to {self.out_dir / 'genotype.json'}; derived darts_net "
            f"({d.channels} channels, {d.layers} cells): {summary['derived_parameters']:,} parameters; train it with "
            f"the student entry in {self.out_dir / 'student.yaml'}"
        )
        return summary


def run_search(
    recipe: SearchRecipe, out_dir: str | Path | None = None, resume: bool = False, log=print
) -> dict[str, Any]:
    """Search, write genotype.json / student.yaml / alpha_history.jsonl / search_summary.json in
    ``out_dir`` (default ``runs/search/<name>``) and return the summary."""
    out = Path(out_dir) if out_dir is not None else Path("runs") / "search" / recipe.name
    return Search(recipe, out, resume=resume, log=log).run()


__all__ = ["SearchRecipe", "SearchSettings", "load_search_recipe", "run_search", "temperature_at"]

"""Drawing samples from a trained conditional GAN and processing them with a teacher (recipe ``kind: generate``).

cGAN-KD's middle step (Ding et al. 2023, arXiv 2104.03164): generate ``samples`` images (classes in
equal numbers, or label values uniform over the training range), drop the unrealistic ones by
subsampling, drop those the teacher disagrees with by a loss quantile, relabel the rest with the
teacher (:mod:`kdforge.generative.processing` says how and what is simplified). The run directory::

    config.yaml     the resolved recipe
    generated.pt    the kept samples: uint8 images, labels, targets (a student's ``data.generated``)
    summary.json    counts generated / dropped by subsampling / dropped by the filter / kept, labels
                    changed by relabelling, kept samples per class
    kept.png, dropped_subsampling.png, dropped_filter.png   sample grids

A student then trains on real + kept samples with ``data.generated: <this run directory>``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, ValidationError

from kdforge.config import ConfigError, DataConfig, ModelConfig, Strict
from kdforge.core.checkpoint import atomic_save, atomic_write_text
from kdforge.core.plugins import import_all
from kdforge.core.runlock import RunLock
from kdforge.core.storage import ensure_writable_dir
from kdforge.core.validation import validation_message
from kdforge.data.generated import GENERATED_FORMAT
from kdforge.engine.build import build_data, build_model
from kdforge.engine.gan import normalized_inputs, read_generator
from kdforge.engine.record import run_record
from kdforge.generative.images import write_grid
from kdforge.generative.processing import (
    batched,
    fit_density_ratio,
    penultimate_features,
    quantile_filter,
    rejection_sample,
    soft_labels,
    teacher_labels,
    teacher_losses,
)


class SubsampleConfig(Strict):
    method: Literal["density_ratio", "confidence", "none"] = Field(
        "density_ratio",
        description="density_ratio: a real-vs-generated classifier in a feature space, then rejection sampling "
        "(simplified cDR-RS); confidence: the teacher's probability of the conditioning class instead (cheaper, "
        "classification only); none: keep every sample",
    )
    feature_model: str | None = Field(
        None, description="model file whose penultimate features the density ratio is fitted in (default: the teacher)"
    )
    real_samples: int = Field(5000, ge=10, description="real training images the density ratio is fitted on (at most)")
    epochs: int = Field(300, ge=1, description="full-batch steps fitting the density-ratio classifier")


class FilterConfig(Strict):
    quantile: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="drop samples whose teacher loss exceeds this quantile of their class (default: 0.9 for "
        "classification, 0.7 for regression, the paper's values); 1.0 keeps all",
    )


class GenerateConfig(Strict):
    kind: Literal["generate"] = Field("generate", description="this recipe draws and processes GAN samples")
    name: str = Field("generate", min_length=1, max_length=120, description="run label")
    imports: list[str] = Field(default_factory=list, description="modules or .py files imported first")
    seed: int = Field(0, ge=0, lt=2**32, description="fixes the latent vectors and the rejection draws")
    generator: str = Field(..., description="a GAN run directory (kind: gan) or its checkpoints/generator.pt")
    teacher: ModelConfig = Field(..., description="the teacher that filters and relabels (a model file)")
    data: DataConfig | None = Field(None, description="real data for the density ratio (default: the GAN's own)")
    samples: int = Field(10000, ge=1, description="images generated before processing (classes in equal numbers)")
    subsample: SubsampleConfig = Field(
        default_factory=lambda: SubsampleConfig.model_validate({}), description="drop unrealistic samples"
    )
    filter: FilterConfig = Field(
        default_factory=lambda: FilterConfig.model_validate({}), description="drop samples the teacher disagrees with"
    )
    relabel: bool | Literal["hard", "soft"] = Field(
        True,
        description="replace each kept sample's label by the teacher's: true or hard: its arg-max class (or its value "
        "for regression); soft: its softened class probabilities softmax(logits / relabel_temperature) as the "
        "target (classification; the student's cross-entropy takes them as soft labels); false: keep the "
        "conditioning label",
    )
    relabel_temperature: float = Field(
        1.0, gt=0.0, description="temperature of soft relabelling (above 1 softens the teacher's probabilities)"
    )
    batch_size: int = Field(256, ge=1, description="images per generator / teacher forward")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def build_generate_config(data: dict[str, Any]) -> GenerateConfig:
    import_all(data.get("imports"))
    try:
        return GenerateConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, GenerateConfig)) from None


def generate_run(config: GenerateConfig, out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Generate, process and save; returns the summary (also written to summary.json)."""
    out = Path(out_dir)
    ensure_writable_dir(out)
    with RunLock(out):
        summary_path = out / "summary.json"
        if summary_path.exists() and not resume and _status(summary_path) == "finished":
            # an unfinished (failed, interrupted) generation is simply done again: it is deterministic
            raise ConfigError(f"run directory '{out}' already holds a run; pass --resume or choose another --out")
        atomic_write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), out / "config.yaml")
        started = time.perf_counter()
        try:
            summary = _generate(config, out)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            failed = {"name": config.name, "kind": "generate", "status": "failed", "error": first[:500]}
            atomic_write_text(json.dumps(failed, indent=2) + "\n", summary_path)
            raise
        summary["wall_seconds"] = time.perf_counter() - started
        atomic_write_text(json.dumps(summary, indent=2) + "\n", summary_path)
        return summary


def _status(summary_path: Path) -> str | None:
    try:
        return json.loads(summary_path.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _generate(config: GenerateConfig, out: Path) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    generator = read_generator(config.generator)
    data_config = config.data or DataConfig.model_validate({**generator.data, "augment": False})
    splits = build_data(data_config)
    info = splits.info
    classification = not generator.continuous
    if config.relabel == "soft" and not classification:
        raise ConfigError(
            "relabel: soft needs class labels (the teacher's probabilities); use relabel: true for regression"
        )
    if classification and info.task != "classification":
        raise ConfigError(f"the generator makes class-conditional samples but '{info.name}' is a {info.task} dataset")
    teacher, _ = build_model(config.teacher, info, "teacher")
    teacher.eval()
    draws = torch.Generator().manual_seed(config.seed)

    if classification:
        classes = info.num_classes
        conditioning = torch.arange(classes).repeat_interleave((config.samples + classes - 1) // classes)
        conditioning = conditioning[: config.samples]
        unit_labels = conditioning
    else:
        unit_labels = torch.rand(config.samples, generator=draws)
        conditioning = generator.from_unit(unit_labels)

    def say(text: str) -> None:
        print(f"[{config.name}] {text}", file=sys.stderr)

    say(f"generating {config.samples} samples")
    images = generator.generate(unit_labels, draws, config.batch_size)
    inputs = normalized_inputs(images, info)
    outputs = batched(teacher, inputs, config.batch_size).float()

    # 1. subsampling
    groups = conditioning if classification else None
    method = config.subsample.method
    if method == "density_ratio":
        say("fitting the density ratio")
        feature_net = teacher
        if config.subsample.feature_model:
            feature_net, _ = build_model(
                ModelConfig.model_validate({"checkpoint": config.subsample.feature_model}),
                info,
                "subsample.feature_model",
            )
        real_count = min(config.subsample.real_samples, len(splits.train))
        picks = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(config.seed))[:real_count]
        real_images = splits.train.images[picks]
        real_targets = getattr(splits.train, "targets", splits.train.labels)[picks]
        real_labels = (
            real_targets if classification else generator.to_unit(real_targets.float().reshape(real_count, -1)[:, 0])
        )
        real_features = penultimate_features(feature_net, normalized_inputs(real_images, info))
        fake_features = penultimate_features(feature_net, inputs)
        ratio = fit_density_ratio(
            real_features,
            real_labels,
            fake_features,
            unit_labels,
            info.num_classes if classification else None,
            epochs=config.subsample.epochs,
            seed=config.seed,
        )
        subsampled = rejection_sample(ratio(fake_features, unit_labels), groups, generator=draws)
    elif method == "confidence":
        if not classification:
            raise ConfigError(
                "subsample.method: confidence needs class labels; use density_ratio or none for regression"
            )
        confidence = outputs.softmax(dim=1).gather(1, conditioning.view(-1, 1)).squeeze(1)
        subsampled = rejection_sample(confidence, groups, generator=draws)
    else:
        subsampled = torch.ones(config.samples, dtype=torch.bool)

    # 2. filtering by the teacher's loss against the conditioning label
    quantile = config.filter.quantile if config.filter.quantile is not None else (0.9 if classification else 0.7)
    losses = teacher_losses(outputs, conditioning, classification)
    passed = torch.zeros(config.samples, dtype=torch.bool)
    if bool(subsampled.any()):
        survivors = subsampled.nonzero().squeeze(1)
        kept_groups = groups[survivors] if groups is not None else None
        passed[survivors] = quantile_filter(losses[survivors], quantile, kept_groups)
    kept = subsampled & passed

    # 3. relabelling
    relabel = "hard" if config.relabel is True else (config.relabel or "none")
    predicted = teacher_labels(outputs, classification)
    final = conditioning if relabel == "none" else predicted
    kept_index = kept.nonzero().squeeze(1)
    if classification:
        labels = final[kept_index].long()
        targets = labels
        if relabel == "soft":  # the teacher's softened probabilities; labels stay its arg-max (class counts)
            targets = soft_labels(outputs[kept_index], config.relabel_temperature)
        changed = int((predicted[kept_index] != conditioning[kept_index]).sum())
    else:
        targets = final[kept_index].float()
        labels = torch.zeros(len(kept_index), dtype=torch.int64)  # no class: one group for stratification
        scale = float(info.target_scale or 1.0)
        changed_error = (
            float((predicted[kept_index] - conditioning[kept_index]).abs().mean()) * scale if len(kept_index) else 0.0
        )

    record = {
        "format": GENERATED_FORMAT,
        "version": 1,
        "dataset": json.loads(json.dumps(dataclasses.asdict(info))),
        "images": images[kept_index].clone(),
        "labels": labels.clone(),
        "targets": targets.clone(),
        "conditioning": conditioning[kept_index].clone(),
        "relabelled": relabel != "none",
        "relabelling": relabel,
    }
    atomic_save(record, out / "generated.pt")
    columns = 10
    for name, mask in (
        ("kept", kept),
        ("dropped_subsampling", ~subsampled),
        ("dropped_filter", subsampled & ~passed),
    ):
        chosen = _grid_order(mask, conditioning if classification else unit_labels, classification)
        if len(chosen):
            write_grid(images[chosen], out / f"{name}.png", columns)

    counts = {
        "generated": int(config.samples),
        "dropped_by_subsampling": int((~subsampled).sum()),
        "dropped_by_filter": int((subsampled & ~passed).sum()),
        "kept": int(kept.sum()),
    }
    summary: dict[str, Any] = {
        "name": config.name,
        "kind": "generate",
        "status": "finished",
        "method": "generate",
        "processing": f"subsample {method}, filter quantile {quantile}, relabel {relabel}"
        + (f" (T {config.relabel_temperature:g})" if relabel == "soft" else ""),
        "dataset": info.name,
        "seed": config.seed,
        "counts": counts,
        "subsample": method,
        "filter_quantile": quantile,
        "relabel": config.relabel,
    }
    if classification:
        summary["labels_changed_by_relabelling"] = changed
        summary["kept_per_class"] = torch.bincount(conditioning[kept_index], minlength=info.num_classes).tolist()
        summary["teacher_agreement_before_processing"] = 100.0 * float((predicted == conditioning).float().mean())
    else:
        summary["mean_relabelling_shift"] = changed_error
        summary["teacher_mae_before_processing"] = float(losses.mean()) * float(info.target_scale or 1.0)
    summary["record"] = run_record(torch.device("cpu"), config.seed)
    say(
        f"kept {counts['kept']} of {counts['generated']} (subsampling dropped {counts['dropped_by_subsampling']}, "
        f"filter dropped {counts['dropped_by_filter']})"
    )
    return summary


def _grid_order(mask: torch.Tensor, labels: torch.Tensor, classification: bool, rows: int = 10) -> torch.Tensor:
    """Up to ``rows`` x 10 sample positions for a grid: a row per class when there are classes."""
    positions = mask.nonzero().squeeze(1)
    if not classification:
        ordered = positions[labels[positions].argsort()]
        step = max(len(ordered) // (rows * 10), 1)
        return ordered[::step][: rows * 10]
    chosen = []
    for value in torch.unique(labels[positions])[:rows]:
        chosen.append(positions[labels[positions] == value][:10])
    return torch.cat(chosen) if chosen else positions[:0]

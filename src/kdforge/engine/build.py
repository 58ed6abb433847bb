"""Turn a validated RunConfig into data, networks and a Distiller (the wiring, nothing else)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from kdforge.compress.arch import materialize
from kdforge.config import AugmentConfig, DataConfig, ModelConfig, RunConfig
from kdforge.core.checkpoint import read_model_file
from kdforge.core.errors import CheckpointError, ConfigError, DataError, closest
from kdforge.core.plugins import require_registered
from kdforge.data import (
    Augmentation,
    DatasetInfo,
    DataSplits,
    StreamData,
    TensorData,
    default_augmentation,
    load_dataset,
)
from kdforge.data.sources.common import MissingDataError
from kdforge.data.tasks import task_for
from kdforge.methods import METHODS, Distiller
from kdforge.models import MODELS, create
from kdforge.models.specs import attach, same_spec
from kdforge.models.specs import rebuild as rebuild_spec


@dataclass
class ModelSpec:
    """What rebuilds a network: zoo name or model spec, and constructor arguments."""

    name: str
    kwargs: dict[str, Any]
    num_classes: int
    in_channels: int
    input_size: tuple[int, int]
    architecture: list[dict[str, Any]] = field(default_factory=list)  # LMA/pruning/QAT steps (kdforge.compress.arch)


def build_data(cfg: DataConfig) -> DataSplits:
    splits = _load_data(cfg)
    if cfg.generated:  # generated samples join the training split only (cGAN-KD)
        from kdforge.data.generated import add_generated

        splits = add_generated(splits, cfg.generated)
    return splits


def _load_data(cfg: DataConfig) -> DataSplits:
    return load_dataset(
        cfg.name,
        root=cfg.root,
        download=cfg.download,
        val_fraction=cfg.val_fraction,
        train_subset=cfg.train_subset,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        **cfg.options,
    )


def model_input_shape(info: DatasetInfo) -> tuple[int, ...]:
    """One sample's shape as networks see it: (C, H, W), or (C, D, H, W) for volumes."""
    return tuple(info.sample_shape) if len(info.sample_shape) == 4 else (info.in_channels, *info.image_size)


def _input_name_error(role: str, name: str, info: DatasetInfo) -> ConfigError:
    inputs = info.input_names
    return ConfigError(
        f"{role}.input '{name}' is not an input of dataset '{info.name}'{closest(name, inputs)}; "
        f"its inputs: {', '.join(inputs)}"
    )


def student_view(splits: DataSplits, config: RunConfig) -> DataSplits:
    """The data as the student reads it: its ``input`` becomes the primary one (``Batch.image``),
    so evaluation, export and the model's input shape follow the student's input."""
    name = config.student.input
    if name is None or name == splits.info.input_name:
        return splits
    if name not in splits.info.input_names:
        raise _input_name_error("student", name, splits.info)
    return splits.view(name)


def input_augmentations(cfg: DataConfig, info: DatasetInfo) -> dict[str, Augmentation]:
    """The augmentation of every other input of paired data, by name (each with its own statistics)."""
    return {name: build_augmentation(cfg, extra) for name, extra in info.extra_inputs.items()}


#: regression target units that mark an angle (``DatasetInfo.target_unit``): flips would corrupt them
ANGLE_UNITS = frozenset({"°", "deg", "degree", "degrees", "rad", "radian", "radians"})


def build_augmentation(cfg: DataConfig, info: DatasetInfo) -> Augmentation:
    if cfg.augment is True:
        return default_augmentation(info)
    settings = cfg.augment if isinstance(cfg.augment, AugmentConfig) else AugmentConfig()
    if (settings.crop_padding or settings.horizontal_flip) and len(info.sample_shape) == 1:
        raise ConfigError(
            f"data.augment crops or flips images, but '{info.name}' holds rows of {info.sample_shape[0]} "
            "features; set data.augment: false (tabular data is standardised, never augmented)"
        )
    if (settings.crop_padding or settings.horizontal_flip) and info.task == "segmentation":
        raise ConfigError(
            f"data.augment crops or flips the images of '{info.name}' but not their per-pixel labels; set "
            "data.augment: false (or true: normalisation only) for segmentation"
        )
    if settings.horizontal_flip and info.task == "regression" and info.target_unit.strip().lower() in ANGLE_UNITS:
        raise ConfigError(
            f"data.augment.horizontal_flip mirrors the images of '{info.name}' but not their angle targets "
            "(a flip turns an angle a into -a); set horizontal_flip: false (crops keep the angle)"
        )
    return Augmentation(
        crop_padding=settings.crop_padding,
        horizontal_flip=settings.horizontal_flip,
        mean=info.mean,
        std=info.std,
    )


def recorded_data_config(
    record: dict[str, Any], checkpoint: str | Path, data: str | None = None, root: str | None = None
) -> DataConfig:
    """The data settings to evaluate (or calibrate) a model file on: ``data``/``root`` when given,
    otherwise what its run used (the model file's ``data`` entry, else the run's config.yaml):
    dataset name, root, options and workers; never the run's subset or validation carve."""
    dataset = data or (record.get("dataset") or {}).get("name")
    if not dataset:
        raise ConfigError(f"'{checkpoint}' does not say its dataset; pass --data NAME")
    recorded = record.get("data")
    if not isinstance(recorded, dict):
        saved = Path(checkpoint).parent.parent / "config.yaml"  # runs/<run>/checkpoints/<file>
        try:
            recorded = (yaml.safe_load(saved.read_text()) or {}).get("data") if saved.is_file() else None
        except (OSError, yaml.YAMLError, AttributeError):
            recorded = None
    if not isinstance(recorded, dict) or recorded.get("name") != dataset:
        recorded = {}
    options: dict[str, Any] = recorded["options"] if isinstance(recorded.get("options"), dict) else {}
    return DataConfig(
        name=dataset,
        root=root if root is not None else recorded.get("root"),
        options=options,
        num_workers=int(recorded.get("num_workers") or 0),
        augment=False,
        val_fraction=0.0,
        train_subset=None,
        seed=0,
    )


def build_command_data(cfg: DataConfig, record: dict[str, Any] | None = None) -> DataSplits:
    """``build_data`` for eval/export: missing files point at ``--root``, not at a recipe key. A
    model file of paired data (``record``) is served the input it was trained on."""
    try:
        splits = build_data(cfg)
    except MissingDataError as error:
        raise DataError(
            f"{error.dataset}: {error.where}; pass --root FOLDER (the folder holding the dataset's files)"
        ) from None
    saved = (record or {}).get("dataset") or {}
    name = saved.get("input_name")
    if saved.get("name") == splits.info.name and name in splits.info.input_names:
        splits = splits.view(name)
    return splits


def recorded_augmentation(record: dict[str, Any], cfg: DataConfig, info: DatasetInfo) -> Augmentation:
    """Test-time normalisation with the statistics recorded in the model file (fitted on its run's
    training split), falling back to the dataset's own."""
    saved = record.get("dataset") or {}
    mean, std = saved.get("mean"), saved.get("std")
    if saved.get("name") == info.name and mean and std and len(mean) == len(info.mean) == len(std):
        return Augmentation(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))
    return build_augmentation(cfg, info)


def build_model(cfg: ModelConfig, info: DatasetInfo, role: str) -> tuple[nn.Module, ModelSpec]:
    """Create a network (zoo name or model spec), loading ``cfg.checkpoint`` when given, with checks
    that name the fix."""
    record = read_model_file(cfg.checkpoint) if cfg.checkpoint else None
    saved = (record or {}).get("model", {})
    name = cfg.name or saved.get("name")
    if name is None:
        raise CheckpointError(
            f"{role} checkpoint '{cfg.checkpoint}' is a plain state dict; give the architecture as {role}.name"
        )
    if saved.get("name") and cfg.name and not same_spec(saved["name"], cfg.name):
        raise CheckpointError(
            f"{role} checkpoint '{cfg.checkpoint}' holds a '{saved['name']}' but the recipe says "
            f"'{cfg.name}'; fix {role}.name or drop it to use the checkpoint's architecture"
        )
    if saved.get("num_classes") not in (None, info.num_classes):
        raise CheckpointError(
            f"{role} checkpoint '{cfg.checkpoint}' predicts {saved['num_classes']} classes but dataset "
            f"'{info.name}' has {info.num_classes}; use a {role} trained on this dataset"
        )
    if saved.get("in_channels") not in (None, info.in_channels):
        raise CheckpointError(
            f"{role} checkpoint '{cfg.checkpoint}' takes {saved['in_channels']}-channel input but dataset "
            f"'{info.name}' has {info.in_channels}"
        )
    kwargs = {**saved.get("kwargs", {}), **cfg.kwargs}
    spec = ModelSpec(name, kwargs, info.num_classes, info.in_channels, tuple(info.image_size))
    size = (int(info.image_size[0]), int(info.image_size[1]))
    # a model file of the user's code or of Hugging Face rebuilds from what it records
    rebuilt = (
        rebuild_spec(
            saved, record, str(cfg.checkpoint), info.num_classes, info.in_channels, size, kwargs, cfg.name is not None
        )
        if record is not None
        else None
    )
    if rebuilt is None and record is not None:
        require_registered(MODELS, name, record, str(cfg.checkpoint))
    model = rebuilt or create(
        name, num_classes=info.num_classes, in_channels=info.in_channels, input_size=size, **kwargs
    )
    # materialize loads the weights; LMA, pruned and QAT networks too
    shape = (info.in_channels, *info.image_size)
    model, spec.architecture = materialize(model, record, cfg, shape, str(cfg.checkpoint))
    return model, spec


def _check_label_mask(config: RunConfig, method_cls: Any, train: TensorData | StreamData | None) -> None:
    """Unlabelled training samples need a method that masks its supervised term."""
    mask = getattr(train, "extras", {}).get("labelled")
    if mask is not None and not bool(mask.all()) and not getattr(method_cls, "uses_label_mask", False):
        raise ConfigError(
            f"the training split holds {int((~mask).sum())} unlabelled samples (data.options."
            f"unlabelled_per_class), which method '{config.method.name}' would train on with their labels; "
            "use modality_kd or kd (they mask the CE term), or set unlabelled_per_class: 0"
        )


def build_distiller(
    config: RunConfig, info: DatasetInfo, train: TensorData | StreamData | None = None
) -> tuple[Distiller, ModelSpec]:
    """The method with its networks. Methods that size modules from the data declare keywords:
    ``input_shape`` (C, H, W) for feature adapters, ``num_samples`` (training-set size) and
    ``train_labels`` for memory banks, ``normalization`` (per-channel mean, std of the batches) for
    adversarial methods, whose epsilon is in [0, 1] pixel units, ``train_data`` (the training
    TensorData) for methods that look at the images before training (NoNN's filter partition).
    """
    method_cls: type[Distiller] = METHODS.get(config.method.name)  # type: ignore[assignment]
    try:  # before any network is built: a classification-only method on regression data fails at once
        method_cls.check_task(info.task, f"dataset '{info.name}'")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    student, spec = build_model(config.student, info, "student")
    attach(student, kdforge_input=info.input_name)
    teachers = []
    for i, t in enumerate(config.teachers):
        name = t.input or info.input_name  # a teacher reads the student's input unless told otherwise
        if name not in info.input_names:
            raise _input_name_error(f"teachers.{i}", name, info)
        if name != info.input_name and not getattr(method_cls, "cross_modal", False):
            raise ConfigError(
                f"method '{config.method.name}' runs every network on one input, but teachers.{i} reads "
                f"'{name}' and the student '{info.input_name}'; use a cross-modal method (kd, modality_kd, "
                "crd, ccl) or give both the same input"
            )
        teacher = build_model(t, info.for_input(name), f"teachers.{i}")[0]
        attach(teacher, kdforge_input=name)
        teachers.append(teacher)
    _check_label_mask(config, method_cls, train)
    accepted = inspect.signature(method_cls.__init__).parameters
    offered: dict[str, Any] = {
        "input_shape": model_input_shape(info),
        "num_samples": len(train) if train is not None else None,
        "train_labels": train.labels if train is not None else None,
        "train_data": train,  # NoNN partitions the teacher's filters on the training images
        "normalization": (tuple(info.mean), tuple(info.std)),  # attacks work in pixel units
    }
    extra = {k: v for k, v in offered.items() if k in accepted and v is not None}
    try:
        distiller = method_cls(student, teachers, config.method.params(), **extra)
        distiller.use_task(task_for(info))
    except ValueError as exc:  # the method's own checks already name it and the fix
        raise ConfigError(str(exc)) from None
    return distiller, spec

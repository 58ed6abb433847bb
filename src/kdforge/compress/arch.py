"""Architectures that differ from the zoo constructor: how model files describe and rebuild them.

A model file names a zoo network and its constructor arguments. A compressed network (ReLUs
swapped for LMA, filters physically pruned, fake-quantized layers) no longer matches that
constructor, so its file also carries ``model.architecture``: the ordered list of steps that turn
the freshly built zoo network into it::

    {"op": "lma", "k": 8, "momentum": 0.99}                      # every nn.ReLU -> LMA(k)
    {"op": "resize", "modules": {"stage1.0.conv1": {"in_channels": 16, "out_channels": 8,
                                                     "groups": 1}, "stage1.0.bn1": {...}}}
    {"op": "sparse", "sparsity": 0.5, "scope": "layer"}          # zeros of conv/linear weights stay zero
    {"op": "qat", "weight_bits": 8, "activation_bits": 8}          # fake-quantized conv/linear layers

``rebuild`` replays the structural steps before the weights load; ``after_load`` installs what
needs the weights (the masks of a ``sparse`` step). ``materialize`` does both and then applies a
recipe's own ``lma`` / ``prune`` / ``qat`` switches, returning the extended step list that the
trainer writes into the run's model files. ``load_model_file`` is the one-call loader used by
``kdforge eval``, ``kdforge export`` and ``kdforge profile``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from kdforge.compress.lma import lma_student
from kdforge.compress.prune import keep_masks, magnitude_prune, prune_filters, resize_module, zero_masks
from kdforge.compress.quantize import prepare_qat
from kdforge.core.checkpoint import load_weights, read_model_file
from kdforge.core.errors import CheckpointError, ConfigError
from kdforge.models import create

STRUCTURAL = ("lma", "resize", "qat")
KNOWN = (*STRUCTURAL, "sparse")


def _check(ops: Any, source: str) -> list[dict[str, Any]]:
    if ops is None:
        return []
    if not isinstance(ops, list) or not all(isinstance(op, dict) and op.get("op") in KNOWN for op in ops):
        raise CheckpointError(
            f"'{source}': model.architecture must be a list of steps with op in {', '.join(KNOWN)}; "
            "the file was written by a newer or a modified kdforge"
        )
    return [dict(op) for op in ops]


def rebuild(model: nn.Module, ops: Sequence[dict[str, Any]] | None, source: str = "model file") -> nn.Module:
    """Apply the structural steps (``lma``, ``resize``, ``qat``) to a freshly built zoo model, in place."""
    modules = None
    for op in _check(list(ops) if ops is not None else None, source):
        kind = op["op"]
        if kind == "lma":
            lma_student(model, k=int(op.get("k", 8)), momentum=float(op.get("momentum", 0.99)))
        elif kind == "resize":
            modules = dict(model.named_modules())
            for name, shape in (op.get("modules") or {}).items():
                if name not in modules:
                    raise CheckpointError(f"'{source}': pruned module '{name}' does not exist in the rebuilt network")
                resize_module(modules[name], shape, name)
        elif kind == "qat":
            prepare_qat(model, int(op.get("weight_bits", 8)), int(op.get("activation_bits", 8)))
    return model


def after_load(model: nn.Module, ops: Sequence[dict[str, Any]] | None) -> None:
    """Steps that need the loaded weights: hold the zeros of a ``sparse`` step during training."""
    if any(op.get("op") == "sparse" for op in ops or ()):
        keep_masks(model, zero_masks(model))


def transform(
    model: nn.Module,
    input_shape: Sequence[int],
    lma: Any = None,
    prune: Any = None,
    qat: Any = None,
) -> list[dict[str, Any]]:
    """Apply a recipe's compression switches in place (LMA swap, then pruning, then fake quantization).

    Arguments are the recipe sections (pydantic models or dicts, None when absent). Returns the
    steps to append to the model file's ``architecture``.
    """

    def plain(section: Any) -> dict[str, Any]:
        return section.model_dump() if hasattr(section, "model_dump") else dict(section)

    steps: list[dict[str, Any]] = []
    if lma is not None:
        settings = plain(lma)
        lma_student(model, k=int(settings.get("k", 8)), momentum=float(settings.get("momentum", 0.99)))
        steps.append({"op": "lma", "k": int(settings.get("k", 8)), "momentum": float(settings.get("momentum", 0.99))})
    if prune is not None:
        settings = plain(prune)
        amount = float(settings["amount"])
        skip = list(settings.get("skip") or [])
        if settings.get("structured", True):
            shapes = prune_filters(
                model, input_shape, amount, int(settings.get("norm", 1)), bool(settings.get("residual", True)), skip
            )
            steps.append({"op": "resize", "modules": shapes, "amount": amount, "norm": int(settings.get("norm", 1))})
        else:
            scope = settings.get("scope", "layer")
            masks = magnitude_prune(model, amount, scope=scope, skip=skip)
            keep_masks(model, masks)
            steps.append({"op": "sparse", "sparsity": amount, "scope": scope})
    if qat is not None:
        settings = plain(qat)
        prepare_qat(model, int(settings.get("weight_bits", 8)), int(settings.get("activation_bits", 8)))
        steps.append(
            {
                "op": "qat",
                "weight_bits": int(settings.get("weight_bits", 8)),
                "activation_bits": int(settings.get("activation_bits", 8)),
            }
        )
    return steps


def materialize(
    model: nn.Module,
    record: dict[str, Any] | None,
    cfg: Any = None,
    input_shape: Sequence[int] | None = None,
    source: str = "model file",
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Zoo model -> the network a recipe asks for: rebuild the checkpoint's architecture, load its
    weights, apply the recipe's ``lma``/``prune``/``qat`` switches. Returns the model and its steps."""
    saved = _check(((record or {}).get("model") or {}).get("architecture"), source)
    rebuild(model, saved, source)
    if record is not None:
        load_weights(model, record["state_dict"], source)
    after_load(model, saved)
    lma, prune, qat = (getattr(cfg, key, None) for key in ("lma", "prune", "qat"))
    if prune is not None and input_shape is None:
        raise ConfigError("pruning needs the input shape to trace the network")
    if lma is not None and any(step["op"] == "lma" for step in saved):
        raise ConfigError(f"'{source}' already uses LMA activations; drop the recipe's lma switch")
    if qat is not None and any(step["op"] == "qat" for step in saved):
        raise ConfigError(f"'{source}' is already fake-quantized; drop the recipe's qat switch")
    steps = transform(model, tuple(input_shape or ()), lma, prune, qat) if cfg is not None else []
    return model, saved + steps


def load_model_file(path: str | Path, allow_code: bool | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network of a kdforge model file (zoo name or model spec, kwargs, architecture
    steps, weights). A network of the user's code needs that code imported first, or
    ``allow_code=True`` (``--allow-model-code``) to import the module or file the file records.

    Returns ``(model in eval mode, the file's record)``.
    """
    record = read_model_file(path)
    spec = record.get("model") or {}
    if not spec.get("name"):
        raise CheckpointError(f"'{path}' is a plain state dict; give a kdforge model file (checkpoints/model_*.pt)")
    from kdforge.core.plugins import require_registered
    from kdforge.models import MODELS
    from kdforge.models.specs import rebuild as rebuild_spec

    size = tuple(spec["input_size"]) if spec.get("input_size") else None
    kwargs = spec.get("kwargs") or {}
    # the user's code (imported or allowed) or a Hugging Face config; None for zoo networks
    model = rebuild_spec(
        spec, record, str(path), spec["num_classes"], spec["in_channels"], size, kwargs, allow_code=allow_code
    )
    if model is None:
        require_registered(MODELS, spec["name"], record, str(path))
        model = create(
            spec["name"], num_classes=spec["num_classes"], in_channels=spec["in_channels"], input_size=size, **kwargs
        )
    model, _ = materialize(model, record, source=str(path))
    return model.eval(), record


def input_shape_of(record: dict[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) of one sample for a model file (its recorded input size; 32x32 when absent)."""
    spec = record.get("model") or {}
    size = spec.get("input_size") or (record.get("dataset") or {}).get("image_size") or (32, 32)
    return (int(spec.get("in_channels") or 3), int(size[0]), int(size[1]))


__all__ = ["after_load", "input_shape_of", "load_model_file", "materialize", "rebuild", "transform"]

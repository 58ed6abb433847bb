"""Deployable students: ONNX and TorchScript files, and the float ONNX file quantized to int8.

The ``kdforge export`` command that applies these to a model file is :mod:`kdforge.commands.export`.

The exported network is the model file's inference network in eval mode (BN and LMA use their
running statistics; QAT layers are stripped back to float), with a dynamic batch dimension.
ONNX uses PyTorch's ``torch.export``-based exporter (it needs ``onnxscript``), or the older
TorchScript-based one when onnxscript is missing or ``dynamo=False``; ``check_onnx`` runs the file
with ONNX Runtime and compares it with PyTorch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdforge.compress.quantize import deployable, quantize_onnx, session
from kdforge.core.errors import KDForgeError

FORMATS = ("onnx", "torchscript")
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: tuple[int, ...],
    opset: int = 18,
    dynamo: bool | None = None,
) -> Path:
    """Write ``model`` as ONNX with input ``input`` (batch x C x H x W, batch dynamic) and output ``logits``."""
    if importlib.util.find_spec("onnx") is None:
        raise KDForgeError("ONNX export needs the onnx package: pip install onnx onnxruntime onnxscript")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    network = deployable(model)
    example = torch.zeros(2, *input_shape)
    if dynamo is None:
        dynamo = importlib.util.find_spec("onnxscript") is not None
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), _quiet_logs():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(
                network,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                dynamo=True,
                verbose=False,
                external_data=False,
                optimize=True,
            )
        else:
            torch.onnx.export(
                network,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=min(opset, 17),
                dynamo=False,
            )
    return path


@contextlib.contextmanager
def _quiet_logs():
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


#: the metadata_props keys kdforge writes into an exported ONNX file (read them with
#: :func:`read_onnx_metadata` or ``onnx.load(path).metadata_props``)
METADATA_PREFIX = "kdforge."


def input_metadata(
    input_shape: tuple[int, ...],
    mean: list[float] | tuple[float, ...] | None,
    std: list[float] | tuple[float, ...] | None,
    class_names: list[str] | None = None,
    **extra: Any,
) -> dict[str, str]:
    """What a caller must feed the network, as ONNX metadata: layout, shape, pixel scale,
    normalisation and class names (values are JSON strings; keys start with ``kdforge.``)."""
    channels = int(input_shape[0])
    entries: dict[str, Any] = {
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_layout": "NCHW",
        "input_shape": ["batch", *(int(d) for d in input_shape)],
        "input_dtype": "float32",
        "color": "RGB" if channels == 3 else ("grayscale" if channels == 1 else f"{channels} channels"),
        "pixel_scale": "pixel / 255 (values in [0, 1])",
        "normalization": "(pixel / 255 - mean[c]) / std[c] per channel c; the network does not normalise",
        "mean": [float(v) for v in mean] if mean is not None else None,
        "std": [float(v) for v in std] if std is not None else None,
        "class_names": list(class_names) if class_names is not None else None,
        "output": "logits (batch x classes, no softmax)",
        **extra,
    }
    return {
        METADATA_PREFIX + key: value if isinstance(value, str) else json.dumps(value)
        for key, value in entries.items()
        if value is not None
    }


def write_onnx_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Set ``metadata`` as the file's metadata_props (replacing kdforge's earlier entries)."""
    import onnx

    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """kdforge's metadata of an ONNX file, ``kdforge.`` dropped and JSON values decoded."""
    import onnx

    found: dict[str, Any] = {}
    for prop in onnx.load(str(path), load_external_data=False).metadata_props:
        if prop.key.startswith(METADATA_PREFIX):
            try:
                found[prop.key.removeprefix(METADATA_PREFIX)] = json.loads(prop.value)
            except ValueError:
                found[prop.key.removeprefix(METADATA_PREFIX)] = prop.value
    return found


def export_torchscript(model: nn.Module, path: str | Path, input_shape: tuple[int, ...]) -> Path:
    """Write ``model`` traced to TorchScript (load with ``torch.jit.load``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    network = deployable(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(network, torch.zeros(2, *input_shape))
        traced.save(str(path))
    return path


def check_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, ...], batch_size: int = 4) -> float:
    """Largest absolute difference between ONNX Runtime's and PyTorch's logits on a random batch."""
    network = deployable(model)
    x = torch.randn(batch_size, *input_shape)
    with torch.no_grad():
        expected = network(x)
    runtime = session(path)
    got = runtime.run(None, {runtime.get_inputs()[0].name: x.numpy()})[0]
    return float((torch.from_numpy(got) - expected).abs().max())


def export(
    model: nn.Module, path: str | Path, input_shape: tuple[int, ...], format: str = "onnx", **options: Any
) -> Path:
    if format == "onnx":
        return export_onnx(model, path, input_shape, **options)
    if format == "torchscript":
        return export_torchscript(model, path, input_shape)
    raise KDForgeError(f"export format must be one of {', '.join(FORMATS)}, got {format!r}")


def quantize_model(
    model: nn.Module,
    int8_path: str | Path,
    input_shape: tuple[int, ...],
    calibration: Iterable[Tensor | np.ndarray],
    per_channel: bool = True,
    method: str = "minmax",
) -> tuple[Path, Path]:
    """Export ``model`` (QAT layers stripped) to ONNX next to ``int8_path`` and quantize it.

    Returns ``(float_onnx_path, int8_onnx_path)``.
    """
    int8_path = Path(int8_path)
    float_path = int8_path.with_name(int8_path.stem.removesuffix(".int8") + ".float.onnx")
    export_onnx(model, float_path, input_shape)
    return float_path, quantize_onnx(float_path, int8_path, calibration, per_channel, method)


__all__ = [
    "FORMATS",
    "check_onnx",
    "export",
    "export_onnx",
    "export_torchscript",
    "input_metadata",
    "quantize_model",
    "read_onnx_metadata",
    "write_onnx_metadata",
]

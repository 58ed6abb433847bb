"""Deployable students: ONNX and TorchScript files (``kdforge export CHECKPOINT --format onnx``).

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
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.compress.quantize import deployable, session
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
                network, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, verbose=False,
                external_data=False, optimize=True,
            )
        else:
            torch.onnx.export(
                network, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=min(opset, 17), dynamo=False,
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


def calibration_batches(
    dataset: str, root: str | None = None, batches: int = 8, batch_size: int = 64, seed: int = 0
) -> list[torch.Tensor]:
    """``batches`` shuffled training batches of ``dataset``, normalised as at test time (no augmentation)."""
    from kdforge.config import DataConfig
    from kdforge.data import BatchLoader
    from kdforge.engine.build import build_augmentation, build_data

    cfg = DataConfig(name=dataset, root=root, augment=False)
    data = build_data(cfg)
    loader = BatchLoader(data.train, batch_size, shuffle=True, seed=seed, augmentation=build_augmentation(cfg, data.info),
                         train=False)
    found = []
    for batch in loader:
        found.append(batch.image.detach().cpu())
        if len(found) >= batches:
            break
    return found


def export_checkpoint(
    checkpoint: str | Path,
    format: str = "onnx",
    out: str | Path | None = None,
    int8: bool = False,
    data: str | None = None,
    root: str | None = None,
    batches: int = 8,
    batch_size: int = 64,
    check: bool = True,
) -> dict[str, Any]:
    """``kdforge export``: write a model file's network as ONNX (optionally int8) or TorchScript."""
    from kdforge.compress.arch import input_shape_of, load_model_file
    from kdforge.compress.quantize import OnnxModule, quantize_onnx

    if int8 and format != "onnx":
        raise KDForgeError("--int8 quantizes ONNX files; use --format onnx")
    model, record = load_model_file(checkpoint)
    shape = input_shape_of(record)
    path = Path(out) if out else default_path(checkpoint, format, int8)
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "format": format, "input_shape": list(shape)}
    if format == "torchscript":
        export_torchscript(model, path, shape)
        loaded = torch.jit.load(str(path))
        x = torch.randn(4, *shape)
        with torch.no_grad():
            result["max_abs_diff"] = float((loaded(x) - deployable(model)(x)).abs().max())
        result["path"] = str(path)
        return result
    float_path = path.with_name(path.name.removesuffix(".int8.onnx") + ".float.onnx") if int8 else path
    export_onnx(model, float_path, shape)
    if check and importlib.util.find_spec("onnxruntime") is not None:
        result["max_abs_diff"] = check_onnx(model, float_path, shape)
    result["path"] = str(float_path)
    if int8:
        dataset = data or (record.get("dataset") or {}).get("name")
        if not dataset:
            raise KDForgeError("the checkpoint does not say its dataset; pass --data NAME for calibration")
        quantize_onnx(float_path, path, calibration_batches(dataset, root, batches, batch_size))
        result.update(int8_path=str(path), calibration_images=batches * batch_size)
        if check:
            network = deployable(model)
            x = calibration_batches(dataset, root, 1, 64, seed=1)[0]
            with torch.no_grad():
                agree = (OnnxModule(path)(x).argmax(1) == network(x).argmax(1)).float().mean()
            result["int8_agreement"] = float(agree)
    return result


def default_path(checkpoint: str | Path, format: str, int8: bool = False) -> Path:
    checkpoint = Path(checkpoint)
    suffix = (".int8.onnx" if int8 else ".onnx") if format == "onnx" else ".torchscript.pt"
    return checkpoint.with_name(checkpoint.stem + suffix)


__all__ = ["FORMATS", "calibration_batches", "check_onnx", "default_path", "export", "export_checkpoint", "export_onnx",
           "export_torchscript"]

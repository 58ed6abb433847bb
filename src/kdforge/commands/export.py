"""``kdforge export``: write a model file's network as ONNX (optionally int8) or TorchScript.

The file formats and the quantizer are :mod:`kdforge.compress.export` and
:mod:`kdforge.compress.quantize`; this module adds what a command needs on top: the model file's
architecture (:mod:`kdforge.compress.arch`) and calibration batches of its dataset.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from kdforge.compress.arch import input_shape_of, load_model_file
from kdforge.compress.export import check_onnx, export_onnx, export_torchscript, input_metadata, write_onnx_metadata
from kdforge.compress.quantize import OnnxModule, deployable, quantize_onnx
from kdforge.config import DataConfig
from kdforge.core.errors import KDForgeError
from kdforge.data import make_loader
from kdforge.engine.build import build_command_data, recorded_augmentation, recorded_data_config


def calibration_batches(
    dataset: str | DataConfig,
    root: str | None = None,
    batches: int = 8,
    batch_size: int = 64,
    seed: int = 0,
    record: dict[str, Any] | None = None,
) -> list[torch.Tensor]:
    """``batches`` shuffled training batches of ``dataset`` (a name or the run's DataConfig),
    normalised as at test time (no augmentation; with ``record``'s statistics when given)."""
    cfg = dataset if isinstance(dataset, DataConfig) else DataConfig(name=dataset, root=root, augment=False)
    data = build_command_data(cfg, record)
    augmentation = recorded_augmentation(record or {}, cfg, data.info)
    loader = make_loader(
        data.train,
        batch_size,
        num_workers=cfg.num_workers,
        shuffle=True,
        seed=seed,
        augmentation=augmentation,
        train=False,
    )
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
    metadata = onnx_metadata(record, shape)
    write_onnx_metadata(float_path, metadata)
    result["metadata"] = metadata
    if check and importlib.util.find_spec("onnxruntime") is not None:
        result["max_abs_diff"] = check_onnx(model, float_path, shape)
    result["path"] = str(float_path)
    if int8:
        if not (data or (record.get("dataset") or {}).get("name")):
            raise KDForgeError("the checkpoint does not say its dataset; pass --data NAME for calibration")
        cfg = recorded_data_config(record, checkpoint, data, root)  # the run's root and options
        calibration = calibration_batches(cfg, batches=batches, batch_size=batch_size, record=record)
        # tabular rows (B x D) feed a network exported for D x 1 x 1 input
        quantize_onnx(float_path, path, [x.reshape(len(x), *shape) for x in calibration])
        write_onnx_metadata(path, {**metadata, "kdforge.quantization": "int8 static, per-channel (ONNX Runtime)"})
        result.update(int8_path=str(path), calibration_images=batches * batch_size)
        if check:
            network = deployable(model)
            x = calibration_batches(cfg, batches=1, batch_size=64, seed=1, record=record)[0]
            x = x.reshape(len(x), *shape)
            with torch.no_grad():
                quantized, reference = OnnxModule(path)(x), network(x)
            dataset = record.get("dataset") or {}
            if dataset.get("task", "classification") == "classification":
                result["int8_agreement"] = float((quantized.argmax(1) == reference.argmax(1)).float().mean())
            else:  # regression: how far int8 outputs drift from float, in the target's units
                scale = float(dataset.get("target_scale") or 1.0)
                result["int8_mae_vs_float"] = float((quantized - reference).abs().mean()) * scale
                result["target_unit"] = str(dataset.get("target_unit") or "")
    return result


def onnx_metadata(record: dict[str, Any], shape: tuple[int, int, int]) -> dict[str, str]:
    """The model file's input contract (its dataset's mean, std and class names) as ONNX metadata;
    for a regression network also the task, how its outputs map to the target's units
    (``target_scale``) and the unit."""
    from kdforge import __version__

    dataset = record.get("dataset") or {}
    spec = record.get("model") or {}
    task = dataset.get("task") or "classification"
    regression: dict[str, Any] = {}
    if task != "classification":
        scale, unit = float(dataset.get("target_scale") or 1.0), str(dataset.get("target_unit") or "")
        regression = {
            "task": task,
            "output": f"{task} values (batch x {spec.get('num_classes')}); multiply by target_scale for the "
            f"target's units{f' ({unit})' if unit else ''}",
            "target_scale": scale,
            "target_unit": unit or None,
        }
    return input_metadata(
        shape,
        dataset.get("mean"),
        dataset.get("std"),
        dataset.get("class_names"),
        dataset=dataset.get("name"),
        model=spec.get("name"),
        num_classes=spec.get("num_classes"),
        kdforge_version=__version__,
        **regression,
    )


def default_path(checkpoint: str | Path, format: str, int8: bool = False) -> Path:
    checkpoint = Path(checkpoint)
    suffix = (".int8.onnx" if int8 else ".onnx") if format == "onnx" else ".torchscript.pt"
    return checkpoint.with_name(checkpoint.stem + suffix)


__all__ = ["calibration_batches", "default_path", "export_checkpoint", "onnx_metadata"]

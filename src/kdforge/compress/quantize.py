"""int8 students for CPU inference: post-training static quantization with ONNX Runtime, and
quantization-aware fine-tuning (fake-quantized student, trained with KD from a float teacher).

**Post-training quantization** (``quantize_onnx``): the float student is exported to ONNX
(``kdforge.compress.export``), pre-processed (shape inference, graph optimisation: BN folded into
the convolutions) and quantized with ONNX Runtime's static quantizer in QDQ format: int8 weights
per output channel (symmetric), uint8 activations per tensor with ranges calibrated (min/max) on
training batches. ONNX Runtime then runs the convolutions and matrix products with int8 kernels.
``OnnxModule`` wraps an ONNX Runtime session as an ``nn.Module`` so ``evaluate_model`` and
``measure_latency`` measure it like any network. (PyTorch's eager ``torch.ao.quantization`` API is
deprecated and is not used.)

**Quantization-aware training** (``prepare_qat``): every conv and linear layer is replaced by a
``QATConv2d``/``QATLinear`` that fake-quantizes its weights (symmetric int8 per output channel,
from the current weights) and its input activations (affine uint8 per tensor, range tracked by an
exponential moving average of the batch min/max in training, frozen in eval), with
straight-through gradients (``torch.fake_quantize_per_*_affine``). Recipe switch:
``student: {checkpoint: float_student.pt, qat: {weight_bits: 8, activation_bits: 8}}`` with any
KD method and the float teacher. ``strip_qat`` turns the layers back into plain ones (same
weights) for export; the exported model is then quantized by ONNX Runtime as above.
Simplification: BN is not folded into the weights during QAT (it is at export), so the trained
weights see slightly different rounding than the deployed, folded ones.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.core.errors import ConfigError, KDForgeError

# ----------------------------------------------------------------------------- fake quantization


def _check_bits(bits: int, what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"qat: {what} must be an integer from 2 to 8, got {bits!r}")
    return bits


def fake_quantize_weight(weight: Tensor, bits: int = 8) -> Tensor:
    """Symmetric per-output-channel fake quantization (levels ``-(2^(b-1)-1) .. 2^(b-1)-1``)."""
    limit = 2 ** (bits - 1) - 1
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale = (flat.abs().amax(1) / limit).clamp_min(1e-8).float()
    zero = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -limit, limit)


class ActivationFakeQuant(nn.Module):
    """Affine per-tensor fake quantization to ``0 .. 2^b - 1`` with an EMA min/max observer."""

    def __init__(self, bits: int = 8, momentum: float = 0.9) -> None:
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                low, high = x.detach().min().float(), x.detach().max().float()
                if bool(self.observed):
                    self.min_val.mul_(self.momentum).add_(low, alpha=1 - self.momentum)
                    self.max_val.mul_(self.momentum).add_(high, alpha=1 - self.momentum)
                else:
                    self.min_val.copy_(low)
                    self.max_val.copy_(high)
                    self.observed.fill_(True)
        elif not bool(self.observed):
            return x
        levels = 2**self.bits - 1
        low = self.min_val.clamp(max=0.0)
        high = self.max_val.clamp(min=0.0)
        scale = ((high - low) / levels).clamp_min(1e-8)
        zero = torch.clamp(torch.round(-low / scale), 0, levels).to(torch.int32)
        return torch.fake_quantize_per_tensor_affine(x, scale.to(x.device), zero.to(x.device), 0, levels)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class QATConv2d(nn.Conv2d):
    """A Conv2d whose weights and input activations are fake-quantized."""

    weight_bits: int = 8

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_quant(x), fake_quantize_weight(self.weight, self.weight_bits), self.bias)


class QATLinear(nn.Linear):
    """A Linear whose weights and input activations are fake-quantized."""

    weight_bits: int = 8

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quant(x), fake_quantize_weight(self.weight, self.weight_bits), self.bias)


def _convert(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A module of ``cls`` sharing ``module``'s parameters, buffers and attributes (no tensor copy)."""
    new = cls.__new__(cls)
    new.__dict__ = {
        key: (copy.copy(value) if isinstance(value, (dict, set)) else value) for key, value in module.__dict__.items()
    }
    return new


def prepare_qat(model: nn.Module, weight_bits: int = 8, activation_bits: int = 8) -> nn.Module:
    """Replace every nn.Conv2d / nn.Linear of ``model`` by its fake-quantized version, in place."""
    _check_bits(weight_bits, "weight_bits")
    _check_bits(activation_bits, "activation_bits")
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d:
                cls: type[nn.Module] = QATConv2d
            elif type(child) is nn.Linear:
                cls = QATLinear
            else:
                continue
            new = _convert(child, cls)
            new.weight_bits = weight_bits
            device = child.weight.device
            new.input_quant = ActivationFakeQuant(activation_bits).to(device)
            new.input_quant.train(child.training)
            setattr(parent, name, new)
            replaced += 1
    if not replaced:
        raise ConfigError(f"qat: {type(model).__name__} has no conv or linear layer to quantize")
    return model


def strip_qat(model: nn.Module) -> nn.Module:
    """Turn QAT layers back into plain nn.Conv2d / nn.Linear with the same weights, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QATConv2d):
                plain: nn.Module = _convert(child, nn.Conv2d)
            elif isinstance(child, QATLinear):
                plain = _convert(child, nn.Linear)
            else:
                continue
            plain._modules.pop("input_quant", None)
            plain.__dict__.pop("weight_bits", None)
            setattr(parent, name, plain)
    return model


def is_qat(model: nn.Module) -> bool:
    return any(isinstance(m, (QATConv2d, QATLinear)) for m in model.modules())


# ----------------------------------------------------------------------------- ONNX Runtime


def require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise KDForgeError("int8 quantization and ONNX checks need onnxruntime: pip install onnx onnxruntime") from None
    return onnxruntime


def session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (default: torch's setting)."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxModule(nn.Module):
    """An ONNX file run by ONNX Runtime, callable like a classifier: ``logits = module(images)``."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(out).to(x.device)

    def extra_repr(self) -> str:
        return str(self.path)


class _Calibration:
    """ONNX Runtime calibration reader over batches of (normalised) images."""

    def __init__(self, input_name: str, batches: Iterable[Tensor | np.ndarray]) -> None:
        self.input_name = input_name
        self.batches: Iterator[Tensor | np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        array = batch.detach().cpu().float().numpy() if isinstance(batch, Tensor) else np.asarray(batch, np.float32)
        return {self.input_name: np.ascontiguousarray(array)}

    def rewind(self) -> None:  # not needed for one pass of min/max calibration
        pass


def quantize_onnx(
    float_path: str | Path,
    int8_path: str | Path,
    calibration: Iterable[Tensor | np.ndarray],
    per_channel: bool = True,
    method: str = "minmax",
    preprocess: bool = True,
) -> Path:
    """Static int8 quantization of an ONNX classifier with ONNX Runtime (QDQ format).

    Weights int8 (symmetric, per output channel unless ``per_channel=False``), activations uint8
    (per tensor), ranges from ``calibration`` batches (``method``: ``minmax``, ``entropy`` or
    ``percentile``). ``preprocess`` runs ONNX Runtime's recommended pre-processing first.
    """
    require_onnxruntime()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise ConfigError(f"calibration method must be one of {', '.join(methods)}, got {method!r}")
    float_path, int8_path = Path(float_path), Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    source = float_path
    prepared = int8_path.with_name(int8_path.stem + ".pre.onnx")
    if preprocess:
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        source = prepared
    input_name = session(source, 1).get_inputs()[0].name
    try:
        quantize_static(
            str(source),
            str(int8_path),
            _Calibration(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=methods[method],
        )
    finally:
        if preprocess:
            prepared.unlink(missing_ok=True)
    return int8_path


def deployable(model: nn.Module) -> nn.Module:
    """An eval-mode CPU copy of ``model`` with QAT layers stripped (what export writes)."""
    clone = copy.deepcopy(model).cpu().eval()
    return strip_qat(clone) if is_qat(clone) else clone


__all__ = [
    "ActivationFakeQuant",
    "OnnxModule",
    "QATConv2d",
    "QATLinear",
    "deployable",
    "fake_quantize_weight",
    "is_qat",
    "prepare_qat",
    "quantize_onnx",
    "require_onnxruntime",
    "session",
    "strip_qat",
]

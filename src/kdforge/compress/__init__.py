"""Model compression: pruning (proximal operators, magnitude masks) and its methods; compact
students for devices: LMA activations, filter pruning that physically shrinks the network, int8
quantization (ONNX Runtime) and quantization-aware training, export, the compression report.
See docs/compression.md.
"""

from kdforge.compress.arch import load_model_file, materialize
from kdforge.compress.export import check_onnx, export, export_onnx, export_torchscript, quantize_model
from kdforge.compress.footprint import compression_report, describe, size_on_disk
from kdforge.compress.lma import LMA, lma_student
from kdforge.compress.proximal import (
    group_soft_threshold,
    magnitude_mask,
    project_to_sparsity,
    prunable_layers,
    soft_threshold,
    sparsity_of,
)
from kdforge.compress.prune import (
    ChannelGroup,
    PrunePlan,
    channel_groups,
    keep_masks,
    magnitude_prune,
    masked_copy,
    plan_filter_pruning,
    prune_filters,
    remove_channels,
    remove_zero_filters,
    zero_channels,
)
from kdforge.compress.quantize import OnnxModule, prepare_qat, quantize_onnx, strip_qat

__all__ = [
    "LMA",
    "ChannelGroup",
    "OnnxModule",
    "PrunePlan",
    "channel_groups",
    "check_onnx",
    "compression_report",
    "describe",
    "export",
    "export_onnx",
    "export_torchscript",
    "group_soft_threshold",
    "keep_masks",
    "lma_student",
    "load_model_file",
    "magnitude_mask",
    "magnitude_prune",
    "masked_copy",
    "materialize",
    "plan_filter_pruning",
    "prepare_qat",
    "project_to_sparsity",
    "prunable_layers",
    "prune_filters",
    "quantize_model",
    "quantize_onnx",
    "remove_channels",
    "remove_zero_filters",
    "size_on_disk",
    "soft_threshold",
    "sparsity_of",
    "strip_qat",
    "zero_channels",
]

"""Export (ONNX, TorchScript), int8 static quantization with ONNX Runtime, QAT, and the compression
report in run summaries. ONNX checks skip when onnx/onnxruntime are missing (pip install -e .[dev])."""

import importlib.util
import json

import pytest
import torch

from kdforge.commands.export import calibration_batches
from kdforge.compress import LMA, OnnxModule, export_onnx, lma_student, prepare_qat, prune_filters, strip_qat
from kdforge.compress.arch import load_model_file
from kdforge.compress.export import check_onnx, quantize_model
from kdforge.compress.quantize import QATConv2d, QATLinear
from kdforge.config import DataConfig, build_config
from kdforge.engine.build import build_augmentation, build_data
from kdforge.engine.trainer import Trainer, evaluate_model
from kdforge.models import create

HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="needs onnx and onnxruntime (pip install -e .[dev])")
SHAPE = (3, 16, 16)
BASE = {"data": {"name": "digits", "augment": False}, "train": {"batch_size": 64, "progress": "none"}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LeNet trained on the bundled digits (about 95% top-1), as a model file."""
    out = tmp_path_factory.mktemp("lenet")
    torch.manual_seed(0)
    config = build_config(
        {
            **BASE,
            "student": {"name": "lenet"},
            "method": {"name": "ce"},
            "train": {
                **BASE["train"],
                "epochs": 5,
                "optimizer": {"name": "adam", "lr": 0.003, "weight_decay": 0.0},
                "scheduler": {"name": "constant"},
            },
        }
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test single-thread setting
    try:
        summary = Trainer(config, out / "run").fit()
    finally:
        torch.set_num_threads(threads)
    return out / "run" / "checkpoints" / "model_last.pt", summary


@needs_onnx
@pytest.mark.parametrize("variant", ["plain", "lma_pruned"])
def test_onnx_export_matches_pytorch(tmp_path, variant):
    model = create("resnet8", num_classes=10, input_size=SHAPE[1:])
    if variant == "lma_pruned":
        lma_student(model, k=8)
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(16, *SHAPE))  # non-trivial running statistics for every LMA
            for module in model.modules():
                if isinstance(module, LMA):
                    module.slope_delta.normal_(0, 0.2)
                    module.bias_delta.normal_(0, 0.1)
        prune_filters(model, SHAPE, 0.5)
    model.eval()
    path = export_onnx(model, tmp_path / "model.onnx", SHAPE)
    assert check_onnx(model, path, SHAPE, batch_size=5) < 1e-4  # dynamic batch: exported with 2, run with 5
    assert OnnxModule(path)(torch.randn(1, *SHAPE)).shape == (1, 10)


@needs_onnx
def test_int8_static_quantization_keeps_accuracy(tmp_path, trained):
    checkpoint, _ = trained
    model, _ = load_model_file(checkpoint)
    data_cfg = DataConfig(name="digits", augment=False)
    data = build_data(data_cfg)
    augmentation = build_augmentation(data_cfg, data.info)
    shape = (1, 8, 8)
    float_path, int8_path = quantize_model(
        model, tmp_path / "lenet.int8.onnx", shape, calibration_batches("digits", batches=4)
    )
    float_top1 = evaluate_model(model, data.test, augmentation, 256)["top1"]
    int8_top1 = evaluate_model(OnnxModule(int8_path), data.test, augmentation, 256)["top1"]
    onnx_top1 = evaluate_model(OnnxModule(float_path), data.test, augmentation, 256)["top1"]
    assert float_top1 > 85 and abs(onnx_top1 - float_top1) < 0.5
    assert abs(int8_top1 - float_top1) <= 3.0
    import onnx

    graph = onnx.load(str(int8_path)).graph
    kinds = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= kinds
    per_channel = [i for i in graph.initializer if i.name.endswith("_scale") and len(i.dims) == 1 and i.dims[0] > 1]
    assert per_channel  # weights quantized per output channel
    assert int8_path.stat().st_size < 0.5 * float_path.stat().st_size


def test_qat_fake_quant_fine_tune_step_and_reload(tmp_path, trained):
    checkpoint, _ = trained
    config = build_config(
        {
            **BASE,
            "data": {"name": "digits", "augment": False, "train_subset": 128},
            "student": {"checkpoint": str(checkpoint), "qat": {"weight_bits": 8, "activation_bits": 8}},
            "teachers": [{"checkpoint": str(checkpoint)}],  # KD from the float network
            "method": {"name": "kd", "temperature": 4},
            "train": {**BASE["train"], "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.01}},
        }
    )
    summary = Trainer(config, tmp_path / "qat").fit()
    assert summary["final"]["test"]["top1"] > 80
    model, record = load_model_file(tmp_path / "qat" / "checkpoints" / "model_last.pt")
    assert record["model"]["architecture"] == [{"op": "qat", "weight_bits": 8, "activation_bits": 8}]
    layers = [m for m in model.modules() if isinstance(m, (QATConv2d, QATLinear))]
    assert layers and all(bool(m.input_quant.observed) for m in layers)
    x = calibration_batches("digits", batches=1, batch_size=16)[0]  # in the range the observers saw
    with torch.no_grad():
        fake = model(x)
        plain = strip_qat(model)(x)
    assert not any(isinstance(m, (QATConv2d, QATLinear)) for m in model.modules())
    assert (fake - plain).abs().max() < 0.1 * plain.abs().max()  # 8-bit rounding, not a different network
    assert (fake.argmax(1) == plain.argmax(1)).float().mean() > 0.8


def test_qat_layers_round_weights_and_pass_gradients():
    model = prepare_qat(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 2)), 4, 8
    )
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    conv = model[0]
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    from kdforge.compress.quantize import fake_quantize_weight

    levels = fake_quantize_weight(conv.weight.detach(), 4)[0].flatten().unique()
    assert len(levels) <= 15  # 4-bit symmetric: at most 2 * 7 + 1 values per filter


@needs_onnx
def test_cli_export_onnx_int8_and_torchscript(tmp_path, trained, capsys):
    checkpoint, _ = trained
    from kdforge.cli import main

    out = tmp_path / "lenet.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert out.is_file() and result["max_abs_diff"] < 1e-4
    assert (
        main(
            [
                "export",
                str(checkpoint),
                "--int8",
                "--out",
                str(tmp_path / "lenet.int8.onnx"),
                "--calibration-batches",
                "2",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert (tmp_path / "lenet.int8.onnx").is_file() and result["int8_agreement"] > 0.9
    assert (
        main(["export", str(checkpoint), "--format", "torchscript", "--out", str(tmp_path / "lenet.ts"), "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["max_abs_diff"] < 1e-5
    assert torch.jit.load(str(tmp_path / "lenet.ts"))(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_compression_report_in_a_one_epoch_digits_summary(tmp_path, trained, capsys):
    checkpoint, _ = trained
    config = build_config(
        {
            **BASE,
            "data": {"name": "digits", "augment": False, "train_subset": 100},
            "student": {"name": "mlp", "kwargs": {"hidden": [32]}},
            "teachers": [{"checkpoint": str(checkpoint)}],
            "method": {"name": "kd"},
            "train": {**BASE["train"], "epochs": 1},
        }
    )
    Trainer(config, tmp_path / "kd").fit()
    summary = json.loads((tmp_path / "kd" / "summary.json").read_text())
    report = summary["compression"]
    for network in ("student", "teacher"):
        fields = report[network]
        assert {"parameters", "nonzero_parameters", "flops", "macs", "size_bytes", "latency_ms"} <= set(fields)
        assert set(fields["latency_ms"]) == {"1", "64"} and all(v > 0 for v in fields["latency_ms"].values())
        assert fields["size_bytes"] > 4 * fields["parameters"]
    assert report["student"]["parameters"] == summary["student_parameters"]
    assert report["compression_rate"] == pytest.approx(
        report["teacher"]["parameters"] / report["student"]["parameters"]
    )
    assert report["computation_rate"] == pytest.approx(report["teacher"]["flops"] / report["student"]["flops"])
    assert "compression" in report["text"] and "computation" in report["text"]

    from kdforge.cli import main

    assert (
        main(
            [
                "profile",
                str(tmp_path / "kd" / "checkpoints" / "model_last.pt"),
                "--teacher",
                str(checkpoint),
                "--batch-sizes",
                "1",
                "4",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "compression" in printed and "CPU ms b4" in printed

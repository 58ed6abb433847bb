"""An exported ONNX file says what input it expects: layout, shape, normalisation, class names."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from kdforge.config import build_config
from kdforge.engine.trainer import Trainer

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime")),
    reason="needs onnx and onnxruntime (pip install -e .[dev])",
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = build_config(
        {
            "data": {"name": "digits", "augment": False},
            "student": {"name": "mlp", "kwargs": {"hidden": [32]}},
            "train": {"epochs": 3, "batch_size": 32, "scheduler": {"name": "constant"}, "progress": "none"},
        }
    )
    Trainer(config, out).fit()
    return out / "checkpoints" / "model_last.pt"


def test_onnx_metadata_carries_the_input_contract_and_applying_it_gives_the_accuracy(tmp_path, checkpoint):
    import onnx
    import onnxruntime

    from kdforge.commands.export import export_checkpoint
    from kdforge.compress.export import read_onnx_metadata
    from kdforge.data import load_dataset

    result = export_checkpoint(checkpoint, "onnx", tmp_path / "m.int8.onnx", int8=True, batches=2)
    splits = load_dataset("digits")
    info = splits.info
    for path in (result["path"], result["int8_path"]):
        props = {p.key: p.value for p in onnx.load(path).metadata_props}  # plain onnx reads them
        assert props["kdforge.input_layout"] == "NCHW"
        meta = read_onnx_metadata(path)
        assert meta["input_shape"] == ["batch", 1, 8, 8]
        assert meta["mean"] == pytest.approx(list(info.mean)) and meta["std"] == pytest.approx(list(info.std))
        assert meta["class_names"] == list(info.class_names)
        assert meta["color"] == "grayscale" and meta["dataset"] == "digits" and meta["model"] == "mlp"
    assert "int8" in read_onnx_metadata(result["int8_path"])["quantization"]

    # what the export docs tell a user to do: uint8 pixels -> / 255 -> (x - mean) / std, NCHW float32
    meta = read_onnx_metadata(result["path"])
    pixels = splits.test.images.numpy()  # uint8, N x C x H x W
    mean = np.asarray(meta["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(meta["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    session = onnxruntime.InferenceSession(result["path"], providers=["CPUExecutionProvider"])
    labels = splits.test.labels.numpy()

    def top1(x):
        logits = session.run([meta["output_name"]], {meta["input_name"]: x.astype(np.float32)})[0]
        return 100.0 * float((logits.argmax(1) == labels).mean())

    normalised = top1((pixels / 255.0 - mean) / std)
    record = __import__("torch").load(checkpoint, weights_only=True)
    assert normalised == pytest.approx(record["metrics"]["top1"], abs=0.01)  # the run's own test top-1
    assert top1(pixels / 255.0) < normalised - 1  # forgetting the normalisation costs accuracy

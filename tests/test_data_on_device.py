"""data.on_device: in-memory splits kept on the accelerator (decision, copies, record)."""

from __future__ import annotations

import torch

from kdforge.data.types import TensorData
from kdforge.engine.trainer import resident_decision


def _split(count=10, targets=None):
    return TensorData(torch.zeros(count, 3, 4, 4, dtype=torch.uint8), torch.arange(count) % 2, targets=targets)


def test_size_counts_every_tensor():
    plain = _split()
    assert plain.nbytes == 10 * 48 + 10 * 8 + 10 * 8  # images, labels (the targets too), indices
    with_targets = _split(targets=torch.zeros(10))
    assert with_targets.nbytes == plain.nbytes + 10 * 4


def test_to_moves_a_split_and_keeps_targets_tied_to_labels():
    moved = _split().to("meta")
    assert moved.images.device.type == "meta" and moved.indices.device.type == "meta"
    assert moved.targets is moved.labels  # class labels stay the targets
    regression = _split(targets=torch.arange(10, dtype=torch.float32)).to("meta")
    assert regression.targets.device.type == "meta" and regression.targets.dtype == torch.float32


def test_auto_keeps_a_split_on_a_gpu_only_when_it_fits():
    split = _split()
    cuda = torch.device("cuda")
    assert resident_decision("auto", split, cuda, 4 * split.nbytes)["resident"] is True
    too_big = resident_decision("auto", split, cuda, 4 * split.nbytes - 4)
    assert too_big["resident"] is False and "over a quarter" in too_big["reason"]
    assert resident_decision("auto", split, torch.device("cpu"), None)["resident"] is False
    assert resident_decision("auto", split, torch.device("mps"), None)["resident"] is False
    assert resident_decision(False, split, cuda, 10**12) == {"resident": False, "reason": "data.on_device: false"}
    assert resident_decision(True, object(), cuda, 10**12)["resident"] is False  # streamed data has no tensor

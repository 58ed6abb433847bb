"""train.allocator: auto keeps freed memory in a CPU run's process (glibc), so a step's large
blocks stop costing fresh pages; the choice is recorded in summary.json.

The allocator's settings are process-wide, so each measurement runs in its own interpreter.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap

import pytest

from kdforge.config import build_config
from kdforge.core import allocator
from kdforge.engine.trainer import Trainer

glibc = pytest.mark.skipif(allocator._glibc() is None, reason="the tuning applies to glibc only")

FAULTS = textwrap.dedent(
    """
    import resource, sys
    import torch
    from kdforge.core.allocator import tune_allocator
    from kdforge.models import create
    record = tune_allocator(sys.argv[1], "cpu")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = create("resnet8", num_classes=10)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    def step():
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step(); step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3, record["tuned"])
    """
)


def _faults_per_step(setting: str) -> tuple[int, bool]:
    done = subprocess.run([sys.executable, "-c", FAULTS, setting], capture_output=True, text=True, check=True)
    faults, tuned = done.stdout.split()
    return int(faults), tuned == "True"


@glibc
def test_tuned_allocator_stops_the_page_faults_of_repeated_large_blocks():
    # glibc's own count moves with its adaptive thresholds (4,500-13,500 per step seen), so each
    # side is the median of three fresh processes
    system = [_faults_per_step("system") for _ in range(3)]
    auto = [_faults_per_step("auto") for _ in range(3)]
    assert not any(tuned for _, tuned in system) and all(tuned for _, tuned in auto)
    system_faults = statistics.median(faults for faults, _ in system)
    tuned_faults = statistics.median(faults for faults, _ in auto)
    # resnet8 at batch 64: thousands of fresh pages per training step with glibc's defaults,
    # 0 to about a thousand once freed memory is kept
    assert system_faults > 3_000
    assert tuned_faults < system_faults / 3


def test_auto_leaves_gpu_runs_and_system_alone():
    if allocator._applied is None:  # nothing applied in this process yet
        assert allocator.tune_allocator("system", "cpu") == {"tuned": False, "reason": "train.allocator: system"}
        gpu = allocator.tune_allocator("auto", "cuda")
        assert gpu["tuned"] is False and "cuda" in gpu["reason"]
        assert allocator._applied is None


@glibc
def test_a_cpu_run_records_its_allocator(tmp_path):
    config = build_config(
        {
            "name": "alloc",
            "data": {"name": "digits", "augment": False, "train_subset": 100},
            "student": {"name": "mlp", "kwargs": {"hidden": [16]}},
            "method": {"name": "ce"},
            "train": {"epochs": 1, "batch_size": 50, "progress": "none"},
        }
    )
    summary = Trainer(config, tmp_path).fit()
    assert summary["allocator"]["tuned"] is True and "glibc" in summary["allocator"]["reason"]
    assert json.loads((tmp_path / "summary.json").read_text())["allocator"] == summary["allocator"]

"""What produced a run: code version, library versions, machine. Written into summary.json."""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

import kdforge


@lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """Commit of the kdforge source tree (when it is a git checkout) and whether it had edits."""
    source = Path(kdforge.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            != ""
        )
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": dirty}


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    processor = platform.processor() or platform.machine()
    return f"{device.type}: {processor}, {torch.get_num_threads()} threads"


def run_record(device: torch.device, seed: int) -> dict[str, Any]:
    return {
        "kdforge_version": kdforge.__version__,
        **git_state(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": device_description(device),
        "seed": seed,
    }

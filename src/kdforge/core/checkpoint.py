"""Checkpoint files: written atomically, loaded with ``weights_only=True``.

Two kinds of file:

* a **model file** (``format: kdforge-model``): the inference network's weights plus what is
  needed to rebuild it (zoo name or model spec, constructor arguments, class count, input shape;
  for the user's code or a Hugging Face model ``model.source``: the spec's kind, the file path or
  module, the Hugging Face config as a dict) and the dataset it was trained on. Teachers,
  ``kdforge eval`` and users load these.
* a **training state** (``format: kdforge-state``): everything ``--resume`` needs (distiller
  weights, optimizer states, epoch, RNG state, history).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from kdforge.core.errors import CheckpointError, StorageError
from kdforge.core.storage import storage_message

MODEL_FORMAT = "kdforge-model"
_UMASK = os.umask(0)
os.umask(_UMASK)
STATE_FORMAT = "kdforge-state"


def _atomic_write(path: str | Path, mode: str, write: Callable[[IO], None]) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StorageError(storage_message(exc, path)) from None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):  # disk full, read-only, ...
            raise StorageError(storage_message(exc, path)) from None
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a torn file."""
    _atomic_write(path, "wb", lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: str | Path) -> None:
    _atomic_write(path, "w", lambda handle: handle.write(text))


def load_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found; give the path of a .pt file from a run's checkpoints/")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not our file"
        text = str(exc)
        if "Weights only load failed" in text or "weights_only" in text:
            # torch's own message is several lines and suggests weights_only=False: never do that
            # for a file you did not write; kdforge files hold tensors and plain values only
            raise CheckpointError(
                f"checkpoint '{path}' holds Python objects that kdforge refuses to unpickle (unsafe: "
                "loading them could run code); export a plain state dict or a kdforge model file"
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else ""
        raise CheckpointError(f"checkpoint '{path}' could not be read ({type(exc).__name__}: {first})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a state dict")
    return obj


def model_record(
    model: nn.Module,
    *,
    name: str | None,
    kwargs: dict[str, Any],
    num_classes: int,
    in_channels: int,
    input_size: tuple[int, int] | None,
    dataset: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    saved: dict[str, Any] = {
        "name": name,
        "kwargs": kwargs,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_size": list(input_size) if input_size else None,
    }
    source = getattr(model, "kdforge_source", None)
    if isinstance(source, dict) and source.get("kind") in ("import", "hf"):
        # how to rebuild a network of the user's code or of Hugging Face (kdforge.models.specs)
        saved["source"] = {**source, "kwargs": kwargs}
    return {
        "format": MODEL_FORMAT,
        "version": 1,
        "model": saved,
        "dataset": dataset or {},
        "metrics": metrics or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def read_model_file(path: str | Path) -> dict[str, Any]:
    """Load a model file; a bare state dict is accepted too (``model`` is then empty)."""
    obj = load_file(path)
    if obj.get("format") == MODEL_FORMAT:
        check_finite(obj.get("state_dict") or {}, path)
        return obj
    if obj.get("format") == STATE_FORMAT:
        raise CheckpointError(
            f"'{path}' is a training state (for --resume); use checkpoints/model_best.pt or model_last.pt"
        )
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        check_finite(obj, path)
        return {"format": "state_dict", "model": {}, "dataset": {}, "metrics": {}, "state_dict": obj}
    raise CheckpointError(f"'{path}' is not a kdforge model file nor a plain state dict")


def check_finite(state_dict: dict[str, Any], source: str | Path) -> None:
    """Refuse weights holding NaN or infinity (a diverged run): evaluating, exporting or distilling
    from them would silently give garbage."""
    bad = [
        key
        for key, value in state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    if bad:
        raise CheckpointError(
            f"'{source}' holds non-finite weights ({len(bad)} tensor(s), first '{bad[0]}'): it comes from a "
            "diverged run; use the run's checkpoints/model_best.pt or retrain with a lower learning rate"
        )


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights strictly, turning shape or key mismatches into one readable line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        detail = (
            f"shapes differ: {mismatched[0]}"
            if mismatched
            else f"missing {missing[:2]}"
            if missing
            else f"unexpected {unexpected[:2]}"
        )
        raise CheckpointError(
            f"checkpoint '{source}' does not fit the model ({detail}); "
            "check the architecture name, its kwargs and the number of classes"
        )
    model.load_state_dict(state_dict)

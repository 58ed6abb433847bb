"""The teacher bank: a teacher's logits computed once per (seed, epoch, sample) and replayed.

Augmentation randomness is a pure function of (seed, epoch, sample index) (``kdforge.data.augment``),
so the image a teacher sees for sample ``i`` in epoch ``e`` is known before training starts. The
bank runs every teacher once over the whole training split with exactly that augmentation, stores
the logits (float16, optionally only the top-k) and, in every later run with the same teachers,
data, augmentation and seed, hands them to the method through ``batch.extras["teacher_logits"]``
(K x B x C) instead of running the teachers (``Distiller.teacher_logits`` already honours it).

Layout of a bank folder ``<directory>/<key>/``::

    metadata.json        what the bank holds (informational; the epoch files are checked on load)
    epoch-0000.pt        logits of epoch 0 (one file per epoch of a random augmentation)
    static.pt            the only file when the augmentation is not random (every epoch is equal)

Every file is written to a temporary file in the same folder and renamed over its name: a crash
never leaves a torn file, and two processes that compute the same epoch at once both write the
same content and the last rename wins.

Typical use (what the trainer does)::

    bank = TeacherBank(directory, teachers, teacher_files, data.train, info.name, augmentation, seed)
    for epoch in range(epochs):
        bank.ensure_epoch(epoch)            # computes the epoch's logits unless stored already
        for batch in loader:
            batch.extras["teacher_logits"] = bank.lookup(epoch, batch.index)
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.core.checkpoint import atomic_save, atomic_write_text
from kdforge.core.errors import KDForgeError
from kdforge.data.augment import Augmentation
from kdforge.data.types import StreamData, TensorData

BANK_FORMAT = "kdforge-teacher-bank"
BANK_VERSION = 1
STATIC_NAME = "static.pt"
METADATA_NAME = "metadata.json"
_CHUNK = 1 << 20

_digest_cache: dict[tuple[str, int, int], str] = {}


class TeacherBankError(KDForgeError):
    """A teacher bank cannot be written or read; the message names the file and the fix."""


def default_bank_directory() -> Path:
    """``$KDFORGE_BANK`` when set, otherwise ``~/.cache/kdforge/teacher-bank``."""
    configured = os.environ.get("KDFORGE_BANK")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "kdforge" / "teacher-bank"


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file, read in 1 MiB chunks; cached per (path, mtime, size)."""
    path = Path(path)
    try:
        stat = path.stat()
        resolved = str(path.resolve())
    except OSError as exc:
        raise TeacherBankError(
            f"teacher bank: cannot read teacher checkpoint '{path}' ({exc.strerror or exc}); "
            "check the teacher's checkpoint path"
        ) from None
    cache_key = (resolved, stat.st_mtime_ns, stat.st_size)
    cached = _digest_cache.get(cache_key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise TeacherBankError(
            f"teacher bank: cannot read teacher checkpoint '{path}' ({exc.strerror or exc}); "
            "check the file's permissions"
        ) from None
    _digest_cache[cache_key] = value = digest.hexdigest()
    return value


def weights_digest(model: nn.Module) -> str:
    """sha256 (hex) of a module's state dict (names, dtypes, shapes, values), for teachers without a file."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def data_digest(data: TensorData) -> str:
    """sha256 (hex) of a split's identity: source indices, labels and images.

    The indices tell subsets of one source apart; labels and images make two different files
    loaded under the same dataset name (npz, imagefolder, other options) differ too.
    """
    digest = hashlib.sha256()
    for label, tensor in (("indices", data.indices), ("labels", data.labels), ("images", data.images)):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{label}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    if tensor.numel() == 0:
        return memoryview(b"")
    if tensor.dtype in (torch.bfloat16,):  # no numpy dtype: hash the raw 16-bit words
        tensor = tensor.view(torch.int16)
    return memoryview(tensor.numpy()).cast("B")


def augmentation_description(augmentation: Augmentation | None) -> dict[str, Any] | None:
    """The parameters that decide what a teacher sees (None: images scaled to [0, 1] only)."""
    if augmentation is None:
        return None
    return {
        "crop_padding": int(augmentation.crop_padding),
        "horizontal_flip": bool(augmentation.horizontal_flip),
        "mean": [float(v) for v in augmentation.mean],
        "std": [float(v) for v in augmentation.std],
    }


def reconstruct_top_k(
    values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Full float32 logits (... x C) from the top-k form: ``tail`` everywhere, ``values`` at ``indices``."""
    full = tail.to(torch.float32).unsqueeze(-1).expand(*tail.shape, num_classes).clone()
    return full.scatter_(-1, indices.long(), values.to(torch.float32))


def top_k_form(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, indices, tail) of float32 logits ``... x C``: the ``k`` largest logits and the value
    that, given to every other class, keeps their total probability at T = 1:
    ``tail = log(sum_{j not in top-k} exp z_j) - log(C - k)``."""
    num_classes = logits.shape[-1]
    values, indices = logits.topk(k, dim=-1)
    rest = logits.scatter(-1, indices, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1) - math.log(num_classes - k)
    return values, indices, tail


def unusable_reason(data: Any, augmentation: Augmentation | None) -> str | None:
    """Why a bank cannot serve this training split (one line), or None when it can.

    A bank replays outputs keyed by (seed, epoch, sample) and recomputes them from the samples in
    memory; a split streamed from a Dataset is read item by item and may transform its items
    randomly on every read (its own augmentation), so stored outputs could differ from what the
    student sees.
    """
    if isinstance(data, TensorData):
        return None
    name = getattr(data, "name", None) or "the training split"
    random = augmentation is not None and augmentation.is_random
    extra = " with random crops/flips" if random else ""
    return (
        f"'{name}' is streamed from a Dataset{extra}, whose items may change on every read; a teacher bank "
        "needs in-memory data (a built-in dataset, npz or csv)"
    )


class TeacherBank:
    """Stored teacher logits for one (teachers, data, augmentation, seed, top_k).

    ``teachers`` and ``teacher_files`` go together, in the method's teacher order (a file may be
    None for a teacher without a checkpoint: its weights are hashed instead). ``data`` is the run's
    training split exactly as the ``BatchLoader`` sees it (``Batch.index`` = position in it),
    ``augmentation`` and ``seed`` the loader's. ``device`` is where the epoch table is kept for
    ``lookup`` (the trainer's device; default CPU); teachers run on the device of their weights.
    """

    def __init__(
        self,
        directory: str | Path | None,
        teachers: Sequence[nn.Module],
        teacher_files: Sequence[str | Path | None],
        data: TensorData | StreamData,
        dataset_name: str,
        augmentation: Augmentation | None,
        seed: int,
        top_k: int | None = None,
        batch_size: int = 512,
        device: torch.device | str | None = None,
    ) -> None:
        if not teachers:
            raise TeacherBankError("teacher bank: the method has no teachers; disable teacher_bank for this recipe")
        reason = unusable_reason(data, augmentation)
        if reason is not None:
            raise TeacherBankError(f"teacher bank cannot apply: {reason}; disable teacher_bank for this recipe")
        assert isinstance(data, TensorData)
        if len(teachers) != len(teacher_files):
            raise TeacherBankError(
                f"teacher bank: {len(teachers)} teachers but {len(teacher_files)} teacher files; give one file per teacher"  # noqa: E501
            )
        if top_k is not None and (isinstance(top_k, bool) or int(top_k) < 1):
            raise TeacherBankError(f"teacher bank: top_k must be a positive integer or None, got {top_k!r}")
        if batch_size < 1:
            raise TeacherBankError(f"teacher bank: batch_size must be >= 1, got {batch_size}")
        self.directory = Path(directory).expanduser() if directory is not None else default_bank_directory()
        self.teachers = list(teachers)
        self.teacher_files = [str(f) if f is not None else None for f in teacher_files]
        self.data = data
        self.dataset_name = str(dataset_name)
        self.augmentation = augmentation
        self.seed = int(seed)
        self.top_k = int(top_k) if top_k is not None else None
        self.batch_size = int(batch_size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_samples = len(data)
        self.num_teachers = len(self.teachers)
        self.teacher_digests = [
            file_digest(f) if f is not None else "weights:" + weights_digest(t)
            for t, f in zip(self.teachers, self.teacher_files)
        ]
        self.data_digest = data_digest(data)
        self.identity: dict[str, Any] = {
            "format": BANK_FORMAT,
            "version": BANK_VERSION,
            "teachers": self.teacher_digests,
            "dataset": self.dataset_name,
            "data": self.data_digest,
            "num_samples": self.num_samples,
            "augmentation": augmentation_description(augmentation),
            "seed": self.seed,
            "top_k": self.top_k,
        }
        self.key = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()
        self.path = self.directory / self.key
        self.num_classes: int | None = self._metadata_classes()
        self._loaded_name: str | None = None
        self._table: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ files
    @property
    def is_static(self) -> bool:
        """True when the augmentation is not random: every epoch has the same logits (one file)."""
        return self.augmentation is None or not self.augmentation.is_random

    def epoch_file(self, epoch: int) -> Path:
        """The file holding ``epoch``'s logits."""
        if self.is_static:
            return self.path / STATIC_NAME
        if epoch < 0:
            raise TeacherBankError(f"teacher bank: epoch must be >= 0, got {epoch}")
        return self.path / f"epoch-{int(epoch):04d}.pt"

    def has_epoch(self, epoch: int) -> bool:
        return self.epoch_file(epoch).is_file()

    def stored_epochs(self) -> list[int]:
        """Epochs with a file in the bank (for a static bank: [] or [-1] meaning "every epoch")."""
        if not self.path.is_dir():
            return []
        if self.is_static:
            return [-1] if (self.path / STATIC_NAME).is_file() else []
        epochs = []
        for file in self.path.glob("epoch-*.pt"):
            try:
                epochs.append(int(file.stem.split("-", 1)[1]))
            except ValueError:
                continue
        return sorted(epochs)

    @property
    def storage(self) -> str:
        return "top-k" if self.top_k is not None else "full"

    def bytes_per_epoch(self) -> int | None:
        """Approximate size of one epoch file (None until the class count is known)."""
        if self.num_classes is None:
            return None
        n, k, c = self.num_samples, self.num_teachers, self.num_classes
        if self.top_k is None or self.top_k >= c:
            return n * k * c * 2
        return n * k * (self.top_k * (2 + _index_dtype(c).itemsize) + 2)

    # ------------------------------------------------------------------ compute
    def ensure_epoch(self, epoch: int) -> None:
        """Compute and store ``epoch``'s logits unless the bank already has them."""
        if self.has_epoch(epoch):
            return
        table = self._compute(epoch)
        target = self.epoch_file(epoch)
        record = {
            "format": BANK_FORMAT,
            "version": BANK_VERSION,
            "key": self.key,
            "epoch": -1 if self.is_static else int(epoch),
            "num_samples": self.num_samples,
            "num_teachers": self.num_teachers,
            "num_classes": int(self.num_classes),  # type: ignore[arg-type]
            "storage": table_storage(table),
            **table,
        }
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_save(record, target)
        except OSError as exc:
            raise TeacherBankError(
                f"teacher bank: cannot write '{target}' ({exc.strerror or exc}); make '{self.directory}' "
                "writable or set teacher_bank.directory (or $KDFORGE_BANK) to a writable folder"
            ) from None
        self._write_metadata()
        self._loaded_name = target.name
        self._table = {name: tensor.to(self.device) for name, tensor in table.items()}

    def precompute(self, epochs: int, progress: bool = False) -> None:
        """``ensure_epoch`` for epochs 0..epochs-1 (one computation in all for a static bank)."""
        wanted = range(1 if self.is_static else int(epochs))
        if progress:
            from tqdm.auto import tqdm

            wanted = tqdm(wanted, desc="teacher bank", unit="epoch")
        for epoch in wanted:
            self.ensure_epoch(epoch)

    @torch.inference_mode()
    def _compute(self, epoch: int) -> dict[str, torch.Tensor]:
        """Run every teacher over every sample with (seed, epoch)'s augmentation; CPU tensors."""
        modes = [teacher.training for teacher in self.teachers]
        for teacher in self.teachers:
            teacher.eval()
        try:
            compute_device = _module_device(self.teachers[0])
            n, k = self.num_samples, self.num_teachers
            table: dict[str, torch.Tensor] = {}
            for start in range(0, n, self.batch_size):
                stop = min(start + self.batch_size, n)
                index = torch.arange(start, stop, dtype=torch.int64)
                images = self.data.images[start:stop].to(compute_device)
                inputs = self._transform(images, index.to(compute_device), epoch)
                outputs = []
                for teacher in self.teachers:
                    out = teacher(inputs.to(_module_device(teacher)))
                    if isinstance(out, (tuple, list)):
                        out = out[0]
                    outputs.append(out.to(torch.float32).cpu())
                shapes = {tuple(o.shape) for o in outputs}
                if len(shapes) != 1 or len(outputs[0].shape) != 2:
                    raise TeacherBankError(
                        f"teacher bank: teachers returned logits of shapes {sorted(shapes)}; every teacher "
                        "must return B x C logits for the same C"
                    )
                logits = torch.stack(outputs, dim=1)  # B x K x C, float32
                if not table:
                    classes = logits.shape[-1]
                    if self.num_classes is not None and self.num_classes != classes:
                        raise TeacherBankError(
                            f"teacher bank: '{self.path / METADATA_NAME}' says {self.num_classes} classes but the "
                            f"teachers give {classes}; delete the bank folder '{self.path}'"
                        )
                    self.num_classes = classes
                    table = _allocate(n, k, classes, self.top_k)
                _store(table, slice(start, stop), logits, self.top_k)
            return table
        finally:
            for teacher, mode in zip(self.teachers, modes):
                teacher.train(mode)

    def _transform(self, images: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """Exactly what ``BatchLoader`` does to a training batch."""
        if self.augmentation is None:
            return images.to(torch.float32) if images.is_floating_point() else images.to(torch.float32) / 255.0
        return self.augmentation(images, index, self.seed, epoch, train=True)

    # ------------------------------------------------------------------ replay
    def lookup(self, epoch: int, index: torch.Tensor) -> torch.Tensor:
        """float32 logits K x B x C of the samples at ``index`` (positions in ``data``) in ``epoch``,
        on ``index``'s device. Loads the epoch (computing it if missing) the first time it is asked for."""
        name = self.epoch_file(epoch).name
        if self._loaded_name != name:
            self._load(epoch)
        table = self._table
        rows = index.to(self.device, dtype=torch.int64)
        if "logits" in table:
            picked = table["logits"].index_select(0, rows).to(torch.float32)
        else:
            picked = reconstruct_top_k(
                table["values"].index_select(0, rows),
                table["indices"].index_select(0, rows),
                table["tail"].index_select(0, rows),
                int(self.num_classes),  # type: ignore[arg-type]
            )
        return picked.transpose(0, 1).contiguous().to(index.device)

    def raw(self, epoch: int) -> dict[str, torch.Tensor]:
        """The stored tensors of ``epoch`` as saved: ``logits`` (N x K x C float16), or ``values``,
        ``indices`` (N x K x k) and ``tail`` (N x K) in the top-k form."""
        if self._loaded_name != self.epoch_file(epoch).name:
            self._load(epoch)
        return dict(self._table)

    def _load(self, epoch: int) -> None:
        if not self.has_epoch(epoch):
            self.ensure_epoch(epoch)  # leaves the freshly computed epoch loaded
            return
        path = self.epoch_file(epoch)
        fix = f"delete the bank folder '{self.path}' (it is recomputed on the next run)"
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
        except PermissionError as exc:
            raise TeacherBankError(
                f"teacher bank: cannot read '{path}' ({exc.strerror}); make it readable or {fix}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
            raise TeacherBankError(
                f"teacher bank: '{path}' is corrupt or not a bank file ({type(exc).__name__}); {fix}"
            ) from None
        problem = self._check(record, epoch)
        if problem:
            raise TeacherBankError(f"teacher bank: '{path}' {problem}; {fix}")
        self.num_classes = int(record["num_classes"])
        names = ("logits",) if record["storage"] == "full" else ("values", "indices", "tail")
        self._table = {name: record[name].to(self.device) for name in names}
        self._loaded_name = path.name

    def _check(self, record: Any, epoch: int) -> str | None:
        """What is wrong with a loaded epoch record, or None."""
        if not isinstance(record, dict) or record.get("format") != BANK_FORMAT:
            return "is not a teacher bank file"
        if record.get("version") != BANK_VERSION:
            return f"has format version {record.get('version')}, this kdforge reads {BANK_VERSION}"
        if record.get("key") != self.key:
            return "belongs to another bank (its key differs from the folder's)"
        expected_epoch = -1 if self.is_static else int(epoch)
        if record.get("epoch") != expected_epoch:
            return f"holds epoch {record.get('epoch')}, expected {expected_epoch}"
        n, k, c = record.get("num_samples"), record.get("num_teachers"), record.get("num_classes")
        if n != self.num_samples or k != self.num_teachers:
            return f"holds N={n}, K={k} but the run has N={self.num_samples}, K={self.num_teachers}"
        if not isinstance(c, int) or c < 1 or (self.num_classes is not None and c != self.num_classes):
            return f"holds C={c} but the bank has C={self.num_classes}"
        storage = record.get("storage")
        if storage == "full":
            shapes = {"logits": ((n, k, c), (torch.float16,))}
        elif storage == "top-k" and self.top_k is not None and self.top_k < c:
            top = self.top_k
            shapes = {
                "values": ((n, k, top), (torch.float16,)),
                "indices": ((n, k, top), (torch.int16, torch.int32)),
                "tail": ((n, k), (torch.float16,)),
            }
        else:
            return f"has storage '{storage}', expected {self.storage} (top_k={self.top_k})"
        for name, (shape, dtypes) in shapes.items():
            tensor = record.get(name)
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape or tensor.dtype not in dtypes:
                got = (
                    f"{tensor.dtype} {tuple(tensor.shape)}"
                    if isinstance(tensor, torch.Tensor)
                    else type(tensor).__name__
                )
                return f"has '{name}' {got}, expected {dtypes[0]} {shape}"
        if storage == "top-k":
            indices = record["indices"]
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= c):
                return f"has class indices outside 0..{c - 1}"
        return None

    # ------------------------------------------------------------------ metadata
    def metadata(self) -> dict[str, Any]:
        """What ``metadata.json`` holds (``created`` is kept from an existing file)."""
        return {
            "format": BANK_FORMAT,
            "version": BANK_VERSION,
            "key": self.key,
            "teachers": [{"file": f, "digest": d} for f, d in zip(self.teacher_files, self.teacher_digests)],
            "dataset": self.dataset_name,
            "data_digest": self.data_digest,
            "num_samples": self.num_samples,
            "num_teachers": self.num_teachers,
            "num_classes": self.num_classes,
            "seed": self.seed,
            "augmentation": augmentation_description(self.augmentation),
            "top_k": self.top_k,
            "storage": self.storage,
            "static": self.is_static,
            "epochs": self.stored_epochs() if not self.is_static else "all" if self.stored_epochs() else [],
            "bytes_per_epoch": self.bytes_per_epoch(),
        }

    def _read_metadata(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / METADATA_NAME).read_text())
        except (OSError, ValueError):
            return None

    def _metadata_classes(self) -> int | None:
        saved = self._read_metadata()
        classes = saved.get("num_classes") if isinstance(saved, dict) else None
        return classes if isinstance(classes, int) and classes > 0 else None

    def _write_metadata(self) -> None:
        """Rewrite metadata.json atomically; the epoch list is re-read from the folder every time."""
        saved = self._read_metadata() or {}
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        meta = {**self.metadata(), "created": saved.get("created", now), "updated": now}
        target = self.path / METADATA_NAME
        try:
            atomic_write_text(json.dumps(meta, indent=2) + "\n", target)
        except OSError as exc:
            raise TeacherBankError(
                f"teacher bank: cannot write '{target}' ({exc.strerror or exc}); make '{self.directory}' "
                "writable or set teacher_bank.directory (or $KDFORGE_BANK) to a writable folder"
            ) from None

    def __repr__(self) -> str:
        return (
            f"TeacherBank({self.path}, K={self.num_teachers}, N={self.num_samples}, C={self.num_classes}, "
            f"{self.storage}, epochs={self.stored_epochs()})"
        )


# ---------------------------------------------------------------------- storage helpers
def _index_dtype(num_classes: int) -> torch.dtype:
    return torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def table_storage(table: dict[str, torch.Tensor]) -> str:
    return "full" if "logits" in table else "top-k"


def _allocate(n: int, k: int, classes: int, top_k: int | None) -> dict[str, torch.Tensor]:
    if top_k is None or top_k >= classes:
        return {"logits": torch.empty(n, k, classes, dtype=torch.float16)}
    return {
        "values": torch.empty(n, k, top_k, dtype=torch.float16),
        "indices": torch.empty(n, k, top_k, dtype=_index_dtype(classes)),
        "tail": torch.empty(n, k, dtype=torch.float16),
    }


def _to_half(tensor: torch.Tensor) -> torch.Tensor:
    half = tensor.to(torch.float16)
    if not torch.isfinite(half).all():
        worst = float(tensor.abs().max())
        raise TeacherBankError(
            f"teacher bank: a teacher's logits ({worst:.3g}) do not fit float16 (max 65504); "
            "check the teacher checkpoint or disable teacher_bank"
        )
    return half


def _store(table: dict[str, torch.Tensor], rows: slice, logits: torch.Tensor, top_k: int | None) -> None:
    if "logits" in table:
        table["logits"][rows] = _to_half(logits)
        return
    values, indices, tail = top_k_form(logits, top_k)  # type: ignore[arg-type]
    table["values"][rows] = _to_half(values)
    table["indices"][rows] = indices.to(table["indices"].dtype)
    table["tail"][rows] = _to_half(tail)

"""Output folders checked before any work, and file-system errors as one line.

``ensure_writable_dir`` runs before a run loads its data: a ``--out`` that names an existing
file, a folder under a file, a read-only or permission-denied location fails in one line at
once instead of with a traceback after minutes of loading. ``storage_message`` turns an
``OSError`` met while saving (ENOSPC: disk full, EACCES, EROFS, ...) into one line.
``remove_stale_temps`` deletes the temporary files an atomic write leaves behind when its
process is killed (``kill -9``) between creating and renaming them.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from kdforge.core.errors import StorageError

#: atomic writes create ``.<name>.<random>.tmp`` beside their target (kdforge.core.checkpoint)
TEMP_GLOB = ".*.tmp"


def storage_message(exc: OSError, path: str | Path, doing: str = "write") -> str:
    """One line for an OSError: what failed, why, and what to do."""
    code = exc.errno
    if code == errno.ENOSPC or code == errno.EDQUOT:
        why, fix = "no space left on the device", "free disk space (or choose another --out), then resume with --resume"
    elif code in (errno.EACCES, errno.EPERM):
        why, fix = "permission denied", "choose a writable --out or fix the folder's permissions"
    elif code == errno.EROFS:
        why, fix = "the file system is read-only", "choose a writable --out"
    elif code in (errno.ENOTDIR, errno.EEXIST):
        why, fix = "a part of the path is a file, not a folder", "choose a folder path for --out"
    else:
        why, fix = exc.strerror or type(exc).__name__, "check the path and the disk"
    return f"cannot {doing} '{path}': {why}; {fix}"


def ensure_writable_dir(path: str | Path, what: str = "run directory") -> Path:
    """Create ``path`` if needed and prove that a file can be written there, or raise StorageError."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StorageError(f"{what} '{path}' is an existing file, not a folder; choose a folder path for --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StorageError(
            f"cannot create {what} '{path}': a part of the path is a file, not a folder; choose a folder path for --out"
        ) from None
    except OSError as exc:
        raise StorageError(storage_message(exc, path, f"create {what}")) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".kdforge-probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StorageError(storage_message(exc, path, f"write into {what}")) from None
    return path


def remove_stale_temps(*folders: str | Path) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes in ``folders`` (not recursive).

    Call it only while holding the folder's run lock: a live writer's temporary file would
    otherwise be removed under it."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for file in folder.glob(TEMP_GLOB):
            if file.is_file():
                try:
                    file.unlink()
                    removed.append(file)
                except OSError:
                    pass
    return removed


__all__ = ["TEMP_GLOB", "ensure_writable_dir", "remove_stale_temps", "storage_message"]

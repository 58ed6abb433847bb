"""One writer per run directory (and per suite folder).

``RunLock(folder)`` holds an exclusive ``flock`` on ``folder/.kdforge.lock`` for as long as the
process works there, and writes who holds it (pid, host, command, start time) into the file. A
second ``kdforge train`` or ``kdforge bench`` on the same folder gets one line naming the holder and
exits non-zero instead of interleaving its writes with the first. The kernel releases the lock
when the holder dies, even by ``kill -9``, so a stale lock of a dead process is taken over without
any clean-up. (On a file system without ``flock`` support the lock is skipped with a warning.)
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from kdforge.core.errors import KDForgeError

LOCK_NAME = ".kdforge.lock"

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class RunLockedError(KDForgeError):
    """Another live process works in this folder."""


class RunLock:
    """Exclusive lock on a run directory or suite folder; a context manager."""

    def __init__(self, folder: str | Path, what: str = "run directory") -> None:
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_NAME
        self._file: Any = None

    def holder(self) -> dict[str, Any]:
        """What the lock file says about its holder (empty when unreadable)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        if self._file is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        if fcntl is None:
            warnings.warn("no flock on this platform: the run directory is not locked", stacklevel=2)
            self._file = handle
            return self
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            info = self.holder()
            who = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"
            since = f", since {info['started']}" if info.get("started") else ""
            command = f" ({info['command']})" if info.get("command") else ""
            raise RunLockedError(
                f"{self.what} '{self.folder}' is in use by {who}{command}{since}; wait for it to finish, "
                "stop it, or choose another --out"
            ) from None
        except OSError as exc:  # e.g. a network file system without flock
            warnings.warn(f"cannot lock '{self.path}' ({exc}); continuing without a lock", stacklevel=2)
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:300],
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
            )
        )
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        """Drop the lock (the lock file stays: removing it would race with a new holder)."""
        if self._file is None:
            return
        try:
            if fcntl is not None:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        finally:
            self._file.close()
            self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]

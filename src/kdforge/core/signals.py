"""Signals handled at safe points, and processes that die with their parent.

``StopFlag`` turns SIGTERM into a flag that the training loop checks between steps; inside
``deferred()`` (while a checkpoint, model file or summary is being written) Ctrl-C waits too.
The loop then stops with the last finished epoch as its resume point, so a ``kill`` never
lands in the middle of ``torch.save``.

``die_with_parent`` makes a child process (a suite's training run, a NoNN device) stop when the
process that started it dies, even by ``kill -9``: on Linux the kernel sends it SIGTERM
(``prctl(PR_SET_PDEATHSIG)``), and everywhere a watcher thread polls the parent's pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

#: the environment variable through which a parent asks its child to die with it (its pid)
PARENT_ENV = "KDFORGE_PARENT_PID"


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class StopFlag:
    """SIGTERM sets ``requested``; ``check()`` raises KeyboardInterrupt at a safe point."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: Any = None

    def _set(self, signum: int, frame: Any) -> None:
        self.requested = signum

    def __enter__(self) -> StopFlag:
        if _main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._set)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def check(self) -> None:
        if self.requested is not None:
            self.requested = None
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self, check: bool = True) -> Iterator[None]:
        """SIGINT and SIGTERM only set the flag inside; with ``check``, a deferred signal stops
        the run right after the block."""
        previous = {}
        if _main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, self._set)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if check:
            self.check()


def die_with_parent(parent: int | None = None, poll_seconds: float = 1.0) -> None:
    """Stop this process (SIGTERM to itself: a run saves its state as interrupted) when
    ``parent`` (default: $KDFORGE_PARENT_PID) dies."""
    if parent is None:
        text = os.environ.pop(PARENT_ENV, "")  # not inherited by this process's own children
        if not text.isdigit():
            return
        parent = int(text)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            # a DDP rank that Fabric started (LOCAL_RANK > 0) may sit in a blocking collective or
            # rendezvous where no Python handler runs, and rank 0 owns the run's files: it is killed
            rank_child = os.environ.get("LOCAL_RANK", "0") not in ("", "0")
            libc.prctl(1, int(signal.SIGKILL if rank_child else signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
        return

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30.0)  # a graceful stop gets 30 s; then nothing stops a kill
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="kdforge-die-with-parent", daemon=True).start()


__all__ = ["PARENT_ENV", "StopFlag", "die_with_parent"]

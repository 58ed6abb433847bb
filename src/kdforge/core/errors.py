"""Errors meant for people: one line that names the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KDForgeError(Exception):
    """Base class for every error kdforge raises on purpose.

    The CLI prints these as a single line (no traceback); the message must say what is wrong
    and how to fix it.
    """


class ConfigError(KDForgeError, ValueError):
    """A recipe, override or argument has an unknown key or a bad value."""


class DataError(KDForgeError, FileNotFoundError):
    """A dataset is missing, incomplete or malformed."""


class CheckpointError(KDForgeError, ValueError):
    """A checkpoint does not fit the model it is loaded into."""


def closest(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


class StorageError(KDForgeError, OSError):
    """A file or folder cannot be written: not a folder, no permission, read-only, disk full."""

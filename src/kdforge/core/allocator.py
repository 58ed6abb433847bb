"""The C allocator's settings for CPU training (glibc on Linux).

A CPU training step allocates and frees the same large blocks every step: activations, their
gradients, the teacher's outputs, each a few MiB to tens of MiB. glibc serves blocks above its
mmap threshold (128 KiB at start, raised dynamically up to 32 MiB) with fresh ``mmap`` calls and
returns the memory to the kernel on ``free`` (and trims the heap's top above a threshold), so the
next step touches brand-new pages: every 4 KiB page costs a minor page fault and the kernel
zeroes it. On resnet20 -> resnet8 KD at batch 128 this is about 62,000 page faults per step
(resnet32x4 -> resnet8x4 at batch 64: 123,000); end to end, keeping the memory made live KD 11.8%
faster and cut the CPU per training image by 16-17% (``benchmarks/end_to_end.py``,
``benchmarks/allocator.py``).

:func:`tune_allocator` keeps freed memory in the process instead: no ``mmap`` for allocations
(``M_MMAP_MAX = 0``, so large blocks come from the heap and are reused) and no trimming of the
heap's top below 1 GiB of free memory (``M_TRIM_THRESHOLD``). The process keeps its peak memory
for reuse rather than handing it back between steps (resnet32x4 -> resnet8x4 KD: 0 page faults
per step, peak resident memory 824 MiB against 732 MiB). This is what replacing the allocator with jemalloc or
tcmalloc (the usual advice for PyTorch on CPUs) achieves, without an ``LD_PRELOAD``. Settings
apply to the whole process and to allocations made after the call.

Anything but glibc (macOS, Windows, musl) is left alone and reported as such.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30

_applied: dict[str, Any] | None = None


def _glibc() -> tuple[Any, str] | None:
    """glibc and its version, or None on any other C library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):  # musl and friends have no gnu_get_libc_version
        return None
    version.restype = ctypes.c_char_p
    return libc, version().decode()


def tune_allocator(setting: str = "auto", device_type: str = "cpu") -> dict[str, Any]:
    """Apply the allocator settings for a run (``train.allocator``); returns the record written to
    summary.json: ``{"tuned": bool, "reason": str, ...}``.

    ``auto`` tunes glibc's allocator for a CPU run; ``system`` leaves it as it is. Once applied in
    a process the settings stay (they are process-wide); a later call reports them again.
    """
    global _applied
    if setting == "system":
        if _applied is not None:
            return {**_applied, "reason": f"{_applied['reason']} (applied earlier in this process)"}
        return {"tuned": False, "reason": "train.allocator: system"}
    if _applied is not None:
        return _applied
    if device_type != "cpu":
        return {"tuned": False, "reason": f"auto: training on {device_type}; host allocations are not the hot path"}
    found = _glibc()
    if found is None:
        return {"tuned": False, "reason": "auto: not glibc (the system allocator is kept)"}
    libc, version = found
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not ok:
        return {"tuned": False, "reason": f"auto: glibc {version} refused mallopt"}
    _applied = {
        "tuned": True,
        "reason": f"auto: glibc {version}; freed memory is kept for reuse (no mmap, heap trimmed above 1 GiB free)",
        "mallopt": {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": TRIM_THRESHOLD_BYTES},
    }
    return _applied


__all__ = ["tune_allocator"]

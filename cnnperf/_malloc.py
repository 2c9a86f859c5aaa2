"""glibc malloc's dynamic mmap threshold, a source of drift in CPU step times, and how a benchmark fixes it.

glibc serves allocations above its mmap threshold (128 KiB at start) with fresh mmap'd pages, and raises the
threshold to the size of each such block freed (up to 32 MiB on 64-bit). A training step allocates and frees the
same activations every step, so whether they come from fresh pages (page faults, zeroing) or from the heap
depends on the process's allocation history, and so does the step time: on this 2-core CPU the digits ConvNet's
bf16 + channels_last step took 12-14 ms in some processes and 6-10 ms with the threshold fixed, and a kept copy
of it 12 ms where a fresh copy in the same process, later, took 8 ms. Setting any of the thresholds (mallopt, or
the MALLOC_*_ environment variables) turns the adjustment off, and both are needed: the mmap threshold alone
gave 10.5-12.7 ms (freed heap went back to the system after each step), the trim threshold alone 17.7-18.6 ms
(every activation from fresh pages), both 8.4-8.7 ms. Imports only the standard library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap instead of returning it to the system after each step
_FIXED_BY = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


@functools.cache
def _glibc():
    """The C library if it is glibc (it has mallopt and gnu_get_libc_version), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def dynamic_mmap_threshold() -> bool:
    """Whether this process runs glibc malloc with its dynamic mmap threshold: glibc, no threshold set in the
    environment (MALLOC_*_ or GLIBC_TUNABLES glibc.malloc.*) or by :func:`fix_mmap_threshold`, no other
    allocator preloaded."""
    if _fixed or _glibc() is None or any(os.environ.get(v) for v in _FIXED_BY):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    return not any(a in os.environ.get("LD_PRELOAD", "") for a in _OTHER_ALLOCATORS)


ENVIRONMENT = f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} MALLOC_TRIM_THRESHOLD_={TRIM_THRESHOLD}"
_fixed = False


def fix_mmap_threshold() -> dict | None:
    """Fix glibc's mmap threshold (MMAP_THRESHOLD) and trim threshold (TRIM_THRESHOLD) for the rest of the
    process, as benchmarks do before they time CPU steps; what was set, or None where the adjustment is not on
    (not glibc, or already fixed). Not undoable: a benchmark's own process calls it, never a library."""
    global _fixed
    if not dynamic_mmap_threshold():
        return None
    libc = _glibc()
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return None
    _fixed = True
    return {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD, "how": "mallopt"}

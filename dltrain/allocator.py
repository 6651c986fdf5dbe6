"""Host memory allocator settings that CPU training needs to run at full speed.

glibc's malloc serves blocks above a threshold (128 KiB at start, raised dynamically only after a
large block is freed) straight from mmap and returns them to the kernel on free, so every step
page-faults its activations and gradients back in (a fresh, zeroed page per 4 KiB). For the MNIST
CNN on a CPU that is millions of minor faults a run. Keeping blocks up to 32 MiB on the heap and
not trimming it after each step removes most of them. Set once per process, before training, by
the command line (`dltrain train`, the bench harness), not by the library (dltrain.train);
`DLTRAIN_MALLOC_TUNING=0` leaves the allocator alone, and a user's own MALLOC_*_ variables or
glibc.malloc tunables (or a preloaded jemalloc/tcmalloc) win.
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling for this setting on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024
# The same settings as environment variables, read by glibc at process start: what the benchmark
# harness gives the baseline loops so that dltrain's ratio to them measures the loop, not malloc.
ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>

_applied: str | None = None


def describe_env(env: dict[str, str] | None = None) -> str | None:
    """What a user set themselves, if anything (then dltrain does not touch the allocator)."""
    env = os.environ if env is None else env
    preload = env.get("LD_PRELOAD", "")
    for lib in ("jemalloc", "tcmalloc", "mimalloc"):
        if lib in preload:
            return f"{lib} (LD_PRELOAD)"
    own = sorted(k for k in env if k.startswith("MALLOC_") and k.endswith("_"))
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        own.append("GLIBC_TUNABLES")
    return f"glibc, user settings {', '.join(f'{k}={env[k]}' for k in own)}" if own else None


def tune() -> str:
    """Apply the settings once; returns what the process runs with (recorded in summary.json)."""
    global _applied
    if _applied is None:
        _applied = _tune()
    return _applied


def current() -> str:
    """What the process runs with, changing nothing: the command line tunes the allocator, the
    library (dltrain.train) leaves it to the program that calls it."""
    return _applied or describe_env() or "system default (not tuned: called as a library)"


def _tune() -> str:
    user = describe_env()
    if user:
        return user
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "system default"
    if os.environ.get("DLTRAIN_MALLOC_TUNING", "1") == "0":
        return "glibc default (DLTRAIN_MALLOC_TUNING=0)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = (
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        )
    except (OSError, AttributeError):
        ok = False
    if not ok:
        return "glibc default (mallopt refused)"
    return f"glibc, mmap_threshold {MMAP_THRESHOLD >> 20} MiB, trim_threshold {TRIM_THRESHOLD >> 20} MiB (dltrain)"

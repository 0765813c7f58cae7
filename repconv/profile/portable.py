"""Host facts and CPU memory measurement that need nothing beyond the standard library.

Shipped verbatim (as ``repconv_portable.py``) in deployment bundles next to ``stats.py``, so a target
device reports CPU names and peak memory exactly the way ``repconv profile`` does locally."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import sys
from collections.abc import Callable

_STATUS = "/proc/self/status"


def cpu_model() -> str:
    """Human-readable CPU name (``/proc/cpuinfo`` on Linux; ``platform`` elsewhere)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (respects affinity / cpusets, unlike os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _status_kb(key: str) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kb() -> int | None:
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB elsewhere


def _trim_heap() -> None:
    """Give memory freed earlier back to the OS (glibc), so the next allocations show up as RSS growth.

    Without it, a model run after another one reuses the first one's freed pages and looks free."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def cpu_peak_growth_mb(fn: Callable[[], object], repeats: int = 2) -> float | None:
    """How far the process's peak RSS rises above its current RSS while ``fn`` runs ``repeats`` times.

    Approximate by nature: freed heap memory is trimmed first so earlier runs do not mask this one,
    but pools kept across calls (allocator arenas, kernel caches) only show when they grow. Without a
    resettable peak (non-Linux) it is only meaningful if this is the largest footprint so far; None
    when nothing can be read."""
    gc.collect()
    _trim_heap()
    resettable = _reset_peak_rss()
    base_kb = _status_kb("VmRSS") if resettable else _peak_rss_kb()
    if base_kb is None:
        return None
    for _ in range(repeats):
        fn()
    peak_kb = _peak_rss_kb()
    return None if peak_kb is None else max(0, peak_kb - base_kb) / 1024

"""What a latency number depends on besides the model: the machine, its libraries and settings."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
from collections.abc import Iterator
from typing import Any

import torch

from repconv.profile.portable import cpu_model, usable_cores


def cuda_available() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)


def ort_version() -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return str(ort.__version__)


def machine_info(*, device: str = "cpu", threads: int | None = None,
                 flush_denormal: bool | None = None) -> dict[str, Any]:
    """The ``machine`` block of the JSON report."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": ort_version(),
        "device": device,
        "gpu": None,
        "cuda": torch.version.cuda,
        "flush_denormal": flush_denormal,
        "load_avg_1m": load_average(),
    }
    if device.startswith("cuda") and cuda_available():
        idx = torch.device(device).index or 0
        info["gpu"] = torch.cuda.get_device_name(idx)
    return info


def load_average() -> float | None:
    """1-minute system load average (None where the OS has none): other work competing for the CPU."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def busy_note(info: dict[str, Any]) -> str | None:
    """A warning when other processes already kept the cores busy before the measurement started."""
    load, cores = info.get("load_avg_1m"), info.get("usable_cores") or 1
    if load is None or load < 0.75 * cores:
        return None
    return (f"system load average {load:.1f} on {cores} usable cores before measuring: other processes compete "
            "for the CPU, so tails (p90/p99) and multi-threaded latency are inflated; medians and the paired "
            "ratios are the robust figures")


def machine_label(info: dict[str, Any]) -> str:
    """Short one-line description used in table titles and as the source of imported rows."""
    parts = [str(info.get("hostname") or "?"), str(info.get("cpu_model") or "?")]
    if info.get("gpu"):
        parts.append(str(info["gpu"]))
    return " / ".join(parts)


@contextlib.contextmanager
def cpu_settings(threads: int | None, flush_denormal: bool) -> Iterator[int]:
    """Apply thread count and denormal flushing for the measurement; restore afterwards.

    Denormals: float ops on subnormal numbers can be 10-100x slower on x86; trained weights and
    activations near zero produce them and make latency data-dependent. Flushing them to zero is
    what deployment runtimes usually do, so numbers are measured that way (and say so)."""
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    if flush_denormal:
        torch.set_flush_denormal(True)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
        if flush_denormal:
            torch.set_flush_denormal(False)

"""Latency measurement before and after fusion: torch, torch.compile, ONNX Runtime; CPU and CUDA.

* :func:`profile_model` - time a model and its fused form (or another model) side by side,
  interleaved, on several runtimes and batch sizes; returns a :class:`ProfileReport`.
* :func:`write_report` / :func:`load_report` - the JSON form (``repconv profile --json`` / ``--import``).
* :func:`compare_to_baseline` - flag medians that moved beyond the baseline's noise.
* :func:`write_bundle` - a self-contained folder to benchmark an ONNX model on a target device.

Names are imported lazily so that ``repconv.profile.stats`` stays importable without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "profile_model": "repconv.profile.core",
    "ProfileReport": "repconv.profile.core",
    "Result": "repconv.profile.core",
    "Comparison": "repconv.profile.core",
    "ProfileError": "repconv.profile.runtimes",
    "MeasurementError": "repconv.profile.runtimes",
    "RUNTIMES": "repconv.profile.runtimes",
    "write_report": "repconv.profile.report",
    "load_report": "repconv.profile.report",
    "compare_to_baseline": "repconv.profile.report",
    "write_bundle": "repconv.profile.bundle",
    "BundleError": "repconv.profile.bundle",
    "plot_latency": "repconv.profile.plot",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'repconv.profile' has no attribute {name!r}")

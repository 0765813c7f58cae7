"""ONNX export: :func:`export_onnx`, the ``ai.repconv::Involution`` op (function, translation) and its forms.

Submodules load lazily so ``import repconv.export.involution_onnx`` stays free of torch's exporter.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_onnx": "repconv.export.onnx",
    "export_onnx_with_report": "repconv.export.onnx",
    "ExportReport": "repconv.export.onnx",
    "TARGETS": "repconv.export.forms",
    "DEFAULT_TARGET": "repconv.export.forms",
    "EXPORTERS": "repconv.export.capture",
    "DEFAULT_EXPORTER": "repconv.export.capture",
    "apply_target": "repconv.export.forms",
    "expand_involutions": "repconv.export.forms",
    "ExportError": "repconv.export.errors",
    "ExportCheckError": "repconv.export.errors",
    "DataDependentError": "repconv.export.errors",
    "UnsupportedOperatorError": "repconv.export.errors",
    "rewrite_involutions": "repconv.export.patterns",
    "InvolutionMatch": "repconv.export.patterns",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'repconv.export' has no attribute {name!r}")

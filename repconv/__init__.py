"""repconv: fuse, verify, export and profile re-parameterizable PyTorch vision models.

Public API (imported lazily so ``import repconv`` stays cheap):

* :func:`fuse` - collapse every exactly-fusable linear region into single convs / linears.
* :func:`verify` - compare two models numerically; :class:`VerificationError` on mismatch.
* :func:`fuse_with_report` - :func:`fuse` plus what was fused, what was left and why.
* :func:`export_onnx` - fuse, export to ONNX (standard ops by default; ``target="onnxruntime"`` keeps the
  custom ``ai.repconv::Involution`` op), simplify, check in ONNX Runtime on several inputs.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "fuse": "repconv.pipeline",
    "fuse_with_report": "repconv.pipeline",
    "FuseReport": "repconv.graph",
    "verify": "repconv.verification",
    "VerifyReport": "repconv.verification",
    "VerificationError": "repconv.verification",
    "FusionRefused": "repconv.algebra",
    "export_onnx": "repconv.export.onnx",
    "load_model": "repconv.io",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'repconv' has no attribute {name!r}")

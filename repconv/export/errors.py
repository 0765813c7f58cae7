"""The exceptions :func:`repconv.export_onnx` raises (one-line messages; the CLI maps them to exit codes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from repconv.export.control_flow import ControlFlowSite

__all__ = ["ExportError", "UnsupportedOperatorError", "DataDependentError", "ExportCheckError"]


class ExportError(RuntimeError):
    """The model cannot be exported (bad input, untraceable code); one-line message."""


class UnsupportedOperatorError(ExportError):
    """An operator has no ONNX translation; ``op`` and ``module`` say which and where."""

    def __init__(self, message: str, op: str, module: str | None) -> None:
        super().__init__(message)
        self.op = op
        self.module = module


class DataDependentError(ExportError):
    """Python control flow reads tensor data: the file would hold only the branch the example took.

    ``sites`` names the module and line of each place found (the first one for torch.export, which
    stops there). ``export_onnx(..., allow_specialize=True)`` exports anyway and reports them."""

    def __init__(self, message: str, sites: Sequence[ControlFlowSite]) -> None:
        super().__init__(message)
        self.sites = list(sites)


class ExportCheckError(ExportError):
    """The exported model does not reproduce PyTorch in ONNX Runtime (or is not valid ONNX)."""

    def __init__(self, message: str, checks: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.checks = list(checks)

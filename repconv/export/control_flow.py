"""Where a model's Python code made a data-dependent decision that an export would bake in.

Both exporters run the model's Python once. An ``if`` on tensor *data* (``if x.mean() > 0``,
``float(t)``, ``t.item()``, ``t.tolist()``) then keeps only the branch that one input takes:

* the TorchScript tracer warns (``TracerWarning``) and records a constant; repconv turns the warning
  into an error raised at the user's line;
* ``torch.export`` raises ``GuardOnDataDependentSymNode`` (or a ``UserError`` about a
  data-dependent expression) from the user's line.

Either way the Python traceback runs through the user's ``forward``: :func:`site_from_exception`
names the module (path in the model and class) and the line. :func:`site_from_location` does the
same for a recorded warning (file and line only), for ``--allow-specialize`` reports.
"""

from __future__ import annotations

import inspect
import linecache
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import torch
from torch import nn

__all__ = ["ControlFlowSite", "exception_chain", "is_data_dependent", "site_from_exception", "site_from_location"]

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_STDLIB_DIR = str(Path(os.__file__).resolve().parent)
_EXPORT_DIR = str(Path(__file__).resolve().parent)


@dataclass(frozen=True)
class ControlFlowSite:
    """One place where Python code read tensor data to decide something."""

    module: str  # "path (Class)" in the exported model, or "" when no module's forward holds the line
    filename: str
    lineno: int
    code: str

    def __str__(self) -> str:
        where = f"module {self.module}" if self.module else "the model's code"
        code = f" (`{self.code}`)" if self.code else ""
        return f"{where} at {self.filename}:{self.lineno}{code}"


_DATA_DEPENDENT_MARKERS = ("data-dependent", "data dependent", "GuardOnDataDependentSymNode")


def is_data_dependent(exc: BaseException) -> bool:
    """Does ``exc`` (or anything it was raised from) say torch.export met a data-dependent value?"""
    for e in exception_chain(exc):
        if type(e).__name__ == "GuardOnDataDependentSymNode":
            return True
        if isinstance(e, torch.jit.TracerWarning):
            return True
        if any(m in str(e) for m in _DATA_DEPENDENT_MARKERS):
            return True
    return False


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from (``__cause__``, else ``__context__``), outermost first."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _is_user_file(filename: str) -> bool:
    try:
        path = str(Path(filename).resolve())
    except (OSError, ValueError):
        return True
    return not (path.startswith(_TORCH_DIR) or path.startswith(_STDLIB_DIR) or path.startswith(_EXPORT_DIR)
                or "site-packages/onnxscript" in path or "site-packages/onnx/" in path)


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): f"{name or '<model>'} ({type(m).__name__})" for name, m in model.named_modules()}


def site_from_exception(exc: BaseException, model: nn.Module) -> ControlFlowSite | None:
    """The innermost user-code frame of ``exc``'s traceback (any exception in its chain)."""
    names = _module_names(model)
    for e in exception_chain(exc):
        frames: list[tuple[FrameType, int]] = list(traceback.walk_tb(e.__traceback__))
        user = [(f, line) for f, line in frames if _is_user_file(f.f_code.co_filename)]
        if not user:
            continue
        frame, lineno = user[-1]
        module = ""
        for f, _ in reversed(frames[: frames.index((frame, lineno)) + 1]):
            owner = f.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in names:
                module = names[id(owner)]
                break
        filename = frame.f_code.co_filename
        return ControlFlowSite(module, filename, lineno, linecache.getline(filename, lineno).strip())
    return None


def site_from_location(filename: str, lineno: int, model: nn.Module) -> ControlFlowSite:
    """A site from a file and line (a recorded warning): the innermost module whose class source holds it."""
    best: tuple[int, str] | None = None
    for name, m in model.named_modules():
        try:
            lines, start = inspect.getsourcelines(type(m))
            src = inspect.getsourcefile(type(m))
        except (OSError, TypeError):
            continue
        if src is None or os.path.abspath(src) != os.path.abspath(filename):
            continue
        if start <= lineno < start + len(lines) and (best is None or len(lines) < best[0]):
            best = (len(lines), f"{name or '<model>'} ({type(m).__name__})")
    return ControlFlowSite(best[1] if best else "", filename, lineno, linecache.getline(filename, lineno).strip())

"""ONNX Runtime integration: the native ``ai.repconv::Involution`` kernel library and session options.

* :func:`native_library` - path of the built custom-op library, or None (not built, stale, or
  disabled with ``REPCONV_NO_NATIVE=1``). Build it with ``python -m repconv.runtime.build`` or
  ``repconv build-native``.
* :func:`session_options` - ``onnxruntime.SessionOptions`` with the library registered when available
  (ORT then runs the native kernel instead of the model-local ``Involution`` function).
* :func:`inference_session` - convenience wrapper creating a CPU ``InferenceSession``.

onnxruntime is imported lazily so ``import repconv.runtime`` stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx
    import onnxruntime

__all__ = ["NativeLibraryMissing", "native_library", "session_options", "inference_session"]


class NativeLibraryMissing(RuntimeError):
    """``native=True`` was requested but the library is not built (or is stale)."""


def native_library() -> Path | None:
    """The built native custom-op library, or None when missing, stale or disabled."""
    if os.environ.get("REPCONV_NO_NATIVE", "").strip() not in ("", "0"):
        return None
    from repconv.runtime import build

    path = build.library_path()
    return path if build.is_current(path) else None


def session_options(native: bool | None = None, *, spinning: bool = True,
                    **options: Any) -> onnxruntime.SessionOptions:
    """``SessionOptions`` with repconv's native kernels registered.

    native: None registers the library when it is built; True requires it (NativeLibraryMissing
    otherwise); False never registers it (models then run through the ONNX function).
    spinning: False stops ORT's idle worker threads from spinning after a run, which otherwise
    steals the cores from whatever runs next (another session, PyTorch) in interleaved timings.
    options: SessionOptions attributes, e.g. ``intra_op_num_threads=1``,
    ``graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL``.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    for key, value in options.items():
        if not hasattr(so, key):
            raise TypeError(f"onnxruntime.SessionOptions has no attribute {key!r}")
        setattr(so, key, value)
    if native is False:
        return so
    lib = native_library()
    if lib is None:
        if native:
            raise NativeLibraryMissing(
                "repconv native ONNX Runtime library is not built (or is stale); run "
                "`python -m repconv.runtime.build` or `repconv build-native`"
            )
        return so
    so.register_custom_ops_library(str(lib))
    return so


def inference_session(
    model: str | os.PathLike[str] | bytes | onnx.ModelProto,
    *,
    native: bool | None = None,
    providers: list[str] | None = None,
    **options: Any,
) -> onnxruntime.InferenceSession:
    """CPU ``InferenceSession`` for a model path / bytes / ModelProto with :func:`session_options`."""
    import onnxruntime as ort

    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    return ort.InferenceSession(
        model, session_options(native, **options), providers=providers or ["CPUExecutionProvider"]
    )

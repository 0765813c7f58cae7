"""Run an exported ONNX file in the runtimes repconv targets, the same way each time (tests, benchmarks).

* ``onnxruntime``: a plain CPU session; ``onnxruntime-native`` registers repconv's native kernel.
* ``openvino``: ``compile_model(..., "CPU", {"INFERENCE_PRECISION_HINT": "f32"})`` - on CPUs with
  bf16 support OpenVINO otherwise computes in bf16 (errors of ~5e-3 that look like export bugs).
* ``tract``: ``tract.onnx().load(path).into_model().into_runnable()`` (tract 0.23's Python API; a
  symbolic batch axis stays symbolic). tract has no thread setting in Python: it runs one thread.
* ``reference``: ``onnx.reference.ReferenceEvaluator`` - pure numpy, slow: small models only.

:func:`load` returns a callable ``feeds -> outputs`` (numpy arrays, in graph-output order).
Where a runtime cannot load a file, :func:`load` raises :class:`RuntimeRefused` with the
runtime's own first line, e.g. OpenVINO's "No conversion rule found for operations:
ai.repconv.Involution" for the onnxruntime form.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

__all__ = ["RUNTIMES", "RuntimeRefused", "available", "load"]

RUNTIMES = ("onnxruntime", "onnxruntime-native", "openvino", "tract", "reference")
Runner = Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]


class RuntimeRefused(RuntimeError):
    """The runtime cannot load (or compile) the file."""


def available(runtime: str) -> bool:
    """Is the runtime's Python package importable (and, for the native kernel, the library built)?"""
    import importlib.util

    if runtime == "onnxruntime-native":
        from repconv import runtime as native

        return native.native_library() is not None
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tract": "tract", "reference": "onnx"}[runtime]
    return importlib.util.find_spec(module) is not None


_TELLING = ("No conversion rule", "Unimplemented", "not supported", "Unsupported", "No Op registered")


def _first_line(e: BaseException) -> str:
    """The line of a runtime's error that names the problem (OpenVINO's first lines name its sources)."""
    lines = [ln.strip(" -") for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    for key in _TELLING:  # in order: OpenVINO's summary line before its per-node details
        line = next((ln for ln in lines if key in ln), None)
        if line is not None:
            return line[:300]
    return lines[0][:300]


def _onnxruntime(path: Path, threads: int, native: bool) -> Runner:
    import onnxruntime as ort

    from repconv import runtime

    so = runtime.session_options(native=native, spinning=False, intra_op_num_threads=threads,
                                 inter_op_num_threads=1)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda feeds: [np.asarray(o) for o in sess.run(None, dict(feeds))]


def _openvino(path: Path, threads: int) -> Runner:
    import openvino as ov

    config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    names = [o.get_any_name() for o in compiled.outputs]

    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        result = request.infer(dict(feeds))
        by_name = {k.get_any_name(): v for k, v in result.items()}
        return [np.asarray(by_name[n]) for n in names]

    return run


def _tract(path: Path) -> Runner:
    import tract

    model = tract.onnx().load(str(path))
    order = [model.input_name(i) for i in range(model.input_count())]
    runnable = model.into_model().into_runnable()
    return lambda feeds: [t.to_numpy() for t in runnable.run([np.ascontiguousarray(feeds[n]) for n in order])]


def _reference(path: Path) -> Runner:
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(str(path))
    return lambda feeds: [np.asarray(o) for o in ev.run(None, dict(feeds))]


def load(runtime: str, path: str | os.PathLike[str], threads: int = 1) -> Runner:
    """A callable running ``path`` in ``runtime`` (``threads`` = 0: the runtime's default, all cores)."""
    p = Path(path)
    try:
        if runtime in ("onnxruntime", "onnxruntime-native"):
            return _onnxruntime(p, threads, runtime == "onnxruntime-native")
        if runtime == "openvino":
            return _openvino(p, threads)
        if runtime == "tract":
            return _tract(p)
        if runtime == "reference":
            return _reference(p)
    except ImportError:
        raise
    except Exception as e:
        raise RuntimeRefused(f"{runtime}: {_first_line(e)}") from e
    raise ValueError(f"unknown runtime {runtime!r} (one of {', '.join(RUNTIMES)})")

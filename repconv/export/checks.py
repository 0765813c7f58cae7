"""ONNX Runtime against PyTorch on more than the example: the inputs an export is checked on, and the check.

An export can reproduce PyTorch on the example and still be wrong: a branch on tensor data baked
in, a batch size frozen into a reshape. So every export is run on

* the example itself,
* two fresh inputs of the example's shape - float tensors drawn around the example's mean, one
  shifted up and one down by the example's standard deviation, so that a branch on the sign or size
  of an activation goes both ways; integer / bool inputs are kept (repconv cannot invent valid ids),
* with a dynamic batch, the example at a second batch size (3 for batch 1, else 1).

Each is compared with PyTorch in a plain ONNX Runtime session (which runs a custom ``Involution``
node through its model-local function) and, for the onnxruntime form, with repconv's native kernel
registered.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch

from repconv.export import involution_onnx as inv_onnx
from repconv.export.errors import ExportCheckError
from repconv.util import first_line

__all__ = ["OrtCheck", "Case", "check_cases", "other_batch", "native_options", "run_checks"]


@dataclass
class OrtCheck:
    """One ONNX Runtime run compared with PyTorch."""

    runtime: str  # "onnxruntime" (plain session), "function" (plain session running the Involution
    #               function) or "native" (repconv's kernel registered)
    batch: int
    max_abs: float
    max_rel: float  # max |err| / max |ref|
    ok: bool
    native_used: bool | None = None  # did the profile show the native Involution kernel run?
    input: str = "example"  # "example", "fresh 1", "fresh 2", "batch 3", ...


@dataclass
class Case:
    label: str
    inputs: tuple[torch.Tensor, ...]
    reference: list[torch.Tensor] | None = None  # PyTorch's outputs, filled in by the caller


def _fresh(inputs: tuple[torch.Tensor, ...], index: int) -> tuple[torch.Tensor, ...]:
    out = []
    gen = torch.Generator().manual_seed(1000 + index)
    sign = 1.0 if index % 2 else -1.0
    for t in inputs:
        if not t.is_floating_point():
            out.append(t.clone())
            continue
        ref = t.double()
        mean = float(ref.mean()) if t.numel() else 0.0
        std = float(ref.std()) if t.numel() > 1 else 1.0
        if not math.isfinite(std) or std == 0.0:
            std = 1.0
        z = torch.randn(t.shape, generator=gen, dtype=torch.float64)
        out.append((mean + std * (z + sign)).to(t.dtype))
    return tuple(out)


def other_batch(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Inputs with a different batch size (3 for batch 1, else 1) to prove the batch axis is free."""
    n = inputs[0].shape[0]
    if n == 1:
        # Distinct samples so a batch-mixing bug cannot hide behind identical rows.
        return tuple(torch.cat([t, t.flip(-1), t.roll(1, dims=-1)]) for t in inputs)
    return tuple(t[:1] for t in inputs)


def check_cases(inputs: tuple[torch.Tensor, ...], dynamic_batch: bool, fresh: int = 2) -> list[Case]:
    """The inputs every export is checked on (module docstring)."""
    cases = [Case("example", inputs)] + [Case(f"fresh {i + 1}", _fresh(inputs, i + 1)) for i in range(fresh)]
    if dynamic_batch and inputs and inputs[0].dim():
        other = other_batch(inputs)
        cases.append(Case(f"batch {other[0].shape[0]}", other))
    return cases


def _compare(ref: list[torch.Tensor], got: list[np.ndarray], rtol: float, atol: float) -> tuple[float, float, bool]:
    if len(ref) != len(got):
        return math.inf, math.inf, False
    max_abs = max_rel = 0.0
    ok = True
    for r, g in zip(ref, got, strict=True):
        rn = r.to(torch.float64).numpy() if r.is_floating_point() else r.numpy()
        if rn.shape != g.shape:
            return math.inf, math.inf, False
        if not rn.size:
            continue
        r64, g64 = rn.astype(np.float64), g.astype(np.float64)
        finite = np.isfinite(r64)
        # where PyTorch itself overflows, the runtime must produce the same inf / nan
        same_specials = bool(np.array_equal(finite, np.isfinite(g64))) and bool(
            np.all((r64[~finite] == g64[~finite]) | (np.isnan(r64[~finite]) & np.isnan(g64[~finite]))))
        err = np.abs(r64[finite] - g64[finite]) if finite.any() else np.zeros(1)
        scale = float(np.abs(r64[finite]).max()) if finite.any() else 0.0
        max_abs = max(max_abs, float(err.max()))
        max_rel = max(max_rel, float(err.max()) / scale if scale else float(err.max()))
        # Same criterion as repconv.verify: |err| <= atol + rtol * max|ref| per output (elementwise
        # rtol would fail deep nets on near-zero outputs whose error is float32 accumulation).
        ok = ok and float(err.max()) <= atol + rtol * scale and same_specials
    return max_abs, max_rel, ok


def native_options() -> Any | None:
    """SessionOptions with repconv's native kernel registered, or None when the library is absent."""
    try:
        from repconv import runtime

        if runtime.native_library() is None:
            return None
        return runtime.session_options()
    except Exception:
        return None


def _native_ran(profile_path: str) -> bool:
    with open(profile_path) as fh:
        events = json.load(fh)
    return any(ev.get("cat") == "Node" and ev.get("args", {}).get("op_name") == inv_onnx.OP_TYPE for ev in events)


def run_checks(
    model: onnx.ModelProto,
    cases: Sequence[Case],
    rtol: float,
    atol: float,
    *,
    tolerate: Callable[[Case], bool] = lambda case: False,
) -> tuple[list[OrtCheck], bool]:
    """Run every case in ONNX Runtime and compare; return (checks, native library available).

    Raises :class:`ExportCheckError` at the first case beyond tolerance unless ``tolerate(case)``
    (``--allow-specialize``: fresh inputs may take the branch the file does not hold)."""
    import onnxruntime as ort

    data = model.SerializeToString()
    names = [i.name for i in model.graph.input if i.name not in {init.name for init in model.graph.initializer}]
    custom = any(n.domain == inv_onnx.DOMAIN for n in model.graph.node)
    native = native_options() if custom else None
    runtimes: list[tuple[str, Any | None]] = [("function" if custom else "onnxruntime", None)]
    if native is not None and all(t.dtype == torch.float32 for t in cases[0].inputs):
        runtimes.append(("native", native))
    checks: list[OrtCheck] = []
    with tempfile.TemporaryDirectory(prefix="repconv-ort-") as tmp:
        for label, opts in runtimes:
            so = opts if opts is not None else ort.SessionOptions()
            if label == "native":
                so.enable_profiling = True
                so.profile_file_prefix = os.path.join(tmp, "profile")
            try:
                sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
            except Exception as e:
                raise ExportCheckError(f"ONNX Runtime ({label}) cannot load the model: {first_line(e)}",
                                       checks) from None
            start = len(checks)
            for case in cases:
                feeds = {n: t.numpy() for n, t in zip(names, case.inputs, strict=True)}
                try:
                    got = [np.asarray(o) for o in sess.run(None, feeds)]
                except Exception as e:
                    raise ExportCheckError(f"ONNX Runtime ({label}) cannot run the model on the {case.label} "
                                           f"input: {first_line(e)}", checks) from None
                assert case.reference is not None
                max_abs, max_rel, ok = _compare(case.reference, got, rtol, atol)
                checks.append(OrtCheck(label, int(case.inputs[0].shape[0]) if case.inputs[0].dim() else 1,
                                       max_abs, max_rel, ok, input=case.label))
                if not ok and not tolerate(case):
                    raise ExportCheckError(
                        f"ONNX Runtime ({label}, {case.label} input, batch {checks[-1].batch}) differs from "
                        f"PyTorch: max abs error {max_abs:.3g}, max rel {max_rel:.3g} (rtol={rtol:g}, "
                        f"atol={atol:g})", checks)
            if label == "native":
                used = _native_ran(sess.end_profiling())
                for c in checks[start:]:
                    c.native_used = used
    return checks, native is not None

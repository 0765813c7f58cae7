"""``repconv.export_onnx``: fuse, export to ONNX with the ``ai.repconv::Involution`` op, simplify, check.

Exporter choice: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``).

* It needs nothing beyond torch and onnx. The torch.export-based exporter (the default since torch
  2.9) needs ``onnxscript`` (and through it ``onnx_ir`` / ``ml_dtypes``) only to do what this module
  does in ~20 lines: map one custom op to one node. A dependency is not worth that.
* A custom op maps to one node with ``register_custom_op_symbolic`` and ``custom_opsets``; the
  attributes arrive as Python ints, exactly the node attributes the schema wants.
* ``dynamic_axes`` gives a symbolic batch axis directly; vision models' reshapes that read
  ``x.shape[0]`` trace into Shape/Gather, so batch-dynamic graphs come out right.
* It is several times faster (no torch.export / decomposition / onnxscript optimizer passes),
  which matters for the CLI and the test suite.

The cost: torch marks it deprecated (a DeprecationWarning, silenced here because the choice is
deliberate) and pyproject caps torch at 2.14.x. If a future torch drops it, the op translation is
the only piece to port (``custom_translation_table`` with an onnxscript function emitting the same
node); everything after ``torch.onnx.export`` works on the ModelProto and stays as is.

Opset: 17 by default. It is the newest opset the TorchScript exporter covers thoroughly (it stops at
20), has ``LayerNormalization`` as one op (MLP-Mixer / token mixers export as one node, not seven),
and ORT 1.32 - like every ORT since 1.14 - runs it with all its fusions. Opset 18 only changes Reduce*
axes from attributes to inputs, which gains nothing here. The ``Involution`` function needs >= 13.

IR version: the smallest that the opsets require (8 for opset 17; model-local functions need 8),
never above ``involution_onnx.IR_VERSION``: ORT 1.32 refuses the IR that onnx 1.23 writes by default,
and a lower IR keeps older runtimes able to load the file.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

import repconv.ops  # noqa: F401 - registers torch.ops.repconv.involution
from repconv.diagnose import describe_forward_failure
from repconv.dynamic._common import onnx_static_batch
from repconv.export import involution_onnx as inv_onnx
from repconv.export.patterns import InvolutionMatch, rewrite_involutions
from repconv.util import eval_mode, first_line, step, tensor_leaves

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "ExportCheckError",
    "UnsupportedOperatorError",
    "ExportReport",
    "OrtCheck",
    "export_onnx",
    "export_onnx_with_report",
    "count_custom_nodes",
]

DEFAULT_OPSET = 17
MAX_OPSET = 20  # torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET in torch 2.4 .. 2.14
MIN_OPSET = 9


class ExportError(RuntimeError):
    """The model cannot be exported (bad input, untraceable code); one-line message."""


class UnsupportedOperatorError(ExportError):
    """An operator has no ONNX translation; ``op`` and ``module`` say which and where."""

    def __init__(self, message: str, op: str, module: str | None) -> None:
        super().__init__(message)
        self.op = op
        self.module = module


class ExportCheckError(ExportError):
    """The exported model does not reproduce PyTorch in ONNX Runtime (or is not valid ONNX)."""

    def __init__(self, message: str, checks: Sequence[OrtCheck] = ()) -> None:
        super().__init__(message)
        self.checks = list(checks)


@dataclass
class OrtCheck:
    """One ONNX Runtime run compared with PyTorch."""

    runtime: str  # "function" (plain InferenceSession) or "native" (repconv's kernel registered)
    batch: int
    max_abs: float
    max_rel: float  # max |err| / max |ref|
    ok: bool
    native_used: bool | None = None  # did the profile show the native Involution kernel run?


@dataclass
class ExportReport:
    """What :func:`export_onnx_with_report` did; the CLI prints it."""

    path: Path
    opset: int
    ir_version: int = 0
    exporter: str = "torchscript"
    fused: list[str] = field(default_factory=list)  # regions the fusion pass collapsed
    fuse_note: str | None = None  # why fusion did not run, when it did not
    involutions: list[InvolutionMatch] = field(default_factory=list)  # third-party code rewritten
    nodes_exported: int = 0
    nodes_final: int = 0
    simplified: bool = False
    simplify_note: str | None = None
    custom_nodes: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)
    checks: list[OrtCheck] = field(default_factory=list)
    native_available: bool = False
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.checks), default=0.0)

    @property
    def native_used(self) -> bool | None:
        native = [c.native_used for c in self.checks if c.runtime == "native"]
        return any(bool(v) for v in native) if native else None


# ---------------------------------------------------------------------------------------------
# repconv::involution -> ai.repconv::Involution
# ---------------------------------------------------------------------------------------------

_SYMBOLIC_REGISTERED = False


def _register_symbolic() -> None:
    global _SYMBOLIC_REGISTERED
    if _SYMBOLIC_REGISTERED:
        return
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx.symbolic_helper import parse_args

    @parse_args("v", "v", "i", "i", "i", "i")
    def involution_symbolic(g: Any, x: Any, kernel: Any, kernel_size: int, stride: int, dilation: int,
                            groups: int) -> Any:
        out = g.op(
            f"{inv_onnx.DOMAIN}::{inv_onnx.OP_TYPE}", x, kernel,
            kernel_size_i=kernel_size, stride_i=stride, dilation_i=dilation, groups_i=groups,
            padding_i=dilation * (kernel_size - 1) // 2,
        )
        # Output = X's (N, C) with the kernel's (Ho, Wo): lets the exporter type the node.
        xs, ks = x.type().varyingSizes(), kernel.type().varyingSizes()
        if xs is not None and ks is not None and len(xs) == 4 and len(ks) == 4:
            out.setType(x.type().with_sizes([xs[0], xs[1], ks[2], ks[3]]))
        return out

    # Opset 9 is the lowest the registry knows; the entry serves every newer opset.
    register_custom_op_symbolic("repconv::involution", involution_symbolic, 9)
    _SYMBOLIC_REGISTERED = True


def count_custom_nodes(model: onnx.ModelProto) -> int:
    """Number of ``ai.repconv::Involution`` nodes in the main graph."""
    return sum(1 for n in model.graph.node if n.domain == inv_onnx.DOMAIN and n.op_type == inv_onnx.OP_TYPE)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise ExportError("example_inputs must be a tensor or a tuple of tensors")


@contextlib.contextmanager
def _quiet_native_output() -> Iterator[None]:
    """Silence C++ writes to fds 1 and 2 while the TorchScript exporter / onnxsim run.

    On failure the exporter dumps the whole TorchScript IR graph to stdout through its own logger,
    which it forces on (``setup_onnx_logging`` tests a function object for truth); the user should
    see our one-line error instead."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no standard fds (embedded interpreters): nothing to silence
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _fresh(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A copy per PyTorch run: a model that writes into its input (in-place ReLU first) must not
    change the tensors later fed to ONNX Runtime."""
    return tuple(t.clone() for t in inputs)


def _reference(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    try:
        with torch.no_grad():
            out = model(*_fresh(inputs))
    except Exception as e:
        raise ExportError(describe_forward_failure(model, inputs, e)) from None
    flat = tensor_leaves(out)
    if not flat:
        raise ExportError("the model returns no tensors")
    return [t.detach() for t in flat]


def _other_batch(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Inputs with a different batch size (3 for batch 1, else 1) to prove the batch axis is free."""
    n = inputs[0].shape[0]
    if n == 1:
        # Distinct samples so a batch-mixing bug cannot hide behind identical rows.
        return tuple(torch.cat([t, t.flip(-1), t.roll(1, dims=-1)]) for t in inputs)
    return tuple(t[:1] for t in inputs)


# ---------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------


def _fuse(model: nn.Module, inputs: tuple[torch.Tensor, ...], report: ExportReport, rtol: float,
          atol: float) -> nn.Module:
    """Run repconv's fusion pass; a model it cannot handle is exported unfused (with a note)."""
    from repconv.pipeline import fuse_with_report

    try:
        fused, fuse_report = fuse_with_report(model, _fresh(inputs), verify=True, rtol=rtol, atol=atol)
    except Exception as e:
        _raise_if_verification(e)
        report.fuse_note = f"fusion skipped: {first_line(e, 200)}"
        return model
    for r in fuse_report.to_dict()["regions"]:
        report.fused.append(f"{r['block'] or '<model>'}: {r['kind']} -> {r['result']}")
    if fuse_report.untraced:
        report.fuse_note = f"parts not traced (fused below them): {'; '.join(fuse_report.untraced)[:200]}"
    return fused


def _raise_if_verification(e: Exception) -> None:
    try:
        from repconv.verification import VerificationError
    except ImportError:
        return
    if isinstance(e, VerificationError):
        raise ExportCheckError(f"fusion changed the model's outputs: {first_line(e)}") from e


_OP_RE = re.compile(r"operator '([^']+)'")


def _locate_op(model: nn.Module, inputs: tuple[torch.Tensor, ...], op: str) -> str | None:
    """'path (Class)' of the innermost module that runs ``op``, from a TorchScript trace's scopes."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = model if isinstance(model, torch.jit.ScriptModule) else torch.jit.trace(
                model, _fresh(inputs), check_trace=False)
            graph = traced.inlined_graph
    except Exception:
        return None
    for node in graph.nodes():
        if node.kind() != op:
            continue
        scope = node.scopeName().split("/")[-1]
        path = scope.removeprefix("__module").removeprefix(".")
        try:
            sub = model.get_submodule(path) if path else model
            return f"{path or '<model>'} ({type(sub).__name__})"
        except AttributeError:
            return path or "<model>"
    return None


def _torch_export(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    n_outputs: int,
    opset: int,
    dynamic_batch: bool,
    original: nn.Module,
    report: ExportReport,
) -> onnx.ModelProto:
    _register_symbolic()
    in_names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    out_names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    dynamic_axes = {name: {0: "batch"} for name in in_names + out_names} if dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # without a dynamic batch, per-sample convs (CondConv, D-DW, ...) may bake the batch into
            # one grouped Conv, which ORT runs faster than the batch-agnostic form
            static = contextlib.nullcontext() if dynamic_batch else onnx_static_batch()
            with _quiet_native_output(), torch.no_grad(), static:
                torch.onnx.export(
                    model, _fresh(inputs), buf, dynamo=False, opset_version=opset,
                    input_names=in_names, output_names=out_names, dynamic_axes=dynamic_axes,
                    custom_opsets={inv_onnx.DOMAIN: inv_onnx.DOMAIN_VERSION}, do_constant_folding=True,
                )
        except Exception as e:
            msg = first_line(e)
            m = _OP_RE.search(msg)
            if m:
                op = m.group(1)
                where = _locate_op(original, inputs, op) or _locate_op(model, inputs, op)
                place = f" in module {where}" if where else ""
                raise UnsupportedOperatorError(
                    f"operator {op}{place} has no ONNX translation at opset {opset}", op, where) from None
            raise ExportError(f"ONNX export failed: {msg}") from None
    for w in caught:  # tracer warnings can mean a wrong graph; the deprecation notice cannot
        if not issubclass(w.category, DeprecationWarning | FutureWarning):
            text = str(w.message).strip().splitlines()[0] if str(w.message).strip() else w.category.__name__
            if text not in report.warnings:
                report.warnings.append(text[:200])
    return onnx.load_from_string(buf.getvalue())


def _finish_custom_domain(model: onnx.ModelProto, opset: int) -> None:
    """Attach the function and the domain import (or drop the unused import); fix ir_version."""
    if count_custom_nodes(model):
        if opset < inv_onnx.MIN_OPSET:
            raise ExportError(f"the Involution op needs opset >= {inv_onnx.MIN_OPSET}, got {opset}")
        inv_onnx.ensure_involution_function(model)
        for f in model.functions:  # the function's default opset must equal the model's
            if f.domain == inv_onnx.DOMAIN and f.name == inv_onnx.OP_TYPE:
                for imp in f.opset_import:
                    if imp.domain in ("", "ai.onnx"):
                        imp.version = opset
    else:
        keep = [o for o in model.opset_import if o.domain != inv_onnx.DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep)
    need = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if len(model.functions):
        need = max(need, 8)  # model-local functions arrived with IR 8
    model.ir_version = min(need, inv_onnx.IR_VERSION)


def _simplify(model: onnx.ModelProto, report: ExportReport) -> onnx.ModelProto:
    """onnxsim, keeping the custom node and its function; on any trouble keep the unsimplified model."""
    try:
        import onnxsim
    except ImportError:
        report.simplify_note = "onnxsim not installed"
        return model
    before = count_custom_nodes(model)
    try:
        # check_n=0: onnxsim's own check is skipped (it reports success even when it ran none);
        # the ORT comparison below is the real check. Functions stay functions (no inlining).
        with _quiet_native_output(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            simplified, _ = onnxsim.simplify(copy.deepcopy(model), check_n=0, inline_functions=False,
                                             certify=False)
    except Exception as e:
        report.simplify_note = f"onnxsim failed, kept the unsimplified model: {first_line(e, 160)}"
        return model
    if count_custom_nodes(simplified) != before:
        report.simplify_note = "onnxsim changed the Involution nodes; kept the unsimplified model"
        return model
    report.simplified = True
    return simplified


def _validate(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:
        raise ExportCheckError(f"the exported model is not valid ONNX: {first_line(e)}") from None
    return inferred


def _native_options() -> Any | None:
    """SessionOptions with repconv's native kernel registered, or None when the library is absent."""
    try:
        from repconv import runtime
    except ImportError:
        return None
    try:
        if runtime.native_library() is None:
            return None
        return runtime.session_options()
    except Exception:
        return None


def _ort_outputs(model_bytes: bytes, feeds: dict[str, np.ndarray], options: Any | None,
                 profile: bool) -> tuple[list[np.ndarray], bool | None]:
    import onnxruntime as ort

    so = options if options is not None else ort.SessionOptions()
    with tempfile.TemporaryDirectory(prefix="repconv-ort-") as tmp:
        if profile:
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tmp, "profile")
        sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        outs = sess.run(None, feeds)
        used = None
        if profile:
            with open(sess.end_profiling()) as fh:
                events = json.load(fh)
            used = any(ev.get("cat") == "Node" and ev.get("args", {}).get("op_name") == inv_onnx.OP_TYPE
                       for ev in events)
            so.enable_profiling = False
    return [np.asarray(o) for o in outs], used


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
        err = np.abs(rn.astype(np.float64) - g.astype(np.float64))
        scale = float(np.abs(rn).max())
        max_abs = max(max_abs, float(err.max()))
        max_rel = max(max_rel, float(err.max()) / scale if scale else float(err.max()))
        # Same criterion as repconv.verify: |err| <= atol + rtol * max|ref| per output (elementwise
        # rtol would fail deep nets on near-zero outputs whose error is float32 accumulation).
        ok = ok and float(err.max()) <= atol + rtol * scale and bool(np.isfinite(g).all())
    return max_abs, max_rel, ok


def _check_ort(model: onnx.ModelProto, cases: list[tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]],
               rtol: float, atol: float, report: ExportReport) -> None:
    data = model.SerializeToString()
    names = [i.name for i in model.graph.input]
    has_custom = count_custom_nodes(model) > 0
    native = _native_options() if has_custom else None
    report.native_available = native is not None
    runtimes: list[tuple[str, Any | None]] = [("function", None)]
    if native is not None and all(t.dtype == torch.float32 for t in cases[0][0]):
        runtimes.append(("native", native))
    for inputs, ref in cases:
        feeds = {n: t.numpy() for n, t in zip(names, inputs, strict=True)}
        for label, opts in runtimes:
            try:
                got, used = _ort_outputs(data, feeds, opts, profile=label == "native")
            except Exception as e:
                raise ExportCheckError(f"ONNX Runtime ({label}) cannot run the model: {first_line(e)}",
                                       report.checks) from None
            max_abs, max_rel, ok = _compare(ref, got, rtol, atol)
            report.checks.append(OrtCheck(label, int(inputs[0].shape[0]), max_abs, max_rel, ok, used))
            if not ok:
                raise ExportCheckError(
                    f"ONNX Runtime ({label}, batch {inputs[0].shape[0]}) differs from PyTorch: "
                    f"max abs error {max_abs:.3g}, max rel {max_rel:.3g} (rtol={rtol:g}, atol={atol:g})",
                    report.checks)


def _write_atomic(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(model.SerializeToString())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for the temp file, not the result
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def export_onnx_with_report(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    fuse: bool = True,
    opset: int | None = None,
    simplify: bool = True,
    dynamic_batch: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> ExportReport:
    """:func:`export_onnx`, returning an :class:`ExportReport` of every step."""
    t0 = time.perf_counter()
    target = Path(path)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is outside what the exporter supports ({MIN_OPSET}..{MAX_OPSET})")
    if target.is_dir():
        raise ExportError(f"{target} is a directory")
    inputs = tuple(t.detach().clone() for t in _as_tuple(example_inputs))
    if any(t.device.type != "cpu" for t in inputs):
        raise ExportError("export runs on the CPU: move the model and example inputs to the CPU first")
    report = ExportReport(path=target, opset=opset)

    with eval_mode(model):
        ref = _reference(model, inputs)
        cases = [(inputs, ref)]
        if dynamic_batch:
            other = _other_batch(inputs)
            cases.append((other, _reference(model, other)))

        work: nn.Module = _fuse(model, inputs, report, rtol, atol) if fuse else model
        if work is model and not isinstance(model, torch.jit.ScriptModule):
            work = copy.deepcopy(model)  # the rewrite below must never touch the caller's module
        work.eval()
        work, report.involutions = rewrite_involutions(work, _fresh(inputs))
        with step("exporting to ONNX"):
            exported = _torch_export(work, inputs, len(ref), opset, dynamic_batch, model, report)

    _finish_custom_domain(exported, opset)
    report.nodes_exported = len(exported.graph.node)
    with step("simplifying (onnxsim)"):
        final = _simplify(exported, report) if simplify else exported
    _finish_custom_domain(final, opset)  # onnxsim may rewrite imports / ir_version
    final = _validate(final)
    report.nodes_final = len(final.graph.node)
    report.custom_nodes = count_custom_nodes(final)
    report.op_counts = dict(Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in final.graph.node))
    report.ir_version = final.ir_version
    with step("checking in ONNX Runtime"):
        _check_ort(final, cases, rtol, atol, report)
    with step("writing the ONNX file"):
        _write_atomic(final, target)
    report.seconds = time.perf_counter() - t0
    return report


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    fuse: bool = True,
    opset: int | None = None,
    simplify: bool = True,
    dynamic_batch: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> Path:
    """Export ``model`` to ONNX at ``path``, checked in ONNX Runtime against PyTorch.

    Steps: fuse (``repconv.fuse``; skipped with a note when the model cannot be traced), rewrite
    third-party unfold-style involution to ``repconv::involution``, export (TorchScript exporter,
    opset 17 by default), one ``ai.repconv::Involution`` node per involution with the model-local
    function attached (plain ``onnxruntime.InferenceSession(path)`` runs it), onnxsim, ONNX checker
    (full) and shape inference, then ORT vs PyTorch on ``example_inputs`` (plus another batch size
    with ``dynamic_batch``), with the native kernel too when it is built. The file is written only
    when everything passed (temp file + rename).

    Raises :class:`ExportCheckError` beyond ``rtol``/``atol``, :class:`UnsupportedOperatorError` for
    an operator without ONNX translation, :class:`ExportError` for other unexportable input.
    """
    return export_onnx_with_report(
        model, path, example_inputs, fuse=fuse, opset=opset, simplify=simplify,
        dynamic_batch=dynamic_batch, rtol=rtol, atol=atol,
    ).path

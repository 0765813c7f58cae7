"""From a module to an ONNX ModelProto with ``ai.repconv::Involution`` nodes: the two torch exporters.

* ``dynamo`` (default): ``torch.onnx.export(..., dynamo=True)`` - torch.export captures the model,
  the onnxscript-based translator writes ONNX. repconv's op maps to one node through
  ``custom_translation_table`` (:func:`involution_translation`). torch.export refuses data-dependent
  control flow outright; that error names the user's line.
* ``torchscript``: ``torch.onnx.export(..., dynamo=False)``, torch's older tracer-based exporter
  (deprecated since torch 2.9, still shipped). repconv's op maps to one node through
  ``register_custom_op_symbolic``. Tracer warnings are raised as errors at the user's line.

Both see the same module (repconv's fused, rewritten model), the same input and output names and
the same batch axis, and the result goes through the same simplification, so the final graphs are
the same (tests/test_export_exporters.py compares them op by op).

Outputs: a model returning a dict / tuple / nested structure is wrapped so the exporter sees a flat
tuple; each output is named after its path in the structure (``logits``, ``aux.0``, ``output_1``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch
from torch import nn
from torch.utils._pytree import tree_flatten_with_path

import repconv.ops  # noqa: F401 - registers torch.ops.repconv.involution
from repconv.dynamic._common import onnx_static_batch
from repconv.export import involution_onnx as inv_onnx
from repconv.export.checks import other_batch
from repconv.export.control_flow import (
    ControlFlowSite,
    exception_chain,
    is_data_dependent,
    site_from_exception,
    site_from_location,
)
from repconv.export.errors import DataDependentError, ExportError, UnsupportedOperatorError
from repconv.util import first_line, tensor_leaves

__all__ = ["EXPORTERS", "DEFAULT_EXPORTER", "Captured", "capture", "output_names", "involution_translation"]

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"


@dataclass
class Captured:
    model: onnx.ModelProto
    exporter: str
    specialized: list[ControlFlowSite] = field(default_factory=list)  # data-dependent sites baked in
    warnings: list[str] = field(default_factory=list)
    note: str | None = None


# ---------------------------------------------------------------------------------------------
# names and output flattening
# ---------------------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]+")


def _key_text(key: Any) -> str:
    for attr in ("key", "idx", "name"):  # MappingKey, SequenceKey, GetAttrKey
        if hasattr(key, attr):
            return _UNSAFE.sub("_", str(getattr(key, attr))) or "_"
    return _UNSAFE.sub("_", str(key)) or "_"


def output_names(out: Any, taken: Sequence[str] = ()) -> list[str]:
    """One name per tensor leaf of a model output: ``output`` for a lone tensor, else the leaf's path
    (dict keys, indices), a top-level sequence index as ``output_<i>``; unique, never one of ``taken``."""
    if isinstance(out, torch.Tensor):
        return ["output"]
    leaves, _ = tree_flatten_with_path(out)
    names: list[str] = []
    seen = set(taken)
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = [_key_text(k) for k in path]
        if path and hasattr(path[0], "idx"):
            parts[0] = f"output_{parts[0]}"
        name = ".".join(parts) or "output"
        base, i = name, 1
        while name in seen:
            name, i = f"{base}_{i}", i + 1
        seen.add(name)
        names.append(name)
    return names


class _FlatOutputs(nn.Module):
    """Returns the tensor leaves of ``inner``'s output as one flat tuple (what both exporters take)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(tensor_leaves(self.inner(*args)))


# ---------------------------------------------------------------------------------------------
# repconv::involution -> ai.repconv::Involution, for each exporter
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        register_custom_op_symbolic("repconv::involution", involution_symbolic, 9)
    _SYMBOLIC_REGISTERED = True


_TRANSLATION: Any = None


def involution_translation() -> Any:
    """The onnxscript function writing one ``ai.repconv::Involution`` node (for ``custom_translation_table``).

    The op has no ONNX schema registry entry, so the onnxscript ``Op`` gets its schema here (inputs,
    output, the five int attributes); nothing is registered globally."""
    global _TRANSLATION
    if _TRANSLATION is not None:
        return _TRANSLATION
    try:
        import onnxscript
    except ImportError:
        raise ExportError("the dynamo exporter needs onnxscript (pip install onnxscript), "
                          "or use the TorchScript exporter (--exporter torchscript)") from None
    from onnx.defs import OpSchema

    floats = ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"]
    schema = OpSchema(
        inv_onnx.OP_TYPE, inv_onnx.DOMAIN, inv_onnx.DOMAIN_VERSION,
        inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("W", "T")],
        outputs=[OpSchema.FormalParameter("Y", "T")],
        type_constraints=[("T", floats, "float tensors")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in inv_onnx.ATTRIBUTES],
    )
    op = onnxscript.values.Op(onnxscript.values.Opset(inv_onnx.DOMAIN, inv_onnx.DOMAIN_VERSION), inv_onnx.OP_TYPE,
                              schema)

    def involution(x: Any, kernel: Any, kernel_size: int, stride: int, dilation: int, groups: int) -> Any:
        return op(x, kernel, kernel_size=kernel_size, stride=stride, dilation=dilation, groups=groups,
                  padding=dilation * (kernel_size - 1) // 2)

    _TRANSLATION = involution
    return involution


# ---------------------------------------------------------------------------------------------
# quiet: the exporters print progress, log at WARNING and dump graphs on failure
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Silence writes to fds 1 and 2 (C++ and Python) while an exporter or onnxsim runs.

    On failure the TorchScript exporter dumps its whole IR graph to stdout through a logger it forces
    on, torch.export prints partial graphs to ``sys.stderr`` on errors, the dynamo exporter logs
    skipped torchvision ops; the user should see repconv's one-line message instead. Python-level
    streams are swapped too: ``sys.stderr`` need not be fd 2 (click's test runner, notebooks)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    python_level = contextlib.ExitStack()
    python_level.enter_context(contextlib.redirect_stdout(io.StringIO()))
    python_level.enter_context(contextlib.redirect_stderr(io.StringIO()))
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no standard fds (embedded interpreters): the Python streams are all there is
        with python_level:
            yield
        return
    with tempfile.TemporaryFile() as sink, python_level:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@contextlib.contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """torch's loggers (torch.export guard failures, the dynamo exporter's skipped torchvision ops) at
    ERROR for the duration: the handlers may hold a stream that fd redirection does not reach."""
    logger = logging.getLogger("torch")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def _keep_warning(w: warnings.WarningMessage) -> bool:
    # torch's notices about its own APIs (the TorchScript exporter's deprecation, pytree renames) are
    # not the user's business: repconv chose the calls deliberately
    return not issubclass(w.category, DeprecationWarning | FutureWarning)


def _warning_text(w: warnings.WarningMessage) -> str:
    text = str(w.message).strip()
    line = text.splitlines()[0] if text else w.category.__name__
    if len(line) > 240:
        line = line[:240].rsplit(" ", 1)[0] + " ..."
    return line


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

_TS_OP_RE = re.compile(r"operator '([^']+)'")
_DYNAMO_OP_RE = re.compile(r"OpOverload\(op='([^']+)'")


def _fx_node_module(exc: BaseException) -> str | None:
    """'path (Class)' from the fx node the dynamo translator was converting when it failed."""
    import traceback

    for e in exception_chain(exc):
        for frame, _ in traceback.walk_tb(e.__traceback__):
            node = frame.f_locals.get("node")
            if isinstance(node, torch.fx.Node):
                stack = node.meta.get("nn_module_stack") or {}
                if stack:
                    path, cls = list(stack.values())[-1]
                    name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
                    return f"{path or '<model>'} ({name.rsplit('.', 1)[-1]})"
    return None


def _innermost_message(exc: BaseException) -> str:
    for e in reversed(exception_chain(exc)):
        text = first_line(e)
        if text and not text.startswith("Failed to"):
            return text
    return first_line(exc)


def _data_dependent(exc: BaseException, model: nn.Module) -> DataDependentError:
    site = site_from_exception(exc, model)
    where = str(site) if site else "the model's code"
    return DataDependentError(
        f"data-dependent Python control flow in {where}: the file would hold only the branch this input "
        "takes; rewrite it with tensor ops (torch.where) or pass --allow-specialize", [site] if site else [])


# ---------------------------------------------------------------------------------------------
# the exporters
# ---------------------------------------------------------------------------------------------


_REGISTRIES: dict[int, Any] = {}


@contextlib.contextmanager
def _torchlib_registry_reused() -> Iterator[None]:
    """torch.onnx.export(dynamo=True) rebuilds its registry of ~2,000 torchlib translations on every
    call (0.9 s, most of a small model's export). Build it once per opset and hand each export a copy
    (the export then adds repconv's custom translation to the copy). Where torch's internals differ
    from what this expects, the export simply builds its own, as before."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        yield
        return
    cls = _registration.ONNXRegistry
    original = cls.__dict__.get("from_torchlib")
    if not isinstance(original, classmethod) or not hasattr(cls(), "functions"):
        yield
        return

    def from_torchlib(klass: type, opset_version: int = _registration._constants.TORCHLIB_OPSET) -> Any:
        if opset_version not in _REGISTRIES:
            _REGISTRIES[opset_version] = original.__func__(klass, opset_version)
        built = _REGISTRIES[opset_version]
        fresh = copy.copy(built)
        fresh.functions = {k: list(v) for k, v in built.functions.items()}
        return fresh

    cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        cls.from_torchlib = original


def _dynamo(model: nn.Module, inputs: tuple[torch.Tensor, ...], in_names: list[str], out_names: list[str],
            opset: int, dynamic_batch: bool, locate_in: nn.Module) -> onnx.ModelProto:
    table = {torch.ops.repconv.involution.default: involution_translation()}
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} for _ in inputs)
        if isinstance(model, _FlatOutputs):  # forward(*args): one entry, the specs of all args
            shapes = (shapes,)
        if inputs[0].shape[0] == 1:  # torch.export specializes a size-1 axis to a constant
            inputs = other_batch(inputs)
    try:
        with _torchlib_registry_reused():
            program = torch.onnx.export(
                model, inputs, dynamo=True, opset_version=opset, input_names=in_names, output_names=out_names,
                dynamic_shapes=shapes, custom_translation_table=table, verbose=False, optimize=True,
            )
    except Exception as e:
        if is_data_dependent(e):
            raise _data_dependent(e, locate_in) from None
        for text in map(str, exception_chain(e)):
            m = _DYNAMO_OP_RE.search(text)
            if m and "No ONNX function found" in text:
                op = m.group(1).replace(".", "::", 1)
                where = _fx_node_module(e)
                place = f" in module {where}" if where else ""
                raise UnsupportedOperatorError(
                    f"operator {op}{place} has no ONNX translation at opset {opset}", op, where) from None
        raise ExportError(f"ONNX export failed: {_innermost_message(e)}") from None
    return program.model_proto


def _torchscript(model: nn.Module, inputs: tuple[torch.Tensor, ...], in_names: list[str], out_names: list[str],
                 opset: int, dynamic_batch: bool, original: nn.Module) -> onnx.ModelProto:
    _register_symbolic()
    axes = {name: {0: "batch"} for name in in_names + out_names} if dynamic_batch else None
    buf = io.BytesIO()
    try:
        torch.onnx.export(
            model, inputs, buf, dynamo=False, opset_version=opset, input_names=in_names, output_names=out_names,
            dynamic_axes=axes, custom_opsets={inv_onnx.DOMAIN: inv_onnx.DOMAIN_VERSION}, do_constant_folding=True,
        )
    except Exception as e:
        msg = first_line(e)
        m = _TS_OP_RE.search(msg)
        if m:
            op = m.group(1)
            where = _locate_op(original, inputs, op) or _locate_op(model, inputs, op)
            place = f" in module {where}" if where else ""
            raise UnsupportedOperatorError(
                f"operator {op}{place} has no ONNX translation at opset {opset}", op, where) from None
        raise ExportError(f"ONNX export failed: {msg}") from None
    return onnx.load_from_string(buf.getvalue())


def _tracer_verdict(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> BaseException | None:
    """Did the tracer warn about data, or about shapes? torch.export (symbolic shapes) tells: the
    data-dependent error it raises, or None when it captures the model. A tracer warning is also
    raised for ``if kernel.shape[-1] > 1`` - shape arithmetic, harmless for a fixed shape (and the
    check at a second batch size catches a frozen batch). Any other torch.export failure is returned
    too: then the warnings cannot be cleared."""
    try:
        torch.export.export(model, inputs, strict=False)
    except Exception as e:
        return e
    return None


def _locate_op(model: nn.Module, inputs: tuple[torch.Tensor, ...], op: str) -> str | None:
    """'path (Class)' of the innermost module that runs ``op``, from a TorchScript trace's scopes."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = model if isinstance(model, torch.jit.ScriptModule) else torch.jit.trace(
                model, tuple(t.clone() for t in inputs), check_trace=False)
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


def capture(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    reference_output: Any,
    *,
    exporter: str,
    opset: int,
    dynamic_batch: bool,
    allow_specialize: bool,
    original: nn.Module,
) -> Captured:
    """Export ``model`` (eval mode, already fused / rewritten) on ``inputs`` to a ModelProto.

    ``reference_output`` (the model's output on ``inputs``) fixes the output names; ``original`` is
    the caller's model, to name modules in messages. Raises :class:`ExportError` subclasses:
    :class:`DataDependentError` (unless ``allow_specialize``: then the export specializes and
    ``Captured.specialized`` lists the sites), :class:`UnsupportedOperatorError`."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r} (one of {', '.join(EXPORTERS)})")
    in_names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    out_names = output_names(reference_output, in_names)
    wrapped = model if isinstance(reference_output, torch.Tensor) else _FlatOutputs(model)
    result = Captured(onnx.ModelProto(), exporter)
    if isinstance(model, torch.jit.ScriptModule) and exporter == "dynamo":
        # torch.export does not take TorchScript; the tracer-based exporter does
        result.exporter, result.note = "torchscript", "a TorchScript model: exported with the TorchScript exporter"
    # without a dynamic batch, per-sample convs (CondConv, D-DW, ...) may bake the batch into one
    # grouped Conv, which runtimes run faster than the batch-agnostic form
    static = contextlib.nullcontext() if dynamic_batch else onnx_static_batch()
    tracer: list[warnings.WarningMessage] = []
    verdict: BaseException | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_native_output(), quiet_torch_logs(), torch.no_grad(), static:
            if result.exporter == "dynamo":
                try:
                    result.model = _dynamo(wrapped, inputs, in_names, out_names, opset, dynamic_batch, model)
                except DataDependentError as e:
                    if not allow_specialize:
                        raise
                    # torch.export cannot specialize; the tracer can (and its warnings say where)
                    result.exporter = "torchscript"
                    result.note = ("torch.export refuses data-dependent control flow: specialized with the "
                                   "TorchScript exporter")
                    result.specialized.extend(e.sites)
                    caught.clear()
            if result.exporter == "torchscript":
                result.model = _torchscript(wrapped, inputs, in_names, out_names, opset, dynamic_batch, original)
                tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
                verdict = _tracer_verdict(model, inputs) if tracer and not result.specialized else None
    if result.exporter == "torchscript" and tracer and (result.specialized or verdict is not None):
        # tracer warnings are errors unless torch.export proved the code data-independent
        if not allow_specialize:
            if verdict is not None and is_data_dependent(verdict):
                raise _data_dependent(verdict, model)
            site = site_from_location(tracer[0].filename, tracer[0].lineno, model)
            raise DataDependentError(
                f"the TorchScript tracer warns at {site}: {_warning_text(tracer[0])} - the file may hold only what "
                "this input does; fix the code, try --exporter dynamo, or pass --allow-specialize", [site])
        for w in tracer:
            site = site_from_location(w.filename, w.lineno, model)
            if not any((s.filename, s.lineno) == (site.filename, site.lineno) for s in result.specialized):
                result.specialized.append(site)
    for w in caught:
        if not issubclass(w.category, torch.jit.TracerWarning) and _keep_warning(w):
            text = _warning_text(w)
            if text not in result.warnings:
                result.warnings.append(text)
    return result

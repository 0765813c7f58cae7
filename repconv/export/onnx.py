"""``repconv.export_onnx``: fuse, export to ONNX, write Involution in the target's form, simplify, check.

Steps (:func:`export_onnx_with_report`):

1. PyTorch's outputs on the check inputs (:mod:`repconv.export.checks`: the example, two fresh
   inputs, a second batch size with ``dynamic_batch``).
2. repconv's fusion pass; third-party unfold-style involution rewritten to ``repconv::involution``.
3. Capture (:mod:`repconv.export.capture`): the dynamo exporter (default) or the TorchScript one.
   Each involution is one ``ai.repconv::Involution`` node; data-dependent Python control flow is
   refused (naming module and line) unless ``allow_specialize``.
4. onnxsim (keeping the custom node), the exporters' spelling differences removed
   (:mod:`repconv.export.normalize`), the full ONNX checker, shape inference.
5. The target's form (:mod:`repconv.export.forms`): ``onnxruntime`` keeps the node and its
   model-local function (native kernel where registered); ``generic`` / ``openvino`` / ``tract``
   (default ``generic``) replace it by standard ops that every runtime loads.
6. ONNX Runtime against PyTorch on every check input; the file is written only when all pass.

Opset: 18 by default - the dynamo exporter's own opset (it converts to others with onnx's version
converter) and within the TorchScript exporter's range (<= 20). ORT 1.32, OpenVINO 2026.4 and tract
0.23 run it. The Involution op (either form) needs >= 13.

IR version: the smallest that the opsets require (8 for opset 18; model-local functions need 8),
never above ``involution_onnx.IR_VERSION``: ORT 1.32 refuses the IR that onnx 1.23 writes by default,
and a lower IR keeps older runtimes able to load the file.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

import repconv.ops  # noqa: F401 - registers torch.ops.repconv.involution
from repconv.diagnose import describe_forward_failure
from repconv.export import forms
from repconv.export import involution_onnx as inv_onnx
from repconv.export.capture import DEFAULT_EXPORTER, EXPORTERS, capture, quiet_native_output
from repconv.export.checks import Case, OrtCheck, check_cases, run_checks
from repconv.export.errors import DataDependentError, ExportCheckError, ExportError, UnsupportedOperatorError
from repconv.export.normalize import normalize
from repconv.export.patterns import InvolutionMatch, rewrite_involutions
from repconv.util import eval_mode, first_line, step, tensor_leaves

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_TARGET",
    "DEFAULT_EXPORTER",
    "TARGETS",
    "EXPORTERS",
    "ExportError",
    "ExportCheckError",
    "DataDependentError",
    "UnsupportedOperatorError",
    "ExportReport",
    "OrtCheck",
    "export_onnx",
    "export_onnx_with_report",
    "count_custom_nodes",
]

DEFAULT_OPSET = 18
TARGETS = forms.TARGETS
DEFAULT_TARGET = forms.DEFAULT_TARGET
# (lowest, highest) opset per exporter: the TorchScript exporter stops at 20
# (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET); the dynamo exporter writes 18 and
# converts to 18..23 (below 18 its version conversion drops ops, so it is not offered)
OPSETS = {"torchscript": (9, 20), "dynamo": (18, 23)}
MIN_OPSET, MAX_OPSET = min(lo for lo, _ in OPSETS.values()), max(hi for _, hi in OPSETS.values())


@dataclass
class ExportReport:
    """What :func:`export_onnx_with_report` did; the CLI prints it."""

    path: Path
    opset: int
    ir_version: int = 0
    exporter: str = DEFAULT_EXPORTER
    target: str = DEFAULT_TARGET
    fused: list[str] = field(default_factory=list)  # regions the fusion pass collapsed
    fuse_note: str | None = None  # why fusion did not run, when it did not
    involutions: list[InvolutionMatch] = field(default_factory=list)  # third-party code rewritten
    involution_nodes: int = 0  # involutions in the model (whatever form the file writes them in)
    nodes_exported: int = 0  # nodes the exporter wrote
    nodes_final: int = 0  # after onnxsim (Involution still one node each)
    nodes_written: int = 0  # in the written file (standard forms expand each Involution)
    simplified: bool = False
    simplify_note: str | None = None
    custom_nodes: int = 0  # ai.repconv::Involution nodes in the written file (0 for standard forms)
    op_counts: dict[str, int] = field(default_factory=dict)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    checks: list[OrtCheck] = field(default_factory=list)
    native_available: bool = False
    specialized: list[str] = field(default_factory=list)  # data-dependent sites baked in (allow_specialize)
    extra_forms: dict[str, Path] = field(default_factory=dict)  # target -> file, written beside the main one
    notes: list[str] = field(default_factory=list)  # lines for the user: form written, exporter fallbacks
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.checks), default=0.0)

    @property
    def native_used(self) -> bool | None:
        native = [c.native_used for c in self.checks if c.runtime == "native"]
        return any(bool(v) for v in native) if native else None


def count_custom_nodes(model: onnx.ModelProto) -> int:
    """Number of ``ai.repconv::Involution`` nodes in the main graph."""
    return sum(1 for n in model.graph.node if n.domain == inv_onnx.DOMAIN and n.op_type == inv_onnx.OP_TYPE)


# ---------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------


def _as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise ExportError("example_inputs must be a tensor or a tuple of tensors")


def _fresh(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A copy per PyTorch run: a model that writes into its input (in-place ReLU first) must not
    change the tensors later fed to ONNX Runtime."""
    return tuple(t.clone() for t in inputs)


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    try:
        with torch.no_grad():
            out = model(*_fresh(inputs))
    except Exception as e:
        raise ExportError(describe_forward_failure(model, inputs, e)) from None
    if not tensor_leaves(out):
        raise ExportError("the model returns no tensors")
    return out


def _fuse(model: nn.Module, inputs: tuple[torch.Tensor, ...], report: ExportReport, rtol: float,
          atol: float) -> nn.Module:
    """Run repconv's fusion pass; a model it cannot handle is exported unfused (with a note)."""
    from repconv.pipeline import fuse_with_report
    from repconv.verification import VerificationError

    try:
        fused, fuse_report = fuse_with_report(model, _fresh(inputs), verify=True, rtol=rtol, atol=atol)
    except VerificationError as e:
        raise ExportCheckError(f"fusion changed the model's outputs: {first_line(e)}") from e
    except Exception as e:
        report.fuse_note = f"fusion skipped: {first_line(e, 200)}"
        return model
    for r in fuse_report.to_dict()["regions"]:
        report.fused.append(f"{r['block'] or '<model>'}: {r['kind']} -> {r['result']}")
    if fuse_report.untraced:
        report.fuse_note = f"parts not traced (fused below them): {'; '.join(fuse_report.untraced)[:200]}"
    return fused


def _finish_domains(model: onnx.ModelProto, opset: int) -> None:
    """Attach the Involution function and the domain import (or drop the unused import); fix ir_version."""
    if count_custom_nodes(model):
        if opset < inv_onnx.MIN_OPSET:
            raise ExportError(f"the Involution op needs opset >= {inv_onnx.MIN_OPSET}, got {opset}")
        forms.apply_target(model, "onnxruntime", opset)
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
        # the ORT comparison is the real check. Functions stay functions (no inlining).
        with quiet_native_output(), warnings.catch_warnings():
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


def _in_form(model: onnx.ModelProto, target: str, opset: int) -> onnx.ModelProto:
    """A copy of the checked onnxruntime-form model in ``target``'s form, validated."""
    if target == "onnxruntime" or not count_custom_nodes(model):
        return model
    try:
        converted = forms.apply_target(copy.deepcopy(model), target, opset)
    except forms.FormError as e:
        raise ExportError(str(e)) from None
    del converted.graph.value_info[:]  # re-inferred below, for the new nodes too
    return _validate(converted)


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


def _check_args(target: str, exporter: str, opset: int, path: Path) -> None:
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}: one of {', '.join(TARGETS)}")
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}: one of {', '.join(EXPORTERS)}")
    low, high = OPSETS[exporter]
    if not low <= opset <= high:
        other = next(e for e in EXPORTERS if e != exporter)
        hint = f"; the {other} exporter writes {OPSETS[other][0]}..{OPSETS[other][1]}" if (
            OPSETS[other][0] <= opset <= OPSETS[other][1]) else ""
        raise ExportError(f"opset {opset} is outside what the {exporter} exporter supports ({low}..{high}){hint}")
    if path.is_dir():
        raise ExportError(f"{path} is a directory")


def _form_note(report: ExportReport) -> str:
    n = report.involution_nodes
    if not n:
        return f"target {report.target}: standard ONNX (no involution)"
    if report.target == "onnxruntime":
        return (f"target onnxruntime: {n} ai.repconv::Involution node(s) + model-local function "
                "(ONNX Runtime and onnx.reference only; OpenVINO and tract refuse the custom domain)")
    return (f"target {report.target}: {n} involution(s) written as standard ops (runs in ONNX Runtime, "
            "OpenVINO, tract, onnx.reference; --target onnxruntime keeps the custom op for repconv's native kernel)")


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
    target: str = DEFAULT_TARGET,
    exporter: str = DEFAULT_EXPORTER,
    allow_specialize: bool = False,
    extra_targets: Mapping[str, str | os.PathLike[str]] | None = None,
) -> ExportReport:
    """:func:`export_onnx`, returning an :class:`ExportReport` of every step."""
    t0 = time.perf_counter()
    out_path = Path(path)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    _check_args(target, exporter, opset, out_path)
    extras = {str(t): Path(p) for t, p in (extra_targets or {}).items()}
    for t in extras:
        if t not in TARGETS:
            raise ExportError(f"unknown target {t!r}: one of {', '.join(TARGETS)}")
    inputs = tuple(t.detach().clone() for t in _as_tuple(example_inputs))
    if any(t.device.type != "cpu" for t in inputs):
        raise ExportError("export runs on the CPU: move the model and example inputs to the CPU first")
    report = ExportReport(path=out_path, opset=opset, exporter=exporter, target=target)

    with eval_mode(model):
        cases = check_cases(inputs, dynamic_batch)
        raw = _run(model, inputs)
        for case in cases:
            out = raw if case.inputs is inputs else _run(model, case.inputs)
            case.reference = [t.detach() for t in tensor_leaves(out)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            work: nn.Module = _fuse(model, inputs, report, rtol, atol) if fuse else model
            if work is model and not isinstance(model, torch.jit.ScriptModule):
                work = copy.deepcopy(model)  # the rewrite below must never touch the caller's module
            work.eval()
            work, report.involutions = rewrite_involutions(work, _fresh(inputs))
            with step("exporting to ONNX"):
                captured = capture(work, _fresh(inputs), raw, exporter=exporter, opset=opset,
                                   dynamic_batch=dynamic_batch, allow_specialize=allow_specialize, original=model)
        # torch's notices about its own APIs (TorchScript conversion, pytree renames) stay off the
        # user's terminal; anything else is reported
        for w in caught:
            if not issubclass(w.category, DeprecationWarning | FutureWarning):
                text = first_line(w.message if isinstance(w.message, Exception) else Warning(str(w.message)), 240)
                if text not in report.warnings:
                    report.warnings.append(text)
    report.exporter = captured.exporter
    report.warnings.extend(captured.warnings)
    if captured.note:
        report.notes.append(captured.note)
    report.specialized = [str(s) for s in captured.specialized]
    for s in report.specialized:
        report.warnings.append(f"specialized (--allow-specialize): data-dependent control flow in {s}; "
                               "the file holds the branch the example input takes")

    exported = captured.model
    _finish_domains(exported, opset)
    report.nodes_exported = len(exported.graph.node)
    with step("simplifying (onnxsim)"):
        final = normalize(_simplify(exported, report) if simplify else exported)
    _finish_domains(final, opset)  # onnxsim may rewrite imports / ir_version
    final = _validate(final)
    report.nodes_final = len(final.graph.node)
    report.involution_nodes = count_custom_nodes(final)
    report.input_names = [i.name for i in final.graph.input]
    report.output_names = [o.name for o in final.graph.output]

    def tolerate(case: Case) -> bool:  # a specialized export may differ where the branch flips
        return bool(report.specialized) and case.label != "example"

    written: dict[str, onnx.ModelProto] = {}
    for t in [target, *(t for t in extras if t != target)]:
        form = _in_form(final, t, opset)
        with step("checking in ONNX Runtime"):
            checks, native = run_checks(form, cases, rtol, atol, tolerate=tolerate)
        if t == target:
            report.checks, report.native_available = checks, native
        written[t] = form
    main = written[target]
    report.nodes_written = len(main.graph.node)
    report.custom_nodes = count_custom_nodes(main)
    report.op_counts = dict(Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in main.graph.node))
    report.ir_version = main.ir_version
    for c in report.checks:
        if not c.ok:
            report.warnings.append(f"specialized export differs from PyTorch on the {c.input} input "
                                   f"(max rel {c.max_rel:.2g}): that input takes the other branch")
    with step("writing the ONNX file"):
        _write_atomic(main, out_path)
        for t, p in extras.items():
            if t == target:
                shutil.copyfile(out_path, p)
            else:
                _write_atomic(written[t], p)
            report.extra_forms[t] = p
    report.notes.insert(0, _form_note(report))
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
    target: str = DEFAULT_TARGET,
    exporter: str = DEFAULT_EXPORTER,
    allow_specialize: bool = False,
) -> Path:
    """Export ``model`` to ONNX at ``path``, checked in ONNX Runtime against PyTorch.

    ``target``: ``"generic"`` (default; also ``"openvino"``, ``"tract"``) writes every involution
    as standard ops, a file ONNX Runtime, OpenVINO, tract and ``onnx.reference`` all run;
    ``"onnxruntime"`` writes one ``ai.repconv::Involution`` node each plus the model-local function,
    which repconv's native ORT kernel replaces where registered (only ORT and onnx.reference load it).
    ``exporter``: ``"dynamo"`` (torch.export, default) or ``"torchscript"`` (torch's tracer).
    ``allow_specialize``: export data-dependent Python control flow anyway, baking in the branch the
    example takes (the report's ``specialized`` says where); otherwise it is refused.

    The check compares ONNX Runtime with PyTorch on the example, two fresh inputs and, with
    ``dynamic_batch``, a second batch size; the file is written only when everything passed (temp
    file + rename). Raises :class:`ExportCheckError` beyond ``rtol``/``atol``,
    :class:`DataDependentError` for data-dependent control flow, :class:`UnsupportedOperatorError`
    for an operator without ONNX translation, :class:`ExportError` for other unexportable input.
    """
    return export_onnx_with_report(
        model, path, example_inputs, fuse=fuse, opset=opset, simplify=simplify, dynamic_batch=dynamic_batch,
        rtol=rtol, atol=atol, target=target, exporter=exporter, allow_specialize=allow_specialize,
    ).path

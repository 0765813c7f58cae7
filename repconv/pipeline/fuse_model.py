"""``repconv.fuse``: deploy rewrites, capture, the graph pass, verification - in that order.

This layer sits above ``repconv.graph`` (the pass) and ``repconv.dynamic`` (deploy forms of the
dynamic operators); neither imports the other.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from repconv import verification
from repconv.diagnose import describe_forward_failure
from repconv.dynamic import deploy_rewrites
from repconv.graph import FuseReport, first_divergence, rewrite
from repconv.graph.leftovers import sweep_leftovers
from repconv.io import ModelLoadError, infer_input_shape
from repconv.util import eval_mode, first_line, step
from repconv.verification import DEFAULT_ATOL, DEFAULT_RTOL, Inputs, VerificationError, as_tuple

from . import capture


class FuseInputError(ValueError):
    """The model or its inputs cannot be fused (NaN weights, wrong input shape, ...)."""


def fuse(model: nn.Module, example_inputs: Inputs | None = None, *, verify: bool = True,
         rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL) -> nn.Module:
    """Return a NEW eval-mode module with every exactly-fusable linear region collapsed into one
    conv / linear. ``model`` is left untouched. Raises :class:`repconv.VerificationError` if the
    result does not match (``verify=True``)."""
    return fuse_with_report(model, example_inputs, verify=verify, rtol=rtol, atol=atol)[0]


def fuse_with_report(model: nn.Module, example_inputs: Inputs | None = None, *, verify: bool = True,
                     rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                     samples: Sequence[Inputs] = (), seed: int = 0) -> tuple[nn.Module, FuseReport]:
    """:func:`fuse` plus a :class:`FuseReport` of what was fused, what was left and why."""
    if not isinstance(model, nn.Module):
        raise FuseInputError(f"expected an nn.Module, got {type(model).__name__}")
    _check_finite(model)
    report = FuseReport()
    # a copy: the pass runs the model, which may modify its input in place
    inputs = tuple(t.clone() for t in _example_inputs(model, example_inputs, seed))
    report.input_shapes = [list(t.shape) for t in inputs]
    if model.training:
        report.notes.append("model was in train mode: fused an eval-mode copy (BN uses running statistics)")
    with eval_mode(model), torch.no_grad(), step("tracing and fusing"):
        # dynamic operators (CondConv, PSConv, ...) first take their inference form
        if isinstance(model, torch.jit.ScriptModule):
            source: nn.Module = _from_torchscript(model, inputs)
            report.notes.append("TorchScript model: converted to an fx graph of aten ops first")
        else:
            source, swapped = deploy_rewrites(model)
            if swapped:
                report.notes.append("deploy rewrites: " + ", ".join(swapped))
            source = _self_reparameterize(source, source is not model, report)
        # the pass never mutates the modules it reads; the deepcopy at the end detaches the result
        # from the user's model while copying only what survived fusion
        fused = copy.deepcopy(_fuse_module(source, inputs, report, "", rtol, atol))
    fused.eval()
    sweep_leftovers(fused, report)
    report.params_before = sum(p.numel() for p in model.parameters())
    report.params_after = sum(p.numel() for p in fused.parameters())
    if verify:
        gen = torch.Generator().manual_seed(seed + 1)
        checks = [inputs] + [tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)
                                   if t.is_floating_point() else t for t in inputs) for _ in range(2)]
        checks += [as_tuple(s) for s in samples]
        ref64 = functools.cache(lambda: _float64_copy(model, inputs, report))
        with eval_mode(model), step("verifying"):
            result = verification.verify(model, fused, checks, rtol=rtol, atol=atol, float64_reference=ref64)
            if not result.ok and ref64() is not None:
                result.float64_fold = _float64_fold(ref64(), checks, report)
            if not result.ok:
                result.first_divergence = first_divergence(model, fused, inputs, rtol, atol)
        report.verification = result
        if not result.ok:
            raise VerificationError(result)
    return fused, report



def _float64_fold(ref64: nn.Module, checks: list[tuple[torch.Tensor, ...]],
                  report: FuseReport) -> list[verification.OutputStats] | None:
    """The same fusion of the float64 copy, compared with it: exact when the rewrite is (see
    repconv/verification.py). None where it does not reach the same structure."""
    try:
        fused64, report64 = fuse_with_report(ref64, tuple(t.double() if t.is_floating_point() else t
                                                          for t in checks[0]), verify=False)
    except Exception:  # noqa: BLE001 - the float64 run is an extra check; without it the verdict stands
        return None
    if [r.module_path for r in report64.regions] != [r.module_path for r in report.regions]:
        return None
    stats: list[verification.OutputStats] = []
    with torch.no_grad():
        for sample in checks:
            s64 = tuple(t.double() if t.is_floating_point() else t.clone() for t in sample)
            found = verification.compare_outputs(ref64(*(t.clone() for t in s64)), fused64(*s64))
            stats = found if not stats else [max(a, b, key=lambda o: o.max_rel) for a, b in zip(stats, found,
                                                                                                strict=True)]
    return stats


def _float64_copy(model: nn.Module, inputs: tuple[torch.Tensor, ...], report: FuseReport) -> nn.Module | None:
    """The original in float64: the reference the fused model is measured against (see
    repconv/verification.py). None (compare with the original itself) where it cannot run so."""
    if not any(t.is_floating_point() for t in inputs):
        return None
    try:
        ref = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            ref(*(t.double() if t.is_floating_point() else t for t in inputs))
        return ref
    except Exception as e:  # custom ops without float64 kernels, dtype-pinned code
        report.notes.append(f"verified against the original in its own dtype (no float64 copy: {first_line(e)})")
        return None


# --------------------------------------------------------------------------- the pass

def _from_torchscript(model: torch.jit.ScriptModule, inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """A scripted model as an fx graph (torch's TorchScript -> ExportedProgram converter)."""
    import logging
    import warnings

    from torch._export.converter import TS2EPConverter

    export_log = logging.getLogger("torch._export")
    level = export_log.level
    try:
        export_log.setLevel(logging.ERROR)  # shape-specialisation chatter, not the user's problem
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = TS2EPConverter(model, inputs).convert().module()
    except Exception as e:
        raise FuseInputError(f"cannot convert the TorchScript model to a graph: {first_line(e)}") from None
    finally:
        export_log.setLevel(level)
    for node in list(gm.graph.nodes):  # export's input guards: checks only, and not scriptable
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
    gm.meta["repconv_pretraced"] = True
    return gm


def _fuse_module(work: nn.Module, inputs: tuple[torch.Tensor, ...], report: FuseReport, prefix: str,
                 rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL) -> nn.Module:
    if isinstance(work, fx.GraphModule) and work.meta.get("repconv_pretraced"):
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints tracebacks itself
                ShapeProp(work).propagate(*inputs)
        except Exception as e:
            _check_runs(work, inputs)  # a user error (wrong shape) is reported as such
            report.untraced.append(f"{type(work).__name__}: shape propagation failed: {first_line(e, 120)}")
            return work
        return rewrite(work, report, prefix)
    _check_runs(work, inputs)  # one real forward: a failure is the user's input not fitting the model
    return capture.fuse_calls(work, [capture.Call(inputs, {})], capture.Capture(report, rtol, atol), prefix)


def _self_reparameterize(model: nn.Module, owned: bool, report: FuseReport) -> nn.Module:
    """Blocks that declare ``fuse_by_reparameterize`` (repconv's RepMLP: reshapes the fx pass cannot
    see through) convert themselves first, on a copy."""
    names = [n for n, m in model.named_modules() if getattr(m, "fuse_by_reparameterize", False)]
    if not names:
        return model
    work = model if owned else copy.deepcopy(model)
    for name in names:
        work.get_submodule(name).reparameterize()
    report.notes.append("self re-parameterized: " + ", ".join(n or "(top)" for n in names))
    return work


# --------------------------------------------------------------------------- checks and inputs

def _check_finite(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FuseInputError(f"{name} contains NaN or Inf: refusing to fuse a broken model")


def _example_inputs(model: nn.Module, example_inputs: Inputs | None, seed: int) -> tuple[torch.Tensor, ...]:
    if example_inputs is not None:
        try:
            return as_tuple(example_inputs)
        except TypeError as e:
            raise FuseInputError(str(e)) from None
    try:
        shape = infer_input_shape(model)
    except ModelLoadError as e:
        raise FuseInputError(str(e)) from None
    p = next(model.parameters(), None)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype if p.is_floating_point() else torch.float32)
    return (x,)


def _check_runs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Run the model once; a failure is the model not running on these inputs: say why."""
    try:
        model(*inputs)
    except Exception as e:
        raise FuseInputError(describe_forward_failure(model, inputs, e)) from None



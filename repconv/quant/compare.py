"""Layer-by-layer comparison of two models: PyTorch vs ONNX, ONNX vs ONNX (fp32 vs INT8), PyTorch vs PyTorch.

Layers are lined up by name (see :mod:`repconv.quant.taps`): ONNX vs ONNX by tensor name (an INT8
tensor is read after its DequantizeLinear: what the next layer sees), PyTorch vs ONNX by the module
path the ONNX weights carry, PyTorch vs PyTorch by module path. When a PyTorch reference shares
few names with the candidate because the candidate is its fused / exported form, the reference is
fused with ``repconv.fuse`` (verified exact) and its fused modules are compared instead; the report
says so. The figures per layer are those of :mod:`repconv.quant.metrics`; a layer diverges when
``max|err| > atol + rtol * max|ref|`` (or, with ``min_sqnr``, when its SQNR drops below that). The
first diverging layer is the first in the reference's execution order.

Reading intermediate tensors of a QDQ model makes them graph outputs, which can stop ONNX Runtime
from fusing the QDQ pattern around them into integer kernels; those layers then run in float on
dequantized values, which differs from the integer path by rounding only. The final-output row always
comes from unmodified sessions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from repconv.util import eval_mode

from .metrics import ErrorStats, finite_or_none
from .taps import Layer, OnnxLayers, TorchLayers, plain_outputs

Model = nn.Module | onnx.ModelProto


@dataclass
class LayerDiff:
    label: str
    op: str
    key: str
    stats: ErrorStats
    diverged: bool = False

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        return {"layer": self.label, "op": self.op, "key": self.key, "shape": s.shape,
                "max_abs": finite_or_none(s.max_abs), "max_rel": finite_or_none(s.max_rel),
                "cosine": finite_or_none(s.cosine), "sqnr_db": finite_or_none(s.sqnr_db),
                "diverged": self.diverged}


@dataclass
class CompareReport:
    layers: list[LayerDiff]
    output: ErrorStats
    rtol: float
    atol: float
    min_sqnr: float | None
    samples: int
    matching: str  # how layers were lined up
    first_divergence: str | None = None
    output_diverged: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.output_diverged and not any(lay.diverged for lay in self.layers)

    def to_dict(self) -> dict[str, Any]:
        o = self.output
        return {"ok": self.ok, "first_divergence": self.first_divergence, "rtol": self.rtol, "atol": self.atol,
                "min_sqnr": self.min_sqnr, "samples": self.samples, "matching": self.matching, "notes": self.notes,
                "output": {"max_abs": finite_or_none(o.max_abs), "max_rel": finite_or_none(o.max_rel),
                           "cosine": finite_or_none(o.cosine), "sqnr_db": finite_or_none(o.sqnr_db),
                           "diverged": self.output_diverged},
                "layers": [lay.to_dict() for lay in self.layers]}


class CompareError(ValueError):
    """The two models cannot be compared (different inputs / outputs); one line for the user."""


# A side = a function batch -> (outputs, {key: tensor}) over the keys asked for, plus its layers.
Runner = Callable[[np.ndarray], tuple[list[np.ndarray], dict[str, np.ndarray]]]


def compare_models(reference: Model, candidate: Model, batches: Sequence[np.ndarray], *, per_layer: bool = True,
                   rtol: float = 1e-4, atol: float = 1e-5, min_sqnr: float | None = None) -> CompareReport:
    """Run both on ``batches`` and report per-layer and output error of ``candidate`` against ``reference``."""
    if not batches:
        raise CompareError("no input samples to compare on")
    notes: list[str] = []
    with _evaluating(reference, candidate):
        pairs, matching, ref_run, cand_run = _line_up(reference, candidate, batches[0], per_layer, notes)
        ref_outs = plain_outputs(reference, batches) if isinstance(reference, onnx.ModelProto) else None
        cand_outs = plain_outputs(candidate, batches) if isinstance(candidate, onnx.ModelProto) else None
        output = ErrorStats()
        diffs = [LayerDiff(r.label, r.op, r.key, ErrorStats()) for r, _ in pairs]
        for i, b in enumerate(batches):
            r_outs, r_named = ref_run(b)
            c_outs, c_named = cand_run(b)
            r_outs = ref_outs[i] if ref_outs is not None else r_outs
            c_outs = cand_outs[i] if cand_outs is not None else c_outs
            if len(r_outs) != len(c_outs):
                raise CompareError(f"the models return {len(r_outs)} vs {len(c_outs)} outputs")
            for r, c in zip(r_outs, c_outs, strict=True):
                try:
                    output.add(r, c)
                except ValueError as e:
                    raise CompareError(f"output: {e}") from None
            for d, (r_layer, c_layer) in zip(diffs, pairs, strict=True):
                a, z = r_named.get(r_layer.tensor), c_named.get(c_layer.tensor)
                if a is not None and z is not None and a.shape == z.shape:
                    d.stats.add(a, z)
    kept = [d for d in diffs if d.stats.elements]
    if len(kept) < len(diffs):
        notes.append(f"{len(diffs) - len(kept)} matched layers had different shapes or did not run: left out")
    report = CompareReport(kept, output, rtol, atol, min_sqnr, sum(int(b.shape[0]) for b in batches), matching,
                           notes=notes)
    for d in kept:
        d.diverged = d.stats.exceeds(rtol, atol, min_sqnr)
    report.output_diverged = output.exceeds(rtol, atol, min_sqnr)
    first = next((d for d in kept if d.diverged), None)
    report.first_divergence = first.label if first else ("output" if report.output_diverged else None)
    return report


class _evaluating:
    """eval mode for PyTorch sides during the comparison (flags restored after)."""

    def __init__(self, *models: Model) -> None:
        self.contexts = [eval_mode(m) for m in models if isinstance(m, nn.Module)]

    def __enter__(self) -> None:
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for c in reversed(self.contexts):
            c.__exit__(*exc)


def _line_up(reference: Model, candidate: Model, probe: np.ndarray, per_layer: bool, notes: list[str]
             ) -> tuple[list[tuple[Layer, Layer]], str, Runner, Runner]:
    ref_onnx, cand_onnx = isinstance(reference, onnx.ModelProto), isinstance(candidate, onnx.ModelProto)
    if ref_onnx and cand_onnx:
        ref_l, cand_l = OnnxLayers(reference), OnnxLayers(candidate)
        pairs = []
        if per_layer:
            for layer in ref_l.tensor_layers():
                t = cand_l.resolve(layer.tensor)
                if t is not None:
                    pairs.append((layer, Layer(layer.key, layer.label, layer.op, t)))
        return pairs, "ONNX tensor names", _onnx_runner(ref_l, [p[0] for p in pairs]), \
            _onnx_runner(cand_l, [p[1] for p in pairs])
    if ref_onnx or cand_onnx:
        onnx_model = reference if ref_onnx else candidate
        torch_model = candidate if ref_onnx else reference
        onnx_l = OnnxLayers(onnx_model)
        layers = onnx_l.module_layers() if per_layer else []
        torch_l = _pick_torch(torch_model, {lay.key for lay in layers}, probe, notes)
        pairs = [(lay, Layer(lay.key, lay.label, lay.op, lay.key)) for lay in layers if lay.key in torch_l.seen]
        if per_layer and len(pairs) < len(layers):
            notes.append(f"{len(layers) - len(pairs)} ONNX layers have no module of that name in the PyTorch model")
        onnx_run = _onnx_runner(onnx_l, [p[0] for p in pairs])
        torch_run = torch_l.runner({p[1].tensor for p in pairs})
        if ref_onnx:
            return pairs, "module names (ONNX weight names)", onnx_run, torch_run
        return [(b, a) for a, b in pairs], "module names (ONNX weight names)", torch_run, onnx_run
    cand_t = _TorchSide(TorchLayers(candidate), probe)
    ref_t = _pick_torch(reference, set(cand_t.seen) if per_layer else set(), probe, notes)
    keys = [k for k in ref_t.order if k in cand_t.seen and ref_t.seen[k] == cand_t.seen[k]] if per_layer else []
    pairs = [(Layer(k, ref_t.layers.label(k), ref_t.layers.kinds.get(k, "op"), k),) * 2 for k in keys]
    return pairs, "module names", ref_t.runner(set(keys)), cand_t.runner(set(keys))


def _onnx_runner(layers: OnnxLayers, wanted: Sequence[Layer]) -> Runner:
    return layers.runner([w.tensor for w in wanted])


class _TorchSide:
    """Recorded layers of ``layers``; the outputs always come from ``outputs_of`` (the user's own model)."""

    def __init__(self, layers: TorchLayers, probe: np.ndarray, outputs_of: nn.Module | None = None) -> None:
        self.layers = layers
        self.outputs_of = outputs_of
        self.seen, self.order = layers.shapes(probe)

    def runner(self, keep: set[str]) -> Runner:
        def run(batch: np.ndarray) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
            outs, named, _ = self.layers(batch, keep)
            if self.outputs_of is not None:
                outs = TorchLayers(self.outputs_of)(batch, set())[0]
            return outs, named
        return run


def _pick_torch(model: nn.Module, wanted: set[str], probe: np.ndarray, notes: list[str]) -> _TorchSide:
    """The model itself, or its fused form when that shares more layer names with the other side."""
    side = _TorchSide(TorchLayers(model), probe)
    hits = len(wanted & set(side.seen))
    if not wanted or hits == len(wanted):
        return side
    from repconv.pipeline import fuse_with_report

    try:
        fused, rep = fuse_with_report(model, torch.from_numpy(np.ascontiguousarray(probe)))
    except Exception as e:  # not fusable: compare what matches
        notes.append(f"the PyTorch reference could not be fused to line up with the candidate: {str(e)[:120]}")
        return side
    fused_side = _TorchSide(TorchLayers(fused), probe, outputs_of=model)
    if len(wanted & set(fused_side.seen)) > hits:
        v = rep.verification
        how = f" (verified: max rel {v.max_rel:.2g})" if v is not None else ""
        notes.append(f"the PyTorch model's layers are read from its repconv-fused form{how}, whose module names "
                     "the other model carries")
        return fused_side
    return side

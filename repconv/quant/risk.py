"""Quantization risk of a fused model, per layer and per output channel, traced back to the branches.

For every conv / linear of the fused model:

* weights per output channel: min, max, abs-max, and each channel's abs-max over the layer's median
  abs-max; channels at ``outlier_ratio`` times the median or more are outliers;
* activations on calibration data: the range of the layer's input and of the tensor INT8 will hold
  for its output (after a ReLU that follows it: ONNX Runtime quantizes the ReLU's output and drops the
  ReLU), per output channel abs-max, outlier channels the same way;
* for each outlier, which branch of the original model put it there: the fusion report decomposes the
  fused kernel into one additive term per original branch (``Region.terms``), so the extreme weight
  ``W[c, t]`` splits exactly into ``sum_b W_b[c, t]``, and the extreme activation ``y[c]`` at the
  place it occurred into ``sum_b (W_b * x + bias_b)[c]``;
* the layer's own quantization noise predicted from these ranges: a uniform quantizer of step D adds
  noise of power D^2 / 12, so per-channel symmetric int8 weights give SQNR_w = sum w^2 / sum_c n_c
  (D_c^2 / 12) with D_c = absmax_c / 127 (/ 64 with 7-bit weights), and a per-tensor 8-bit activation over
  [min(0, lo), max(0, hi)] gives SQNR_a = E[t^2] / (D^2 / 12) with D = range / 255. A channel whose
  range is far above the others' stretches the per-tensor step for all of them: that is how the
  identity / 1x1 BNs of RepVGG ruin INT8 (arXiv 2212.01593);
* the risk itself, the model's output SQNR with that layer alone in INT8: its input, weights and output
  rounded on the grids ONNX Runtime's static quantization would use for those ranges (per-tensor
  activations including 0, per-channel symmetric weights), the rest of the model in fp32, on the
  calibration data. Local noise matters in proportion to how much of it reaches the output (pooling
  averages it away, the classifier passes it on), which this measures and the local figures cannot.
  ``repconv compare --sensitivity`` measures the same with ONNX Runtime itself.

Layers are ranked by that output SQNR, lowest (riskiest) first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from repconv.graph import FuseReport, region_kind, region_result
from repconv.util import eval_mode, tensor_leaves

from .metrics import ErrorStats, finite_or_none

DEFAULT_OUTLIER_RATIO = 4.0
WEIGHT_QMAX = 127  # ORT's symmetric int8 weights: q in [-127, 127], scale = absmax / 127
REDUCED_WEIGHT_QMAX = 64  # with reduce_range: q in [-64, 64]
ACT_LEVELS = 255.0
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass
class Contribution:
    """One original branch's additive part of an outlier value."""

    label: str
    ops: list[str]
    value: float
    share: float  # value / the outlier's value

    def to_dict(self) -> dict[str, Any]:
        return {"branch": self.label, "ops": self.ops, "value": self.value, "share": finite_or_none(self.share)}


@dataclass
class Outlier:
    channel: int
    ratio: float  # channel abs-max / median channel abs-max of the layer
    value: float  # the extreme weight or activation (signed)
    where: str  # weight: "in 3, tap (1, 1)"; activation: "sample 0, at (4, 7)"
    index: list[int] = field(default_factory=list)  # weight: (in, ky, kx); activation: (sample, y, x)
    branches: list[Contribution] = field(default_factory=list)  # largest |value| first; [] when unknown

    @property
    def top(self) -> Contribution | None:
        return self.branches[0] if self.branches else None

    def to_dict(self) -> dict[str, Any]:
        return {"channel": self.channel, "ratio": finite_or_none(self.ratio), "value": self.value,
                "where": self.where, "index": self.index, "branches": [b.to_dict() for b in self.branches]}


@dataclass
class LayerRisk:
    name: str  # module path in the fused model
    block: str  # the original block it came from ('' when the layer was not fused)
    kind: str  # "3 branches", "conv+bn", "conv" (left as it was), ...
    result: str  # "3x3 conv", "linear"
    out_channels: int
    weight_min: list[float]
    weight_max: list[float]
    weight_absmax: list[float]
    weight_ratio: float
    weight_outliers: list[Outlier]
    input_range: tuple[float, float]
    output_range: tuple[float, float]
    relu_after: bool
    act_absmax: list[float]  # per output channel, of the quantized output tensor
    act_ratio: float
    act_outliers: list[Outlier]
    weight_sqnr_db: float
    input_sqnr_db: float
    output_sqnr_db: float
    sqnr_db: float  # the three combined: the layer's local SQNR
    risk_sqnr_db: float = math.nan  # the model output's SQNR with this layer alone in INT8
    branches: list[str] = field(default_factory=list)  # labels of the decomposition terms
    rank: int = 0

    @property
    def top_outlier(self) -> tuple[str, Outlier] | None:
        """The most extreme outlier, weight or activation."""
        cands = [("activation", o) for o in self.act_outliers] + [("weight", o) for o in self.weight_outliers]
        return max(cands, key=lambda c: c[1].ratio) if cands else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank, "layer": self.name, "block": self.block, "kind": self.kind, "result": self.result,
            "out_channels": self.out_channels, "branches": self.branches,
            "output_sqnr_db": finite_or_none(self.risk_sqnr_db),
            "predicted_sqnr_db": {"total": finite_or_none(self.sqnr_db), "weights": finite_or_none(self.weight_sqnr_db),
                                  "input": finite_or_none(self.input_sqnr_db),
                                  "output": finite_or_none(self.output_sqnr_db)},
            "weights": {"min": self.weight_min, "max": self.weight_max, "absmax": self.weight_absmax,
                        "ratio": finite_or_none(self.weight_ratio),
                        "outliers": [o.to_dict() for o in self.weight_outliers]},
            "activations": {"input_range": list(self.input_range), "output_range": list(self.output_range),
                            "relu_after": self.relu_after, "channel_absmax": self.act_absmax,
                            "ratio": finite_or_none(self.act_ratio),
                            "outliers": [o.to_dict() for o in self.act_outliers]},
        }


@dataclass
class RiskReport:
    layers: list[LayerRisk]  # ranked, riskiest first
    samples: int
    outlier_ratio: float
    reduce_range: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "outlier_ratio": self.outlier_ratio, "reduce_range": self.reduce_range,
                "notes": self.notes,
                "ranking": [lr.name for lr in self.layers], "layers": [lr.to_dict() for lr in self.layers]}


# --------------------------------------------------------------------------- collection

@dataclass
class _Term:
    label: str
    ops: list[str]
    weight: Tensor | None
    bias: Tensor | None


class _LayerStats:
    """Running activation statistics of one layer over the calibration batches."""

    def __init__(self, module: nn.Module, relu_after: bool, terms: list[_Term]) -> None:
        self.module = module
        self.relu_after = relu_after
        self.terms = terms
        self.in_lo = self.out_lo = math.inf
        self.in_hi = self.out_hi = -math.inf
        self.in_sq = self.out_sq = 0.0
        self.in_n = self.out_n = 0
        self.ch_absmax: Tensor | None = None  # (C,)
        self.ch_where: list[tuple[str, list[int]]] = []
        self.ch_value: Tensor | None = None  # signed value at the abs-max
        self.ch_parts: Tensor | None = None  # (terms, C): decomposition of ch_value
        self.batch_index = 0

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            return
        x, y = args[0].detach(), output.detach()
        t = F.relu(y) if self.relu_after else y
        self.in_lo, self.in_hi = min(self.in_lo, float(x.min())), max(self.in_hi, float(x.max()))
        self.in_sq += float(x.double().square().sum())
        self.in_n += x.numel()
        self.out_lo, self.out_hi = min(self.out_lo, float(t.min())), max(self.out_hi, float(t.max()))
        self.out_sq += float(t.double().square().sum())
        self.out_n += t.numel()
        flat = _channels_first(t, module)  # (C, everything else)
        absmax, pos = flat.abs().max(dim=1)
        value = flat.gather(1, pos[:, None])[:, 0]
        if self.ch_absmax is None:
            self.ch_absmax = torch.full_like(absmax, -1.0)
            self.ch_value = torch.zeros_like(absmax)
            self.ch_where = [("", [])] * absmax.numel()
            if self.terms:
                self.ch_parts = torch.zeros(len(self.terms), absmax.numel(), dtype=torch.float64)
        better = absmax > self.ch_absmax
        if bool(better.any()):
            self.ch_absmax = torch.where(better, absmax, self.ch_absmax)
            self.ch_value = torch.where(better, value, self.ch_value)
            for c in better.nonzero()[:, 0].tolist():
                self.ch_where[c] = _where_in(y, module, int(pos[c]), self.batch_index)
            if self.ch_parts is not None:
                parts = self._branch_values(x, pos)
                self.ch_parts[:, better] = parts[:, better]
        self.batch_index += x.shape[0]

    def _branch_values(self, x: Tensor, pos: Tensor) -> Tensor:
        """Each term's output at each channel's abs-max position: (terms, C), float64. The convs run in
        the model's dtype: a share needs no more, and float64 convs are slow on CPUs."""
        m = self.module
        rows = []
        for term in self.terms:
            if term.weight is None:
                part = torch.zeros(pos.numel(), dtype=torch.float64)
            else:
                w = term.weight.to(device=x.device, dtype=x.dtype)
                part_out = m._conv_forward(x, w, None) if isinstance(m, nn.Conv1d | nn.Conv2d) else F.linear(x, w)
                part = _channels_first(part_out, m).gather(1, pos[:, None].to(part_out.device))[:, 0].double().cpu()
            if term.bias is not None:
                part = part + term.bias.detach().double().cpu().reshape(-1)
            rows.append(part)
        if self.relu_after:  # the ReLU keeps the sum where it is positive; the abs-max is there (or 0)
            total = torch.stack(rows).sum(0)
            rows = [torch.where(total > 0, r, torch.zeros_like(r)) for r in rows]
        return torch.stack(rows)


def _channels_first(t: Tensor, module: nn.Module) -> Tensor:
    """(C, rest) view: channels are dim 1 of a conv output and the last dim of a linear one."""
    if isinstance(module, nn.Linear):
        return t.reshape(-1, t.shape[-1]).transpose(0, 1)
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _where_in(y: Tensor, module: nn.Module, flat_index: int, first_sample: int) -> tuple[str, list[int]]:
    """Where a channel's flat position (in :func:`_channels_first` order) lies: text and (sample, *spatial)."""
    if isinstance(module, nn.Linear):
        rows_per_sample = max(1, y.numel() // y.shape[-1] // max(1, y.shape[0]))
        n = first_sample + flat_index // rows_per_sample
        return f"sample {n}", [n]
    spatial = list(y.shape[2:])
    per_sample = int(np.prod(spatial)) if spatial else 1
    n, rest = divmod(flat_index, per_sample)
    coords = [int(c) for c in np.unravel_index(rest, spatial)] if spatial else []
    return f"sample {first_sample + n}, at ({', '.join(map(str, coords))})", [first_sample + n, *coords]


def _relu_followed(fused: nn.Module) -> set[str]:
    """Module paths of layers whose only reader is a ReLU (fx graphs of the fused model)."""
    relus = {F.relu, torch.relu, torch.relu_}
    out: set[str] = set()
    for prefix, gm in fused.named_modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op != "call_module" or len(node.users) != 1:
                continue
            user = next(iter(node.users))
            is_relu = ((user.op == "call_function" and user.target in relus)
                       or (user.op == "call_method" and user.target in ("relu", "relu_"))
                       or (user.op == "call_module" and isinstance(gm.get_submodule(user.target), nn.ReLU)))
            if is_relu:
                out.add(f"{prefix}.{node.target}" if prefix else str(node.target))
    return out


def _region_terms(report: FuseReport | None) -> dict[str, tuple[Any, list[_Term]]]:
    """module path -> (region, decomposition terms) from the fusion report."""
    found: dict[str, tuple[Any, list[_Term]]] = {}
    for r in report.regions if report is not None else []:
        path = getattr(r, "module_path", "") or r.target
        terms = [_Term(t.label, list(t.ops), t.weight, t.bias) for t in getattr(r, "terms", None) or []]
        found[path] = (r, terms)
    return found


# --------------------------------------------------------------------------- statistics -> risk

def _ratio(absmax: Tensor) -> Tensor:
    live = absmax[absmax > 0]
    med = float(live.median()) if live.numel() else 0.0
    return absmax / med if med > 0 else torch.ones_like(absmax)


def _db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _act_sqnr(lo: float, hi: float, sq: float, n: int) -> float:
    step = (max(hi, 0.0) - min(lo, 0.0)) / ACT_LEVELS
    return _db(sq / max(n, 1), step * step / 12.0)


def combine_db(values: Sequence[float]) -> float:
    """SQNR of independent noises added together."""
    noise = sum(10.0 ** (-v / 10.0) for v in values)  # +inf dB: no noise; -inf dB: no signal
    return _db(1.0, noise)


def _weight_outliers(w: Tensor, ratio: Tensor, threshold: float, terms: list[_Term]) -> list[Outlier]:
    flat = w.detach().double().reshape(w.shape[0], -1).cpu()
    out = []
    for c in (ratio >= threshold).nonzero()[:, 0].tolist():
        t = int(flat[c].abs().argmax())
        value = float(flat[c, t])
        idx = np.unravel_index(t, tuple(w.shape[1:]))
        where = f"in {int(idx[0])}" + (f", tap ({', '.join(str(int(i)) for i in idx[1:])})" if len(idx) > 1 else "")
        parts = [Contribution(term.label, term.ops, float(term.weight.reshape(w.shape[0], -1)[c, t]), 0.0)
                 for term in terms if term.weight is not None]
        out.append(Outlier(c, float(ratio[c]), value, where, [int(i) for i in idx], _ranked(parts, value)))
    return sorted(out, key=lambda o: -o.ratio)


def _ranked(parts: list[Contribution], total: float) -> list[Contribution]:
    for p in parts:
        p.share = p.value / total if total else math.nan
    return sorted(parts, key=lambda p: -abs(p.value))


def analyze_risk(fused: nn.Module, report: FuseReport | None, batches: Sequence[Tensor], *,
                 outlier_ratio: float = DEFAULT_OUTLIER_RATIO, reduce_range: bool | None = None) -> RiskReport:
    """Risk of every conv / linear in ``fused`` (the output of ``repconv.fuse_with_report``) on the
    calibration ``batches``; ``report`` supplies the branch decomposition of fused layers.
    ``reduce_range``: 7-bit weights, as ``repconv quantize`` uses on this CPU by default."""
    from .ort_quant import default_reduce_range

    reduce_range = default_reduce_range() if reduce_range is None else reduce_range
    qmax = REDUCED_WEIGHT_QMAX if reduce_range else WEIGHT_QMAX
    if outlier_ratio <= 1.0:
        raise ValueError(f"outlier_ratio must be above 1, got {outlier_ratio}")
    regions = _region_terms(report)
    relu = _relu_followed(fused)
    layers = [(name, m) for name, m in fused.named_modules() if isinstance(m, LAYER_TYPES)]
    stats = {name: _LayerStats(m, name in relu, regions.get(name, (None, []))[1]) for name, m in layers}
    notes = []
    if regions and not any(terms for _, terms in regions.values()):
        notes.append("the fusion report carries no branch decomposition: outliers are not attributed to branches")
    risks = []
    with eval_mode(fused), torch.no_grad():
        hooks = [m.register_forward_hook(stats[name]) for name, m in layers]
        try:
            for b in batches:
                fused(b)
        finally:
            for h in hooks:
                h.remove()
        for name, m in layers:
            s = stats[name]
            if s.ch_absmax is None:
                notes.append(f"{name} did not run on the calibration data: skipped")
                continue
            region, terms = regions.get(name, (None, []))
            risks.append(_layer_risk(name, m, s, region, terms, outlier_ratio, qmax))
        _simulate_each(fused, dict(layers), stats, risks, batches, qmax)
    risks.sort(key=lambda r: (r.risk_sqnr_db, r.sqnr_db))
    for i, r in enumerate(risks, 1):
        r.rank = i
    return RiskReport(risks, sum(int(b.shape[0]) for b in batches), outlier_ratio, reduce_range, notes)


def _layer_risk(name: str, m: nn.Module, s: _LayerStats, region: Any, terms: list[_Term],
                threshold: float, qmax: int) -> LayerRisk:
    w = m.weight.detach().double().cpu()
    per_ch = w.reshape(w.shape[0], -1)
    absmax = per_ch.abs().max(dim=1).values
    w_ratio = _ratio(absmax)
    step = absmax / qmax
    w_noise = float((step.square() / 12.0).sum() * per_ch.shape[1])
    weight_sqnr = _db(float(per_ch.square().sum()), w_noise)
    input_sqnr = _act_sqnr(s.in_lo, s.in_hi, s.in_sq, s.in_n)
    output_sqnr = _act_sqnr(s.out_lo, s.out_hi, s.out_sq, s.out_n)
    act_absmax = s.ch_absmax.double().cpu()
    a_ratio = _ratio(act_absmax)
    act_outliers = []
    for c in (a_ratio >= threshold).nonzero()[:, 0].tolist():
        value = float(s.ch_value[c])
        parts = ([Contribution(t.label, t.ops, float(s.ch_parts[i, c]), 0.0) for i, t in enumerate(terms)]
                 if s.ch_parts is not None else [])
        where, index = s.ch_where[c]
        act_outliers.append(Outlier(c, float(a_ratio[c]), value, where, index, _ranked(parts, value)))
    act_outliers.sort(key=lambda o: -o.ratio)
    kind = region_kind(region) if region is not None else type(m).__name__.lower()
    result = region_result(region) if region is not None else _shape_label(m)
    return LayerRisk(
        name=name, block=region.block if region is not None else "", kind=kind, result=result,
        out_channels=int(w.shape[0]), weight_min=per_ch.min(dim=1).values.tolist(),
        weight_max=per_ch.max(dim=1).values.tolist(), weight_absmax=absmax.tolist(),
        weight_ratio=float(w_ratio.max()), weight_outliers=_weight_outliers(w, w_ratio, threshold, terms),
        input_range=(s.in_lo, s.in_hi), output_range=(s.out_lo, s.out_hi), relu_after=s.relu_after,
        act_absmax=act_absmax.tolist(), act_ratio=float(a_ratio.max()), act_outliers=act_outliers,
        weight_sqnr_db=weight_sqnr, input_sqnr_db=input_sqnr, output_sqnr_db=output_sqnr,
        sqnr_db=combine_db([weight_sqnr, input_sqnr, output_sqnr]), branches=[t.label for t in terms])


def _shape_label(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        g = f", groups {m.groups}" if m.groups > 1 else ""
        return f"{m.kernel_size[0]}x{m.kernel_size[1]} conv{g}"
    if isinstance(m, nn.Conv1d):
        return f"{m.kernel_size[0]} conv1d"
    return "linear"


# --------------------------------------------------------------------------- one layer in INT8

def fake_quant_activation(x: Tensor, lo: float, hi: float) -> Tensor:
    """8-bit per-tensor rounding over [min(0, lo), max(0, hi)] with an exact zero (ORT's QDQ activations)."""
    rmin, rmax = min(lo, 0.0), max(hi, 0.0)
    scale = (rmax - rmin) / ACT_LEVELS
    if scale <= 0:
        return x
    zero = round(-rmin / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, ACT_LEVELS) - zero) * scale


def fake_quant_weight(w: Tensor, qmax: int = WEIGHT_QMAX) -> Tensor:
    """Per-output-channel symmetric rounding onto [-qmax, qmax] * absmax / qmax (ORT's per-channel weights)."""
    absmax = w.detach().reshape(w.shape[0], -1).abs().amax(1).clamp_min(1e-30)
    scale = (absmax / qmax).reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


def _int8_forward(m: nn.Module, s: _LayerStats, qmax: int) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not args or not isinstance(args[0], Tensor):
            return None
        x = fake_quant_activation(args[0], s.in_lo, s.in_hi)
        w = fake_quant_weight(module.weight, qmax)
        y = module._conv_forward(x, w, module.bias) if isinstance(module, nn.Conv1d | nn.Conv2d) else F.linear(
            x, w, module.bias)
        return fake_quant_activation(y, s.out_lo if not s.relu_after else 0.0, s.out_hi)
    return m.register_forward_hook(hook)


def _simulate_each(fused: nn.Module, modules: dict[str, nn.Module], stats: dict[str, _LayerStats],
                   risks: list[LayerRisk], batches: Sequence[Tensor], qmax: int) -> None:
    """``risk_sqnr_db`` of each layer: the output SQNR with only that layer rounded to INT8."""
    with torch.no_grad():
        reference = [[t.detach().double().numpy() for t in tensor_leaves(fused(b))] for b in batches]
        for r in risks:
            handle = _int8_forward(modules[r.name], stats[r.name], qmax)
            try:
                err = ErrorStats()
                for b, ref in zip(batches, reference, strict=True):
                    for a, z in zip(ref, tensor_leaves(fused(b)), strict=True):
                        err.add(a, z.detach().double().numpy())
            finally:
                handle.remove()
            r.risk_sqnr_db = err.sqnr_db

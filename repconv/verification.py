"""Numerical equivalence of two models.

Tolerance: a fused fp32 conv sums the same products in a different order (and with weights
rounded once from fp64), so its error is a few fp32 ulps of the output scale per layer: ~1e-7
relative for one layer, growing to ~1e-6 over a deep net. The default ``rtol=1e-5`` (relative to
the largest reference magnitude) leaves an order of magnitude of headroom over that, while any
real mistake (a wrong padding, a missed BN, a transposed kernel) gives errors of 1e-2 or more.
Half-precision outputs cannot be that exact: the relative tolerance never drops below 8 ulps of
the output dtype (7.8e-3 for float16, 6.3e-2 for bfloat16).

Where that direct comparison fails and a float64 reference is at hand (``float64_reference=``,
what ``repconv.fuse`` passes), errors are measured from the float64 evaluation of the original
instead, and the candidate may also deviate by a few times (4x) the original's own error. An exact
fold before an ill-conditioned op (a LayerNorm over near-constant tokens) amplifies the rounding of
*any* fp32 evaluation, the original's included; comparing two fp32 evaluations with each other
would call that a mismatch.

Last, where even that fails, ``repconv.fuse`` repeats the same fusion on a float64 copy and
compares it with the float64 original (``float64_fold``): when those agree to 1e-9 relative the
rewrite is exact, and the float32 difference comes from ops that select by order (topk, sort,
argmax in detection heads turn fp32 rounding of near-tied scores into swapped rows, as any fp32
re-evaluation of the model would). The report then passes and says which check carried it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from repconv.util import tensor_leaves

DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-6

Inputs = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]


@dataclass
class OutputStats:
    index: int
    shape: list[int]
    max_abs: float
    max_rel: float  # max |err| / max |reference|
    cosine: float
    ref_max: float
    finite: bool
    rtol_floor: float = 0.0  # 8 ulps of a float16 / bfloat16 output: they cannot do better
    baseline_err: float = 0.0  # the original's own max |error| vs the float64 reference (0: none used)

    @property
    def allowed(self) -> float:
        return BASELINE_FACTOR * self.baseline_err


# a second low-precision evaluation of the same function may deviate this many times as much as
# the first one does from the float64 truth
BASELINE_FACTOR = 4.0
# the same fusion done in float64 against the float64 original: float64 rounding (~1e-16) grown by
# a deep net stays far below this, any real mistake (a wrong padding, a missed BN) is 1e-3 or more
FLOAT64_FOLD_RTOL = 1e-9


def _ulp_floor(dtype: torch.dtype) -> float:
    """8 ulps for half-precision outputs only: fp32 / fp64 use the rtol the caller asked for."""
    return 8 * torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 0.0


@dataclass
class VerifyReport:
    outputs: list[OutputStats]
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    samples: int = 1
    first_divergence: str | None = None  # module / layer whose output diverges first
    notes: list[str] = field(default_factory=list)
    float64_fold: list[OutputStats] | None = None  # the same fusion in float64 vs the float64 original

    @property
    def ok(self) -> bool:
        if not self.outputs or not all(o.finite for o in self.outputs):
            return False
        return self.direct_ok or self.fold_exact

    @property
    def direct_ok(self) -> bool:
        return all(o.max_abs <= self.tolerance(o) for o in self.outputs)

    @property
    def fold_exact(self) -> bool:
        return bool(self.float64_fold) and all(
            o.finite and o.max_abs <= FLOAT64_FOLD_RTOL * o.ref_max for o in self.float64_fold)

    def tolerance(self, o: OutputStats) -> float:
        return self.atol + max(self.rtol, o.rtol_floor) * o.ref_max + o.allowed

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=float("nan"))

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=float("nan"))

    @property
    def cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=float("nan"))

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "rtol": self.rtol, "atol": self.atol, "samples": self.samples,
                "max_abs": self.max_abs, "max_rel": self.max_rel, "cosine": self.cosine,
                "first_divergence": self.first_divergence, "outputs": [asdict(o) for o in self.outputs],
                "float64_fold": [asdict(o) for o in self.float64_fold] if self.float64_fold else None,
                "notes": self.notes}

    def summary(self) -> str:
        where = f"; first diverging layer: {self.first_divergence}" if self.first_divergence else ""
        rtol = max([self.rtol] + [o.rtol_floor for o in self.outputs])
        own = max((o.baseline_err for o in self.outputs), default=0.0)
        base = f" + {BASELINE_FACTOR:g}x the original's own error {own:.3g}" if own else ""
        text = (f"max abs err {self.max_abs:.3g}, max rel err {self.max_rel:.3g}, cosine {self.cosine:.9f} "
                f"(tolerance atol {self.atol:g} + rtol {rtol:g}·max|ref|{base}){where}")
        if self.float64_fold and not self.direct_ok:
            fold = max(o.max_rel for o in self.float64_fold)
            text += f"; the same fusion in float64 vs the float64 original: max rel err {fold:.3g} "
            text += (f"(exact within {FLOAT64_FOLD_RTOL:g}: the float32 difference comes from order-selecting "
                     "ops - topk / sort / argmax - meeting fp32 rounding)" if self.fold_exact else
                     f"(not exact: above {FLOAT64_FOLD_RTOL:g})")
        return text


class VerificationError(RuntimeError):
    """The fused model does not match the original; ``.report`` has the figures."""

    def __init__(self, report: VerifyReport):
        self.report = report
        super().__init__(f"fused model does not match the original: {report.summary()}")


def as_tuple(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, list | tuple) and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs)
    raise TypeError("example inputs must be a tensor or a tuple of tensors")


def compare_outputs(ref: Any, out: Any) -> list[OutputStats]:
    ref_t, out_t = tensor_leaves(ref), tensor_leaves(out)
    if len(ref_t) != len(out_t):
        raise ValueError(f"models return {len(ref_t)} vs {len(out_t)} tensors")
    stats = []
    for i, (r, o) in enumerate(zip(ref_t, out_t, strict=True)):
        if r.shape != o.shape:
            raise ValueError(f"output {i}: shape {tuple(o.shape)} differs from reference {tuple(r.shape)}")
        r64, o64 = r.detach().double().cpu(), o.detach().double().cpu()
        finite = bool(torch.isfinite(o64).all()) and bool(torch.isfinite(r64).all())
        err = (r64 - o64).abs()
        max_abs = float(err.max()) if err.numel() else 0.0
        ref_max = float(r64.abs().max()) if r64.numel() else 0.0
        denom = float(r64.norm() * o64.norm())
        cosine = float((r64.flatten() @ o64.flatten()) / denom) if denom > 0 else 1.0
        stats.append(OutputStats(i, list(r.shape), max_abs, max_abs / ref_max if ref_max > 0 else max_abs,
                                 cosine, ref_max, finite, _ulp_floor(r.dtype)))
    return stats


def _merge(a: list[OutputStats], b: list[OutputStats]) -> list[OutputStats]:
    if not a:
        return b
    return [OutputStats(x.index, x.shape, max(x.max_abs, y.max_abs), max(x.max_rel, y.max_rel),
                        min(x.cosine, y.cosine), max(x.ref_max, y.ref_max), x.finite and y.finite,
                        max(x.rtol_floor, y.rtol_floor), max(x.baseline_err, y.baseline_err))
            for x, y in zip(a, b, strict=True)]


@torch.no_grad()
def verify(reference: nn.Module, candidate: nn.Module, example_inputs: Inputs | Sequence[Inputs], *,
           rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
           float64_reference: nn.Module | Callable[[], nn.Module | None] | None = None) -> VerifyReport:
    """Run both models on the inputs (a tensor, a tuple of tensors, or a list of such samples) and
    report max absolute / relative error and cosine similarity per output.

    ``float64_reference`` (a float64 copy of ``reference``, or a function making one) is consulted
    only when the direct comparison fails: errors are then measured from its outputs and the
    original's own error is allowed for (module docstring). A float64 forward is several times
    slower than an fp32 one on CPU, so it is only paid for where it can change the verdict.
    """
    samples = _samples(example_inputs)
    outs = []
    stats: list[OutputStats] = []
    for sample in samples:
        # fresh copies per model: a model may modify its input in place (ReLU(inplace=True) on it)
        ref = reference(*(t.clone() for t in sample))
        out = candidate(*(t.clone() for t in sample))
        outs.append((ref, out))
        stats = _merge(stats, compare_outputs(ref, out))
    report = VerifyReport(stats, rtol, atol, len(samples))
    if report.ok or float64_reference is None:
        return report
    truth_model = float64_reference() if callable(float64_reference) and not isinstance(
        float64_reference, nn.Module) else float64_reference
    if truth_model is None:
        return report
    stats = []
    for sample, (ref, out) in zip(samples, outs, strict=True):
        truth = truth_model(*(t.double() if t.is_floating_point() else t.clone() for t in sample))
        found = compare_outputs(truth, out)
        for f, own, direct in zip(found, compare_outputs(truth, ref), compare_outputs(ref, out), strict=True):
            f.baseline_err, f.rtol_floor = own.max_abs, direct.rtol_floor  # the floor of the model's own dtype
        stats = _merge(stats, found)
    report = VerifyReport(stats, rtol, atol, len(samples))
    report.notes.append("measured against a float64 copy of the original")
    return report


def _samples(example_inputs: Any) -> list[tuple[torch.Tensor, ...]]:
    if isinstance(example_inputs, list) and example_inputs and not all(
            isinstance(t, torch.Tensor) for t in example_inputs):
        return [as_tuple(s) for s in example_inputs]
    return [as_tuple(example_inputs)]

"""What a fusion did: the regions rewritten, what was left and why, verification figures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import Tensor

from repconv.algebra import ConvKernel
from repconv.verification import VerifyReport

from .affine import Affine


@dataclass
class BranchTerm:
    """One original branch's exact share of a fused kernel, in float64 (``weight`` has the fused
    module's weight shape; None when the branch adds only a shift). The terms of a region sum to its
    fused weight and bias."""

    label: str  # the branch's module path in the original model, e.g. "stage1.0.rbr_identity"
    ops: list[str]
    weight: Tensor | None
    bias: Tensor | None


@dataclass
class Region:
    """One rewrite: ``output`` node replaced by one module computing ``value.kernel(value.root)``."""

    output: fx.Node
    value: Affine
    target: str = ""
    block: str = ""
    ops: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    module_path: str = ""  # where the fused module lives in the returned model
    # computes :attr:`terms` on first use: aligning every branch to the fused geometry costs as
    # much as the fusion itself, and only quantization analysis asks for it
    term_source: Callable[[], list[BranchTerm]] | None = field(default=None, repr=False, compare=False)
    _terms: list[BranchTerm] | None = field(default=None, repr=False, compare=False)

    @property
    def terms(self) -> list[BranchTerm]:
        """The fused kernel split exactly by original branch (empty when it was not tracked)."""
        if self._terms is None:
            self._terms = self.term_source() if self.term_source is not None else []
        return self._terms

    @property
    def branches(self) -> int:
        return self.value.branches


@dataclass
class Refusal:
    where: str
    reason: str


@dataclass
class FuseReport:
    regions: list[Region] = field(default_factory=list)
    left: list[Refusal] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verification: VerifyReport | None = None
    params_before: int = 0
    params_after: int = 0
    input_shapes: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "regions": [{"block": r.block, "kind": region_kind(r), "branches": r.branches, "ops": r.ops,
                         "result": region_result(r), "module": r.module_path, "params_before": r.params_before,
                         "params_after": r.params_after} for r in self.regions],
            "left": [{"where": x.where, "reason": x.reason} for x in self.left],
            "untraced": self.untraced, "notes": self.notes,
            "params_before": self.params_before, "params_after": self.params_after,
            "input_shapes": self.input_shapes,
            "verification": self.verification.to_dict() if self.verification else None,
        }



def region_kind(r: Region) -> str:
    """Short human label: conv+bn, bn+conv, linear+bn, or 'N branches'."""
    core = [_short(op) for op in r.ops]
    core = [c for c in core if c]
    if r.branches > 1:
        return f"{r.branches} branches"
    compact: list[str] = []
    for c in core:
        if not compact or compact[-1] != c:
            compact.append(c)
    return "+".join(compact) or "affine"


def region_result(r: Region) -> str:
    k = r.value.kernel
    if isinstance(k, ConvKernel):
        kh, kw = k.kernel_size
        g = f", groups {k.geom.groups}" if k.geom.groups > 1 else ""
        return f"{kh}x{kw} conv{g}"
    return "linear"


def _short(op: str) -> str:
    low = op.lower()
    for key, label in (("batchnorm", "bn"), ("batch_norm", "bn"), ("conv", "conv"), ("linear", "linear"),
                       ("layernorm", "ln"), ("avg_pool", "avgpool"), ("avgpool", "avgpool"), ("pad", "pad"),
                       ("cat", "concat")):
        if key in low:
            return label
    return ""



"""What fusion left in a model: every BatchNorm and norm affine still present, with a reason.

The pass reports what it met (refusals, lone ops); this sweep over the finished model also finds
what it never saw (code that was not traced), so the report lists everything that is left.
"""

from __future__ import annotations

from torch import nn

from .report import FuseReport, Refusal

_NORMS = (nn.LayerNorm, nn.GroupNorm)


def sweep_leftovers(fused: nn.Module, report: FuseReport) -> None:
    """Add to ``report.left`` every BatchNorm / affine norm module of ``fused`` it does not list yet."""
    listed = {r.where for r in report.left}
    untraced = [u.split(":", 1)[0].strip() for u in report.untraced]
    for name, m in fused.named_modules():
        bn = isinstance(m, nn.modules.batchnorm._BatchNorm)
        affine_norm = isinstance(m, _NORMS) and getattr(m, "weight", None) is not None
        if not (bn or affine_norm) or name in listed or _listed_parent(name, listed):
            continue
        where = next((u for u in untraced if name == u or name.startswith(u + ".")), None)
        if where is not None:
            reason = f"in {where}, which could not be traced (see untraced)"
        elif bn:
            reason = "BatchNorm the pass did not reach (not called by the example, or in a module it kept as is)"
        else:
            continue  # a traced norm whose affine had nothing to fold into is reported by the pass
        report.left.append(Refusal(name, reason))


def _listed_parent(name: str, listed: set[str]) -> bool:
    """A graph-level refusal for the whole module (an in-place op) covers its BatchNorms."""
    return any(name.startswith(p + ".") for p in listed if p)

"""The fusion pass over a torch.fx graph: capture (tracing), abstract values (affine), the analysis
that finds linear regions (regions), the rewrite, the report and divergence search."""

from __future__ import annotations

from .divergence import first_divergence
from .report import FuseReport, Refusal, Region, region_kind, region_result
from .rewrite import rewrite
from .tracing import trace

__all__ = ["FuseReport", "Refusal", "Region", "first_divergence", "region_kind", "region_result", "rewrite", "trace"]

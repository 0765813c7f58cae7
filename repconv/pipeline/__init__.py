"""Orchestration of ``repconv.fuse``: dynamic operators' deploy forms, self re-parameterizing blocks,
capture of what fx cannot trace, the graph pass and verification."""

from __future__ import annotations

from .fuse_model import FuseInputError, fuse, fuse_with_report

__all__ = ["FuseInputError", "fuse", "fuse_with_report"]

"""How far one set of outputs is from a reference: SQNR, cosine, max abs / relative error, top-1 agreement.

Definitions (all in float64, over every element of every sample):

* SQNR (dB) = 10 log10( sum ref^2 / sum (ref - got)^2 ); +inf when the two are identical;
* cosine = <ref, got> / (|ref| |got|) of the flattened tensors;
* max relative error = max |ref - got| / max |ref|, repconv's usual definition (``repconv.verify``):
  elementwise ratios blow up on outputs that are nearly zero and say nothing about the model;
* top-1 agreement = share of samples whose argmax over the last axis agrees, for a 2-D (N, classes)
  output with more than one class (a classifier's logits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def finite_or_none(v: float | None) -> float | None:
    """JSON has no inf / NaN: those become null."""
    return v if v is not None and math.isfinite(v) else None


@dataclass
class ErrorStats:
    """Streaming accumulator of the figures above for one tensor (fed batch by batch)."""

    ref_sq: float = 0.0
    err_sq: float = 0.0
    got_sq: float = 0.0
    dot: float = 0.0
    max_abs: float = 0.0
    ref_max: float = 0.0
    finite: bool = True
    elements: int = 0
    shape: list[int] = field(default_factory=list)

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        r = np.asarray(ref, dtype=np.float64)
        g = np.asarray(got, dtype=np.float64)
        if r.shape != g.shape:
            raise ValueError(f"shape {tuple(g.shape)} differs from the reference's {tuple(r.shape)}")
        self.shape = list(r.shape)
        if not r.size:
            return
        fin = bool(np.isfinite(r).all() and np.isfinite(g).all())
        self.finite = self.finite and fin
        if not fin:
            return
        err = r - g
        self.ref_sq += float(np.vdot(r, r))
        self.err_sq += float(np.vdot(err, err))
        self.got_sq += float(np.vdot(g, g))
        self.dot += float(np.vdot(r, g))
        self.max_abs = max(self.max_abs, float(np.abs(err).max()))
        self.ref_max = max(self.ref_max, float(np.abs(r).max()))
        self.elements += r.size

    @property
    def sqnr_db(self) -> float:
        if not self.finite:
            return -math.inf
        if self.err_sq == 0.0:
            return math.inf
        if self.ref_sq == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.ref_sq / self.err_sq)

    @property
    def cosine(self) -> float:
        if not self.finite:
            return math.nan
        denom = math.sqrt(self.ref_sq * self.got_sq)
        return self.dot / denom if denom > 0 else (1.0 if self.ref_sq == self.got_sq else 0.0)

    @property
    def max_rel(self) -> float:
        if not self.finite:
            return math.inf
        return self.max_abs / self.ref_max if self.ref_max > 0 else self.max_abs

    def exceeds(self, rtol: float, atol: float, min_sqnr: float | None = None) -> bool:
        """Beyond the tolerance: max|err| > atol + rtol * max|ref| (or SQNR below ``min_sqnr`` when given)."""
        if not self.finite:
            return True
        if min_sqnr is not None:
            return self.sqnr_db < min_sqnr
        return self.max_abs > atol + rtol * self.ref_max


@dataclass
class Drift:
    """Figures of a candidate's outputs against the reference's over held-out samples."""

    sqnr_db: float
    cosine: float
    max_abs: float
    max_rel: float
    top1_agreement: float | None
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return {"sqnr_db": finite_or_none(self.sqnr_db), "cosine": finite_or_none(self.cosine),
                "max_abs": finite_or_none(self.max_abs), "max_rel": finite_or_none(self.max_rel),
                "top1_agreement": self.top1_agreement, "samples": self.samples}


def drift(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]]) -> Drift:
    """``reference[i]`` / ``candidate[i]``: the output tensors of batch ``i``. Figures over all outputs;
    top-1 agreement from the first output when it is (N, classes)."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError("drift needs the same, non-zero number of batches on both sides")
    stats = ErrorStats()
    agree = total = 0
    classifier = True
    samples = 0
    for ref_outs, got_outs in zip(reference, candidate, strict=True):
        if len(ref_outs) != len(got_outs):
            raise ValueError(f"{len(got_outs)} outputs vs {len(ref_outs)} in the reference")
        for r, g in zip(ref_outs, got_outs, strict=True):
            stats.add(r, g)
        first_r, first_g = np.asarray(ref_outs[0]), np.asarray(got_outs[0])
        samples += int(first_r.shape[0]) if first_r.ndim else 1
        classifier = classifier and first_r.ndim == 2 and first_r.shape[1] > 1
        if classifier:
            agree += int((first_r.argmax(1) == first_g.argmax(1)).sum())
            total += first_r.shape[0]
    top1 = agree / total if classifier and total else None
    return Drift(stats.sqnr_db, stats.cosine, stats.max_abs, stats.max_rel, top1, samples)

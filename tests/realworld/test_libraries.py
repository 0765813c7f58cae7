"""repconv on the real libraries' models, judged against each library's own converter.

Per model (``tests/realworld/cases.py``: timm's re-parameterizable families, ultralytics YOLO and
RT-DETR from their yaml, torchvision classifiers; TorchScript files: ``test_capture_real.py``),
prepared as ``harness.prepare`` describes (random BN statistics measured on random images, tiny
constants randomized):

* the user's path - ``repconv.fuse_with_report`` in fp32 with its own verification - succeeds
  (RT-DETR is judged in float64 - its top-k query selection reorders near-ties under any fp32
  rounding - and its fp32 fusion must still pass repconv's verification);
* repconv leaves no more BatchNorm modules, Conv + Linear modules, and aten conv / matmul /
  batch-norm ops in one forward than the library's converter (timm.utils.reparameterize_model,
  ultralytics BaseModel.fuse, torch.fx.experimental.optimization.fuse); where that converter
  crashes, is wrong or drops outputs, no BatchNorm may be left;
* exactness: the same fusion of a float64 copy matches the float64 original to 1e-9 relative on the
  example and a fresh input. (In fp32 the fold's rounding is amplified by these models' near-constant
  channels to up to 5e-4 for every converter, repconv's and the libraries' alike; in float64 a
  correct fold is exact to ~1e-13 and any mistake - a missed term, a bad padding - is >= 1e-3.)
"""

from __future__ import annotations

import copy

import pytest
import torch

from repconv import fuse_with_report
from tests.realworld import cases as C
from tests.realworld import harness as H

pytestmark = pytest.mark.thirdparty

EXACT_RTOL = 1e-9


@pytest.mark.parametrize("case", C.library_cases(), ids=lambda c: c.id)
def test_reaches_the_library_converter(case: C.Case) -> None:
    out = H.evaluate(case, self_error=False)
    j = out.judgement
    assert out.report.verification is not None and out.report.verification.ok
    where = f"{case.anchor_name}: {j.anchor}" if j.anchor else j.anchor_note
    assert j.reached, f"repconv left {j.ours}; {where}; report left: {[(x.where, x.reason) for x in out.report.left]}"
    if j.anchor is None:  # no bound from the library: then at least nothing the library would fold is left
        assert j.anchor_note
    exact = j.ours_error if case.dtype == torch.float64 else H.exactness(case, out.model, out.inputs)
    assert exact <= EXACT_RTOL
    if case.dtype == torch.float64:  # judged in float64 (top-k heads); the user's fp32 path must still verify
        model32 = copy.deepcopy(out.model).float()
        _, report = fuse_with_report(H.source_for(case, model32, out.inputs), tuple(t.float() for t in out.inputs))
        assert report.verification is not None and report.verification.ok

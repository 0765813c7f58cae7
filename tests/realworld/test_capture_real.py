"""Capture on the real libraries' own code paths: an ultralytics model keeps routing through its
fused layers (``f`` / ``i`` / ``type`` / ``np`` attributes, ``is_fused()``, save and load), and
``repconv fuse`` on ``torch.jit.trace`` / ``torch.jit.script`` files (TorchScript in, TorchScript out).
Reference: the unfused model; structure counted in aten ops (a TorchScript file has no modules to count)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from repconv import fuse_with_report
from repconv.cli.main import main
from tests.realworld import cases as C
from tests.realworld import harness as H

pytestmark = pytest.mark.thirdparty


def test_ultralytics_model_keeps_routing_through_fused_layers() -> None:
    case = next(c for c in C.ultralytics_cases() if c.name == "yolov8n")
    model, x = H.build(case)
    fused, report = fuse_with_report(model, x)
    assert report.untraced[0].startswith("DetectionModel")  # fx cannot trace it: capture did the work
    traced = [b for b in fused.model if isinstance(b, torch.fx.GraphModule)]
    assert len(traced) >= 5  # Conv / SPPF layers traced whole with their routed inputs (C2f only in parts)
    for a, b in zip(model.model, fused.model, strict=True):
        assert (b.f, b.i, b.type, b.np) == (a.f, a.i, a.type, a.np)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in b.modules())
    assert fused.is_fused() and not model.is_fused()  # the library's own check; the user's model untouched
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert [m.f for m in loaded.model] == [m.f for m in model.model]
    with torch.no_grad():
        assert H.max_rel_error(model(*x), loaded(*x)) <= 1e-4  # fp32 rounding of this model: ~2e-5


@pytest.mark.parametrize("how", ["trace", "script"])
def test_fuse_cli_on_torchscript_file(how: str, tmp_path: Path) -> None:
    case = next(c for c in C.torchvision_cases() if c.name == "resnet18")
    model, x = H.build(case)
    path = tmp_path / f"resnet18-{how}.pt"
    torch.jit.save(C.to_torchscript(model, how, x[0]), str(path))
    res = CliRunner().invoke(main, ["fuse", str(path), "--input-shape", "1,3,64,64"])
    assert res.exit_code == 0, res.output
    fused = torch.jit.load(str(tmp_path / f"resnet18-{how}.fused.pt"))
    before, after = H.structure(model, x), H.structure(fused, x)
    assert (before.aten_bn, after.aten_bn) == (20, 0)
    assert after.aten_conv == before.aten_conv == 20 and after.aten_matmul == 1
    with torch.no_grad():
        assert H.max_rel_error(model(*x), fused(*x)) <= 1e-5

"""`repconv.quant.compare_models`: per-layer comparison finds a deliberately corrupted layer.

Corruption: one output channel of one fused conv's weight scaled by 1.05 inside the ONNX file
(or in a PyTorch copy). Layers before it are exact up to float32 summation order (max rel < 1e-5,
well under the 1e-4 default tolerance); that layer's error is ~1e-2 relative (far above it).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from repconv.blocks import Involution
from repconv.quant.calib import batches, random_samples
from repconv.quant.compare import compare_models
from repconv.quant.ort_quant import export_fp32, quantize_onnx
from tests.cli_models import Branchy


def four_blocks() -> nn.Module:
    """Four RepVGG-style blocks in plain PyTorch (no repconv classes), non-trivial BN statistics."""
    torch.manual_seed(1)
    model = nn.Sequential(Branchy(3, 8, 2), Branchy(8, 8), Branchy(8, 8), Branchy(8, 8))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


class InvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.inv = Involution(16, 3, group_channels=8)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.inv(self.stem(x))))


def corrupt(model: onnx.ModelProto, weight: str) -> onnx.ModelProto:
    bad = copy.deepcopy(model)
    for t in bad.graph.initializer:
        if t.name == weight:
            a = numpy_helper.to_array(t).copy()
            a[3] *= 1.05
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            return bad
    raise AssertionError(f"no initializer {weight}")


@pytest.fixture(scope="module")
def exported() -> tuple[nn.Module, onnx.ModelProto, list[np.ndarray]]:
    model = four_blocks()
    data = batches(random_samples(3, (1, 3, 16, 16)), 1)
    fp32, _ = export_fp32(model, torch.from_numpy(data[0]))
    return model, fp32, data


def test_onnx_vs_onnx_names_the_corrupted_layer(exported: tuple) -> None:
    _, fp32, data = exported
    report = compare_models(fp32, corrupt(fp32, "2.reparam.weight"), data)
    assert report.matching == "ONNX tensor names"
    assert report.first_divergence.startswith("2.reparam (")
    labels = [d.label for d in report.layers]
    first = labels.index(report.first_divergence)
    assert all(not d.diverged and d.stats.max_rel == 0.0 for d in report.layers[:first])
    bad = report.layers[first]
    assert 1e-3 < bad.stats.max_rel < 0.1 and bad.stats.sqnr_db < 60
    assert not report.ok and report.output_diverged


def test_pytorch_vs_onnx_names_the_corrupted_layer(exported: tuple) -> None:
    model, fp32, data = exported
    clean = compare_models(model, fp32, data)
    assert clean.ok and clean.first_divergence is None
    assert [d.key for d in clean.layers] == ["0.reparam", "1.reparam", "2.reparam", "3.reparam"]
    assert all(d.stats.max_rel < 1e-5 for d in clean.layers)
    assert any("repconv-fused form" in n for n in clean.notes)  # the names the export carries are the fused ones
    report = compare_models(model, corrupt(fp32, "1.reparam.weight"), data)
    assert report.first_divergence.startswith("1.reparam (")
    assert [d.diverged for d in report.layers] == [False, True, True, True]


def test_pytorch_vs_pytorch_by_module_name() -> None:
    model = four_blocks()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[2].k1[0].weight[3] *= 1.05
    data = batches(random_samples(2, (1, 3, 16, 16)), 1)
    report = compare_models(model, other, data)
    assert report.matching == "module names"
    assert report.first_divergence == "2.k1.0 (Conv2d)"
    assert all(not d.diverged for d in report.layers if d.key.startswith(("0.", "1.")))


def test_int8_per_layer_includes_the_custom_op() -> None:
    torch.manual_seed(0)
    model = InvNet().eval()
    data = batches(random_samples(4, (1, 3, 12, 12)), 1)
    fp32, _ = export_fp32(model, torch.from_numpy(data[0]))
    int8 = quantize_onnx(fp32, data)
    report = compare_models(fp32, int8, data, min_sqnr=10.0)
    ops = [d.op for d in report.layers]
    assert "ai.repconv::Involution" in ops
    inv = report.layers[ops.index("ai.repconv::Involution")]
    assert 10 < inv.stats.sqnr_db < 80  # computed on quantized inputs: close, not exact
    assert report.ok
    # PyTorch vs ONNX: the k-th involution call is matched with the k-th Involution node
    vs_torch = compare_models(model, fp32, data)
    assert "Involution#0" in [d.key for d in vs_torch.layers]
    assert vs_torch.ok and all(d.stats.max_rel < 1e-4 for d in vs_torch.layers)

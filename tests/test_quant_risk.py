"""`repconv.quant.analyze_risk`: outlier channels traced to the branch that planted them, and the risk
ranking checked against ONNX Runtime's own single-layer quantization.

References are independent of the fusion pass: each branch folded by hand with repconv's block
helpers (`fold_conv_bn`, `bn_identity_kernel`), and the original model's branch outputs read with
forward hooks. Tolerances: branch terms are float64 (1e-9 relative to the hand fold); the fused
weights are float32 (1e-6 relative); activations go through float32 convs of O(10) fan-in (1e-5
relative to the outlier value).
"""

from __future__ import annotations

import torch
from torch import nn

import repconv
from repconv.blocks import RepVGGBlock, randomize_bn_
from repconv.blocks.common import bn_identity_kernel, fold_conv_bn
from repconv.quant.calib import batches, random_samples
from repconv.quant.ort_quant import export_fp32
from repconv.quant.risk import analyze_risk, fake_quant_activation, fake_quant_weight
from repconv.quant.sensitivity import sensitivity
from tests.cli_models import small_repvgg


def _branch_outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, o.detach()))
             for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_identity_bn_outlier_attributed_to_identity_branch() -> None:
    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(RepVGGBlock(4, 8, stride=2), RepVGGBlock(8, 8), RepVGGBlock(8, 8))).eval()
    with torch.no_grad():  # a near-dead channel at the block input: its identity-BN gain gamma/sigma is ~100
        model[1].bn_identity.running_var[5] = 1e-4
    x = torch.randn(8, 4, 16, 16)
    fused, report = repconv.fuse_with_report(model, x[:1])
    risk = analyze_risk(fused, report, [x[:4], x[4:]], reduce_range=False)

    layer = next(lr for lr in risk.layers if lr.name == "1.reparam")
    assert layer.branches == ["1.conv_kxk", "1.conv_1x1", "1.bn_identity"]
    assert [o.channel for o in layer.weight_outliers] == [5]
    w_out = layer.weight_outliers[0]
    assert w_out.index == [5, 1, 1] and w_out.top.label == "1.bn_identity" and w_out.top.ops == ["BatchNorm2d"]
    by_label = {c.label: c.value for c in w_out.branches}
    hand = {"1.conv_kxk": fold_conv_bn(model[1].conv_kxk.conv, model[1].conv_kxk.bn).weight[5, 5, 1, 1],
            "1.conv_1x1": fold_conv_bn(model[1].conv_1x1.conv, model[1].conv_1x1.bn).weight[5, 5, 0, 0],
            "1.bn_identity": bn_identity_kernel(model[1].bn_identity, 1).weight[5, 5, 0, 0]}
    for label, value in hand.items():
        assert abs(by_label[label] - float(value)) <= 1e-9 * abs(float(value)) + 1e-12
    assert abs(sum(by_label.values()) - w_out.value) <= 1e-6 * abs(w_out.value)
    assert w_out.top.share > 0.95

    # the activation outlier of channel 5, split by branch at the very place it occurred
    a_out = next(o for o in layer.act_outliers if o.channel == 5)
    assert a_out.top.label == "1.bn_identity" and a_out.top.share > 0.9
    sample, yy, xx = a_out.index
    outs = _branch_outputs(model, ["1.conv_kxk", "1.conv_1x1", "1.bn_identity"], x)
    for c in a_out.branches:
        assert abs(c.value - float(outs[c.label][sample, 5, yy, xx])) <= 1e-5 * abs(a_out.value)
    assert abs(sum(c.value for c in a_out.branches) - a_out.value) <= 1e-5 * abs(a_out.value)
    assert not any(o.channel == 5 for lr in risk.layers if lr.name != "1.reparam" for o in lr.weight_outliers)


def test_planted_outlier_in_plain_pytorch_code() -> None:
    """The same on a model written without repconv's classes (nn.Sequential conv-BN branches)."""
    model = small_repvgg()
    with torch.no_grad():  # the 1x1 branch's BN of block 1 gets a gain of ~100 on channel 2
        model[1].k1[1].running_var[2] = 1e-4
    x = torch.randn(6, 3, 16, 16)
    fused, report = repconv.fuse_with_report(model, x[:1])
    risk = analyze_risk(fused, report, [x], reduce_range=False)
    assert risk.layers[0].name == "1.reparam"  # ranked riskiest
    out = next(o for o in risk.layers[0].weight_outliers if o.channel == 2)
    assert out.top.label == "1.k1" and out.top.ops == ["Conv2d", "BatchNorm2d"]
    c_in = out.index[0]
    hand = fold_conv_bn(model[1].k1[0], model[1].k1[1]).weight[2, c_in, 0, 0]
    assert abs(out.top.value - float(hand)) <= 1e-9 * abs(float(hand))
    act = next(o for o in risk.layers[0].act_outliers if o.channel == 2)
    assert act.top.label == "1.k1"


def test_risk_ranking_matches_onnx_runtime_single_layer_quantization() -> None:
    """The PyTorch-side rounding of one layer reproduces ORT's own (nodes_to_quantize) within 0.5 dB: the
    grids are the same, what differs is ORT's int32 bias and its integer accumulation (observed 0.01 dB)."""
    model = small_repvgg()
    with torch.no_grad():
        model[1].ident.running_var[3] = 1e-3
    samples = random_samples(16, (1, 3, 16, 16))
    fused, report = repconv.fuse_with_report(model, torch.from_numpy(samples[:1]))
    risk = analyze_risk(fused, report, [torch.from_numpy(b) for b in batches(samples, 8)], reduce_range=True)
    fp32, _ = export_fp32(model, torch.from_numpy(samples[:1]))
    data = batches(samples, 1)
    measured = {s.module: s.drift.sqnr_db for s in sensitivity(fp32, data, data, reduce_range=True).layers}
    assert set(measured) == {lr.name for lr in risk.layers} == {"0.reparam", "1.reparam"}
    for lr in risk.layers:
        assert abs(lr.risk_sqnr_db - measured[lr.name]) < 0.5, (lr.name, lr.risk_sqnr_db, measured[lr.name])
    assert min(measured, key=measured.get) == risk.layers[0].name


def test_fake_quant_grids() -> None:
    w = torch.tensor([[1.0, -0.5, 0.26], [-2.0, 0.01, 1.0]])
    q = fake_quant_weight(w, 64)
    assert torch.equal(q[:, 0], torch.tensor([1.0, -2.0]))  # the abs-max of each channel is on the grid
    assert torch.allclose(q[0, 2], torch.tensor(17 / 64.0)) and q[1, 1] == 0.0
    x = torch.tensor([-1.0, 0.0, 0.3, 3.0])
    fq = fake_quant_activation(x, 0.0, 2.0)  # a post-ReLU range: negatives clamp to 0, zero stays exact
    assert fq[0] == 0.0 and fq[1] == 0.0 and abs(fq[3] - 2.0) < 1e-6
    assert abs(fq[2] - 0.3) <= 2.0 / 255 / 2 + 1e-7

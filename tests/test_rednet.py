"""Involution / I-D-DW modules and the RedNet / ResNet builders."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from repconv.blocks.involution import InhomogeneousDynamicDWConv, Involution
from repconv.blocks.rednet import LAYERS, Bottleneck, RedNet, rednet26, rednet38, rednet50, resnet26
from repconv.ops.involution import involution_reference


def _count_involution_nodes(gm: torch.fx.GraphModule) -> int:
    return sum(
        1 for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.repconv.involution
    )


def test_involution_module_matches_paper_formulation():
    torch.manual_seed(0)
    m = Involution(32, kernel_size=7, stride=1, reduction=4, group_channels=16).eval()
    x = torch.randn(2, 32, 12, 13)
    kernel = m.span(F.relu(m.bn(m.reduce(x))))
    torch.testing.assert_close(m(x), involution_reference(x, kernel, 7, 1, 1, 2), rtol=1e-5, atol=1e-5)
    assert m.groups == 2 and kernel.shape == (2, 2 * 49, 12, 13)


@pytest.mark.parametrize("size", [57, 56, 7, 1])
def test_involution_stride2_odd_sizes(size):
    m = Involution(32, kernel_size=7, stride=2).eval()
    x = torch.randn(1, 32, size, size + 2)
    y = m(x)
    assert y.shape == (1, 32, (size + 1) // 2, (size + 3) // 2)
    assert m.kernel(x).shape[-2:] == y.shape[-2:]


def test_involution_stride2_matches_reference():
    m = Involution(16, kernel_size=3, stride=2, group_channels=8).eval()
    x = torch.randn(2, 16, 57, 57)
    ref = involution_reference(x, m.kernel(x), 3, 2, 1, 2)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_involution_bad_config():
    with pytest.raises(ValueError, match="multiple of group_channels"):
        Involution(24, group_channels=16)
    with pytest.raises(ValueError, match="odd"):
        Involution(32, kernel_size=4)


def test_idd_dw_conv():
    m = InhomogeneousDynamicDWConv(64, kernel_size=7, heads=4).eval()
    with torch.no_grad():
        m.bias.normal_()
    x = torch.randn(2, 64, 9, 10)
    w = m.weight_proj(F.relu(m.bn(m.proj(x))))
    ref = involution_reference(x, w, 7, 1, 1, 4) + m.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    assert InhomogeneousDynamicDWConv(64).heads == 2
    with pytest.raises(ValueError, match="divisible by heads"):
        InhomogeneousDynamicDWConv(64, heads=5)


def test_rednet26_forward_and_fx():
    torch.manual_seed(0)
    m = rednet26(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    gm = torch.fx.symbolic_trace(m)
    # one involution per bottleneck (1+2+4+1) plus the stem's
    assert _count_involution_nodes(gm) == sum(LAYERS[26]) + 1
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y)


def test_rednet_odd_input_and_export():
    # a narrow RedNet (same code paths, every stage has a strided involution) keeps export quick
    m = RedNet((1, 1, 1, 1), num_classes=5, widths=(16, 32, 32, 64), stem_channels=32).eval()
    x = torch.randn(1, 3, 57, 57)
    ep = torch.export.export(m, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), m(x))


@pytest.mark.parametrize(
    ("builder", "layers", "params_m"),
    [(rednet26, LAYERS[26], 9.2), (rednet38, LAYERS[38], 12.4), (rednet50, LAYERS[50], 15.5)],
)
def test_rednet_depths_and_sizes(builder, layers, params_m):
    m = builder()
    stages = [m.layer1, m.layer2, m.layer3, m.layer4]
    assert [len(s) for s in stages] == list(layers)
    assert all(isinstance(b, Bottleneck) and isinstance(b.conv2, Involution) for s in stages for b in s)
    n_params = sum(p.numel() for p in m.parameters()) / 1e6
    assert abs(n_params - params_m) < 0.1, n_params  # the paper's parameter counts


def test_resnet26_same_shape_as_rednet26():
    red, res = rednet26(num_classes=7), resnet26(num_classes=7)
    for a, b in zip([red.layer1, red.layer2, red.layer3, red.layer4],
                    [res.layer1, res.layer2, res.layer3, res.layer4], strict=True):
        assert len(a) == len(b)
        assert [blk.conv3.out_channels for blk in a] == [blk.conv3.out_channels for blk in b]
        assert all(isinstance(blk.conv2, torch.nn.Conv2d) for blk in b)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert res.eval()(x).shape == red.eval()(x).shape == (1, 7)

"""QARepVGGBlock: the paper's structure (arXiv 2212.01593), exact deploy form, fused like any block.

Tolerance as in tests/test_blocks.py: the folding runs in float64, so deploy vs training-time eval
outputs differ by float32 summation order only (max|err| / max|ref| <= 1e-5).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import repconv
from repconv.blocks import QARepVGGBlock, randomize_bn_

TOL = 1e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("args,shape", [
    ((8, 8), (2, 8, 10, 12)),  # identity branch
    ((8, 16, 3, 2), (2, 8, 11, 12)),  # stride 2: no identity
    ((8, 8, 3, 1, None, 1, 4), (2, 8, 9, 9)),  # groups 4 with identity
    ((8, 8, 3, 1, 2), (2, 8, 9, 9)),  # larger padding: 1x1 padded to stay centred, no identity
])
def test_deploy_and_fuse_are_exact(args: tuple, shape: tuple) -> None:
    torch.manual_seed(0)
    block = QARepVGGBlock(*args)
    with torch.no_grad():
        block.conv_1x1.weight.normal_(0.0, 0.3)
    randomize_bn_(block).eval()
    x = torch.randn(shape)
    ref = block(x)
    deployed = copy.deepcopy(block)
    deployed.reparameterize()
    assert rel_err(deployed(x), ref) < TOL
    assert [type(m) for m in deployed.modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)] == [nn.Conv2d]
    fused, report = repconv.fuse_with_report(block, x)
    assert rel_err(fused(x), ref) < TOL and len(report.regions) == 1
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == 0


def test_structure_is_the_papers() -> None:
    block = QARepVGGBlock(8, 8)
    bns = [n for n, m in block.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns == ["conv_kxk.bn", "bn"]  # BN on the 3x3 branch and one after the sum, none elsewhere
    assert block.conv_1x1.bias is None and block.use_identity
    assert not QARepVGGBlock(8, 16).use_identity and not QARepVGGBlock(8, 8, stride=2).use_identity
    # training mode: the post-sum BN normalises the sum with batch statistics
    block.train()
    x = torch.randn(16, 8, 6, 6) * 3 + 1
    pre = block.conv_kxk(x) + block.conv_1x1(x) + x
    out = block(x)
    expected = torch.relu((pre - pre.mean((0, 2, 3), keepdim=True)) / (pre.var((0, 2, 3), unbiased=False,
                                                                              keepdim=True) + 1e-5).sqrt())
    assert torch.allclose(out, expected, atol=1e-4)
    out.sum().backward()
    assert block.conv_1x1.weight.grad is not None and block.conv_kxk.conv.weight.grad is not None


def test_bad_padding_is_refused() -> None:
    with pytest.raises(ValueError, match="smaller than the centred padding"):
        QARepVGGBlock(8, 8, 3, padding=0)
    with pytest.raises(ValueError, match="must be odd"):
        QARepVGGBlock(8, 8, 2)

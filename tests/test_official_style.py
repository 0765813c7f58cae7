"""Patterns found by running the fx pass on the papers' official implementations (RepVGG with SE,
DBB's convnet_utils, ACNet's crop layer, timm's CondConv, RepMLPNet's ModuleList stages).

Every block here is written independently for the test; only the *pattern* matches the official
code. Reference = the unfused model in eval mode; fp32 tolerance max|err| <= 1e-5 * max|ref|.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repconv import algebra as A
from repconv import fuse_with_report
from repconv.blocks.common import randomize_bn_


def _ready(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_bn_(model, seed).eval()


def _convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _branch(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


# ------------------------------------------------------------------ SE gate with a shape-derived pool

class ShapePoolGate(nn.Module):
    """Squeeze-excite whose pool window is read from the input at run time."""

    def __init__(self, c: int, list_window: bool):
        super().__init__()
        self.list_window = list_window
        self.squeeze = nn.Conv2d(c, c // 4, 1)
        self.excite = nn.Conv2d(c // 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.size()
        g = F.avg_pool2d(x, kernel_size=[h, w]) if self.list_window else F.avg_pool2d(x, x.size(3))
        return x * torch.sigmoid(self.excite(F.relu(self.squeeze(g))))


class ThreeBranchGated(nn.Module):
    def __init__(self, c: int, list_window: bool):
        super().__init__()
        self.big, self.small, self.skip = _branch(c, c, 3), _branch(c, c, 1), nn.BatchNorm2d(c)
        self.gate = ShapePoolGate(c, list_window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.gate(self.big(x) + self.small(x) + self.skip(x)))


@pytest.mark.parametrize("list_window,hw", [(False, (10, 10)), (True, (10, 8))])
def test_pool_window_from_input_shape_is_opaque_not_a_crash(list_window: bool, hw: tuple[int, int]) -> None:
    model = _ready(nn.Sequential(ThreeBranchGated(16, list_window), ThreeBranchGated(16, list_window)))
    x = torch.randn(2, 16, *hw)
    fused, report = fuse_with_report(model, x)
    assert _convs(fused) == 2 + 2 * 2  # one conv per three-branch block, the gates' convs stay
    assert report.verification.ok and not report.untraced


# ------------------------------------------------------------------ fused value feeding several branches

class PadWithShift(nn.Module):
    """BN, then zero padding overwritten with the BN shift (border = BN of a zero input)."""

    def __init__(self, c: int, pad: int):
        super().__init__()
        self.norm, self.pad = nn.BatchNorm2d(c), pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pad(self.norm(x), [self.pad] * 4)
        n = self.norm
        fill = (n.bias - n.running_mean * n.weight / torch.sqrt(n.running_var + n.eps)).view(1, -1, 1, 1)
        p = self.pad
        y[:, :, :p, :] = fill
        y[:, :, -p:, :] = fill
        y[:, :, :, :p] = fill
        y[:, :, :, -p:] = fill
        return y


class FourWay(nn.Module):
    """KxK, 1x1, 1x1 -> BN-and-pad -> avg pool, 1x1 -> BN-and-pad -> KxK; summed in place."""

    def __init__(self, c: int, k: int = 3):
        super().__init__()
        self.kxk = _branch(c, c, k)
        self.one = _branch(c, c, 1)
        self.pool = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), PadWithShift(c, k // 2), nn.AvgPool2d(k, 1),
                                  nn.BatchNorm2d(c))
        self.seq = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), PadWithShift(c, k // 2),
                                 nn.Conv2d(c, c, k, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.kxk(x)
        out += self.one(x)
        out += self.pool(x)
        out += self.seq(x)
        return out


def test_region_output_feeding_bn_and_pad_branches() -> None:
    """A conv+BN without activation feeds a four-branch block: the branches must read the fused
    conv (not the stale original whose border fills were removed), and the BN-and-pad fills,
    refused while the conv+BN was still composed into them, must fold once it is a root."""
    model = _ready(nn.Sequential(_branch(8, 8, 1), FourWay(8), _branch(8, 8, 1), FourWay(8)))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.3)
    x = torch.randn(2, 8, 9, 9)
    fused, report = fuse_with_report(model, x)
    assert report.verification.ok
    assert _rel(fused(x), model(x)) <= 1e-5
    assert _convs(fused) == 3  # the shared 1x1; each four-way block (the second with the 1x1 after it)
    assert not report.left


# ------------------------------------------------------------------ per-sample (routed) conv weights

class RoutedConv(nn.Module):
    """Experts mixed per sample, applied as one grouped conv over the batch (CondConv style)."""

    def __init__(self, cin: int, cout: int, k: int = 3, experts: int = 3):
        super().__init__()
        self.cout, self.k = cout, k
        self.route = nn.Linear(cin, experts)
        self.experts = nn.Parameter(torch.randn(experts, cout * cin * k * k) * 0.2)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        r = torch.sigmoid(self.route(x.mean((2, 3))))
        weight = torch.matmul(r, self.experts).view(b * self.cout, c, self.k, self.k)
        y = F.conv2d(x.reshape(1, b * c, h, w), weight, None, padding=self.k // 2, groups=b)
        return self.norm(y.view(b, self.cout, y.shape[-2], y.shape[-1]))


def test_conv_with_input_dependent_weight_is_left_alone() -> None:
    model = _ready(nn.Sequential(_branch(4, 8, 3), nn.ReLU(), RoutedConv(8, 8)))
    x = torch.randn(3, 4, 8, 8)
    fused, report = fuse_with_report(model, x)
    assert report.verification.ok and not report.untraced
    assert len(report.regions) == 1  # the static conv+BN only


# ------------------------------------------------------------------ crops (ACNet with padding < K // 2)

class CroppedCross(nn.Module):
    """KxK with padding p < K//2 plus Kx1 / 1xK branches on inputs cropped to align the windows."""

    def __init__(self, c: int, k: int, p: int, stride: int = 1):
        super().__init__()
        self.c = k // 2 - p
        self.square = nn.Sequential(nn.Conv2d(c, c, k, stride, p, bias=False), nn.BatchNorm2d(c))
        self.tall = nn.Sequential(nn.Conv2d(c, c, (k, 1), stride, (p, 0), bias=False), nn.BatchNorm2d(c))
        self.wide = nn.Sequential(nn.Conv2d(c, c, (1, k), stride, (0, p), bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.c
        return self.square(x) + self.tall(x[:, :, :, n:-n]) + self.wide(x[:, :, n:-n, :])


@pytest.mark.parametrize("k,p,stride", [(3, 0, 1), (5, 1, 1), (5, 0, 2)])
def test_cropped_branches_merge_into_one_conv(k: int, p: int, stride: int) -> None:
    model = _ready(CroppedCross(6, k, p, stride))
    x = torch.randn(2, 6, 13, 11)
    fused, report = fuse_with_report(model, x)
    assert report.verification.ok
    assert _convs(fused) == 1


class CropThenPaddedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.pre = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # crop then a zero-padded conv: not one conv; conv then a crop within its padding: one conv
        return self.conv(x[:, :, 1:-1, 1:-1]) + self.pre(x)[:, :, 1:-1, 1:-1]


def test_crop_rules_are_exact() -> None:
    model = CropThenPaddedConv().eval()
    x = torch.randn(1, 4, 9, 9)
    fused, report = fuse_with_report(model, x)
    assert report.verification.ok
    assert _convs(fused) == 2
    crop = A.crop(3, 1, 2)
    t = torch.randn(1, 3, 7, 8, dtype=torch.float64)
    assert torch.equal(crop.apply(t), t[:, :, 1:-1, 2:-2])


# ------------------------------------------------------------------ untraceable parents with ModuleList stages

class Unit(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.pre = nn.BatchNorm2d(c)
        self.body = nn.Sequential(_branch(c, c, 1), nn.ReLU(), _branch(c, c, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(self.pre(x))


class StagedNet(nn.Module):
    """Stages in ModuleLists, and a forward fx cannot trace (a reshape splatting a shape proxy)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.stages = nn.ModuleList([nn.ModuleList([Unit(8), Unit(8)]), nn.ModuleList([Unit(8)])])
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.size()
        x = self.stem(x)
        for stage in self.stages:
            for unit in stage:
                x = unit(x)
        return self.norm(x).reshape(*shape[:1], -1)


def test_module_list_stages_of_an_untraceable_model_are_fused() -> None:
    model = _ready(StagedNet())
    x = torch.randn(2, 3, 8, 8)
    fused, report = fuse_with_report(model, x)
    assert report.verification.ok
    assert len(report.untraced) == 1 and report.untraced[0].startswith("StagedNet")  # not its BN leaves
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == 1  # only the top-level norm
    assert isinstance(model.stages[0][0].pre, nn.BatchNorm2d)  # the user's model is untouched
    assert _convs(model) == 7

"""Model builders: RepVGG (arXiv 2101.03697), its plain deploy-shaped twin, and a small demo net that
mixes every block kind (used by tests, docs and the CLI's examples)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .acnet import ACBlock
from .common import randomize_bn_
from .dbb import DiverseBranchBlock
from .doconv import DOConv2d
from .mobileone import MobileOneBlock
from .replk import RepLKBlock
from .repvgg import RepVGGBlock


class RepVGG(nn.Module):
    """RepVGG: a stem block, four stages of RepVGG blocks (first block of each strides by 2),
    global average pooling and a linear classifier.

    Widths are ``min(64, 64a)`` for the stem and ``64a, 128a, 256a, 512b`` for the stages
    (``width_multiplier = (a, a, a, b)``). ``override_groups_map`` maps a global layer index
    (stem = 0) to a group count, as RepVGG-Bxg2/g4 do on their odd layers.
    """

    def __init__(self, num_blocks: Sequence[int], width_multiplier: Sequence[float], num_classes: int = 1000,
                 override_groups_map: dict[int, int] | None = None, deploy: bool = False) -> None:
        super().__init__()
        if len(num_blocks) != 4 or len(width_multiplier) != 4:
            raise ValueError("RepVGG has four stages: give four depths and four width multipliers")
        self.groups_map = dict(override_groups_map or {})
        self.deploy = deploy
        self.in_planes = min(64, int(64 * width_multiplier[0]))
        self.stage0 = RepVGGBlock(3, self.in_planes, 3, 2, 1, deploy=deploy)
        self._layer = 1
        widths = [64, 128, 256, 512]
        self.stage1 = self._make_stage(int(widths[0] * width_multiplier[0]), num_blocks[0])
        self.stage2 = self._make_stage(int(widths[1] * width_multiplier[1]), num_blocks[1])
        self.stage3 = self._make_stage(int(widths[2] * width_multiplier[2]), num_blocks[2])
        self.stage4 = self._make_stage(int(widths[3] * width_multiplier[3]), num_blocks[3])
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(int(512 * width_multiplier[3]), num_classes)

    def _make_stage(self, planes: int, num_blocks: int) -> nn.Sequential:
        blocks = []
        for i in range(num_blocks):
            groups = self.groups_map.get(self._layer, 1)
            blocks.append(RepVGGBlock(self.in_planes, planes, 3, 2 if i == 0 else 1, 1, groups=groups,
                                      deploy=self.deploy))
            self.in_planes = planes
            self._layer += 1
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage0(x)
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.linear(torch.flatten(self.gap(x), 1))


def repvgg_a0(num_classes: int = 1000, deploy: bool = False) -> RepVGG:
    """RepVGG-A0: depths (2, 4, 14, 1), a = 0.75, b = 2.5 (about 9.1M training-time parameters)."""
    return RepVGG([2, 4, 14, 1], [0.75, 0.75, 0.75, 2.5], num_classes, deploy=deploy)


def repvgg_b3(num_classes: int = 1000, deploy: bool = False) -> RepVGG:
    """RepVGG-B3: depths (4, 6, 16, 1), a = 3, b = 5 (about 123M training-time, 111M deploy parameters)."""
    return RepVGG([4, 6, 16, 1], [3, 3, 3, 5], num_classes, deploy=deploy)


class PlainVGG(nn.Module):
    """A VGG-style stack of ``conv(+bias) -> ReLU`` layers, GAP and a linear head: the shape a
    RepVGG deploys to, built by hand (no re-parameterization involved)."""

    def __init__(self, layers: Sequence[tuple[int, int, int, int, int]], num_classes: int) -> None:
        """``layers``: (in, out, kernel, stride, groups) per conv, padding kernel // 2."""
        super().__init__()
        mods: list[nn.Module] = []
        for cin, cout, k, s, g in layers:
            mods += [nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=True), nn.ReLU()]
        self.features = nn.Sequential(*mods)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(layers[-1][1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(torch.flatten(self.gap(self.features(x)), 1))


def plain_vgg_like(model: RepVGG) -> PlainVGG:
    """A :class:`PlainVGG` with exactly the deploy shape of ``model``.

    If ``model``'s blocks are already re-parameterized, their weights (and the classifier's) are
    copied, so the plain net computes the same function; otherwise it is freshly initialised.
    ``model`` may live on the meta device when only the shape is wanted.
    """
    blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
    layers = []
    for b in blocks:
        conv = b.reparam_conv if b.reparam_conv is not None else b.conv_kxk.conv
        layers.append((conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.groups))
    plain = PlainVGG(layers, model.linear.out_features)
    if all(b.reparam_conv is not None for b in blocks):
        convs = [m for m in plain.features if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            for dst, b in zip(convs, blocks, strict=True):
                dst.weight.copy_(b.reparam_conv.weight)
                dst.bias.copy_(b.reparam_conv.bias)
            plain.linear.weight.copy_(model.linear.weight)
            plain.linear.bias.copy_(model.linear.bias)
    return plain


def repvgg_a0_plain(num_classes: int = 1000) -> PlainVGG:
    """A hand-built plain VGG with RepVGG-A0's deploy shape (22 conv3x3+bias+ReLU layers)."""
    with torch.device("meta"):
        shape_only = repvgg_a0(num_classes)
    return plain_vgg_like(shape_only)


class DemoNet(nn.Module):
    """A small training-time net with one block of every conv kind and a Linear+BN1d head.

    Input 1x3x64x64 -> 10 logits. Branch structure exercises everything the graph pass must fuse:
    identity-BN, 1x1/1xK/Kx1 branches, BN-and-pad + avg-pool sequences, a computed (DO-Conv)
    weight followed by BN, over-parameterized depthwise branches, dilated large-kernel branches,
    and a Linear -> BatchNorm1d fold.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = RepVGGBlock(3, 16, 3, stride=2)                               # 32x32
        self.acb = ACBlock(16, 16, 3)
        self.acb_act = nn.ReLU()
        self.dbb = DiverseBranchBlock(16, 24, 3, stride=2, act=True)               # 16x16
        self.doconv = DOConv2d(24, 24, 3, padding=1, D_mul=12)
        self.doconv_bn = nn.BatchNorm2d(24)
        self.doconv_act = nn.ReLU()
        self.mobileone_dw = MobileOneBlock(24, 24, 3, groups=24, num_conv_branches=3)
        self.mobileone_pw = MobileOneBlock(24, 32, 1, num_conv_branches=2)
        self.replk = RepLKBlock(32, 32, kernel_size=7, small_kernel=3, dilated_branches=[(3, 2), (3, 3)], act=True)
        self.dbb_dw = DiverseBranchBlock(32, 32, 3, groups=32, act=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(32, 64)
        self.fc1_bn = nn.BatchNorm1d(64)
        self.fc1_act = nn.ReLU()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.acb_act(self.acb(x))
        x = self.dbb(x)
        x = self.doconv_act(self.doconv_bn(self.doconv(x)))
        x = self.mobileone_pw(self.mobileone_dw(x))
        x = self.dbb_dw(self.replk(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(self.fc1_act(self.fc1_bn(self.fc1(x))))


def demo_model(seed: int = 0) -> DemoNet:
    """:class:`DemoNet` with seeded random weights, random BN statistics (:func:`randomize_bn_`) and a
    perturbed DO-Conv D and DBB identity 1x1, returned in eval mode (the reference a fused model is
    compared with)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DemoNet()
        with torch.no_grad():
            model.doconv.D.normal_(0.0, 0.1)
            for m in model.modules():
                if isinstance(m, DiverseBranchBlock) and m.branch_1x1_kxk is not None:
                    w = m.branch_1x1_kxk.conv1.weight
                    w.add_(torch.randn_like(w) * 0.1)
    randomize_bn_(model, seed)
    return model.eval()

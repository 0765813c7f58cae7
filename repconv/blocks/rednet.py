"""RedNet (arXiv 2103.06255) and same-shaped ResNets for comparison.

RedNet is a ResNet of bottleneck blocks whose 3x3 conv is a 7x7 :class:`Involution` (reduction 4,
16 channels per group; the stride sits in the involution, ResNet-v1.5 style). Layer counts:
RedNet-26 [1, 2, 4, 1], -38 [2, 3, 5, 2], -50 [3, 4, 6, 3]; widths 64/128/256/512 (x4 out).

Stem (simplified from the paper's): conv3x3(3->32, s2)-BN-ReLU, Involution(32, K=3)-BN-ReLU,
conv3x3(32->64)-BN-ReLU, maxpool 3x3 s2. The ResNet counterparts (:func:`resnet26` ...) use the
same stem and blocks with a 3x3 conv in place of every involution, so a RedNet vs ResNet latency
comparison isolates the operator. Every forward is torch.fx-traceable and torch.export-able.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from repconv.blocks.involution import Involution

__all__ = [
    "Bottleneck",
    "RedNet",
    "rednet26",
    "rednet38",
    "rednet50",
    "resnet26",
    "resnet38",
    "resnet50",
    "LAYERS",
]

LAYERS: dict[int, tuple[int, int, int, int]] = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3)}

SpatialFactory = Callable[[int, int], nn.Module]  # (channels, stride) -> the block's spatial layer


def involution7x7(channels: int, stride: int) -> nn.Module:
    return Involution(channels, kernel_size=7, stride=stride, reduction=4, group_channels=16)


def conv3x3(channels: int, stride: int) -> nn.Module:
    return nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)


class Bottleneck(nn.Module):
    """1x1 reduce - spatial (involution or 3x3 conv, carries the stride) - 1x1 expand, + shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, spatial: SpatialFactory) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = spatial(planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out:
            # strided 1x1 conv: floor((H-1)/s)+1 = ceil(H/s), the main path's size for odd H too
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.downsample(x))


class RedNet(nn.Module):
    """ResNet-style classifier with a configurable spatial layer (involution for RedNet)."""

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = 1000,
        spatial: SpatialFactory = involution7x7,
        stem_spatial: SpatialFactory | None = None,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_channels: int = 64,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError("layers and widths must have the same length")
        half = stem_channels // 2
        if stem_spatial is None:
            stem_spatial = (lambda c, s: Involution(c, 3, s, 4, 16)) if spatial is involution7x7 else conv3x3
        self.stem = nn.Sequential(
            nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            stem_spatial(half, 1),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, stem_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_channels),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, padding=1),
        )
        stages = []
        in_ch = stem_channels
        for i, (n, planes) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(Bottleneck(in_ch, planes, stride, spatial))
                in_ch = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        # Kaiming for the convs, except involution's kernel-generating conv (see Involution's init).
        keep = {id(m.span) for m in self.modules() if isinstance(m, Involution)}
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and id(m) not in keep:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _rednet(depth: int, num_classes: int) -> RedNet:
    return RedNet(LAYERS[depth], num_classes, spatial=involution7x7)


def _resnet(depth: int, num_classes: int) -> RedNet:
    return RedNet(LAYERS[depth], num_classes, spatial=conv3x3)


def rednet26(num_classes: int = 1000) -> RedNet:
    """RedNet-26: bottleneck layers [1, 2, 4, 1]."""
    return _rednet(26, num_classes)


def rednet38(num_classes: int = 1000) -> RedNet:
    """RedNet-38: bottleneck layers [2, 3, 5, 2]."""
    return _rednet(38, num_classes)


def rednet50(num_classes: int = 1000) -> RedNet:
    """RedNet-50: bottleneck layers [3, 4, 6, 3]."""
    return _rednet(50, num_classes)


def resnet26(num_classes: int = 1000) -> RedNet:
    """ResNet-26 with RedNet-26's stem, depth and widths (3x3 convs instead of involutions)."""
    return _resnet(26, num_classes)


def resnet38(num_classes: int = 1000) -> RedNet:
    """ResNet-38 counterpart of RedNet-38."""
    return _resnet(38, num_classes)


def resnet50(num_classes: int = 1000) -> RedNet:
    """ResNet-50 counterpart of RedNet-50 (RedNet's deep stem, not torchvision's 7x7 stem)."""
    return _resnet(50, num_classes)

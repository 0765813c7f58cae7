"""Squeeze-and-Excitation (Hu et al., arXiv 1709.01507) and the SE-ResNet bottleneck.

SE itself has no BN: GAP -> FC (C -> C/r) -> ReLU -> FC (C/r -> C) -> sigmoid -> channel scale.
It sits after the last conv-BN of a residual branch, so the deploy form of an SE network is the
same network with every conv-BN folded (the SE gate stays: it is data dependent). The FCs are
1x1 convs on the pooled map, as in the official code, and export as ONNX Conv on a 1x1 map.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._common import conv_bn, fold_conv_bns

__all__ = ["SEModule", "SEBottleneck"]


class SEModule(nn.Module):
    """SE block (arXiv 1709.01507). Paper default: reduction ``r=16``; sigmoid gate."""

    def __init__(self, channels: int, reduction: int = 16, min_hidden: int = 1) -> None:
        super().__init__()
        hidden = max(min_hidden, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = self.gate(self.fc2(self.act(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))
        return x * s


class SEBottleneck(nn.Module):
    """SE-ResNet bottleneck (paper Fig. 3): 1x1-BN-ReLU, 3x3-BN-ReLU (stride), 1x1-BN, SE on the
    residual branch, then the shortcut (1x1-BN projection when the shape changes) and ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, reduction: int = 16) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = conv_bn(in_channels, width, 1, act=nn.ReLU())
        self.conv2 = conv_bn(width, width, 3, stride, act=nn.ReLU())
        self.conv3 = conv_bn(width, out, 1)
        self.se = SEModule(out, reduction)
        self.shortcut = conv_bn(in_channels, out, 1, stride) if stride != 1 or in_channels != out else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.se(self.conv3(self.conv2(self.conv1(x)))) + self.shortcut(x))

    def to_deploy(self, example_inputs: tuple[Tensor, ...] | None = None) -> nn.Module:
        """Every conv-BN folded (through ``repconv.fuse`` when present and ``example_inputs`` given)."""
        return fold_conv_bns(self, example_inputs)

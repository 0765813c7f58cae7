"""RepVGG block (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", arXiv 2101.03697)."""

from __future__ import annotations

from torch import Tensor, nn

from ..algebra import add
from .common import ConvBN, Pair, RepBlock, bn_identity_kernel, kernel_to_conv, kxk_and_1x1_geometry


class RepVGGBlock(RepBlock):
    """3x3 conv-BN + 1x1 conv-BN + identity-BN, summed, then ReLU; deploys as one 3x3 conv + ReLU.

    The identity branch exists only when ``in_channels == out_channels``, ``stride == 1`` (the
    paper's rule) and the padding is the centred one: otherwise its output would not match in shape.
    ``groups`` applies to both conv branches (RepVGG-B*g2/g4 use grouped layers). The 1x1 branch is
    padded with ``padding - k//2`` so that it stays centred when a larger padding is requested.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Pair = 3, stride: int | Pair = 1,
                 padding: int | Pair | None = None, dilation: int | Pair = 1, groups: int = 1,
                 act: bool = True, deploy: bool = False) -> None:
        super().__init__()
        k, s, d, p, p11, centred = kxk_and_1x1_geometry(kernel_size, stride, padding, dilation, "RepVGGBlock")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.conv_kxk: ConvBN | None = ConvBN(in_channels, out_channels, k, s, p, d, groups)
        self.conv_1x1: ConvBN | None = ConvBN(in_channels, out_channels, 1, s, p11, 1, groups)
        use_id = in_channels == out_channels and s == (1, 1) and centred  # output keeps the input's shape
        self.bn_identity: nn.BatchNorm2d | None = nn.BatchNorm2d(in_channels) if use_id else None
        self.reparam_conv: nn.Conv2d | None = None
        self.act = nn.ReLU() if act else nn.Identity()
        if deploy:
            self.reparameterize()

    def _branches(self, x: Tensor) -> Tensor:
        out = self.conv_kxk(x) + self.conv_1x1(x)
        if self.bn_identity is not None:
            out = out + self.bn_identity(x)
        return out

    def _reparameterize(self) -> None:
        ref = self.conv_kxk.conv.weight
        kernels = [self.conv_kxk.kernel(), self.conv_1x1.kernel()]
        if self.bn_identity is not None:
            kernels.append(bn_identity_kernel(self.bn_identity, self.groups))
        self.reparam_conv = kernel_to_conv(add(kernels), ref)
        self.conv_kxk = self.conv_1x1 = self.bn_identity = None

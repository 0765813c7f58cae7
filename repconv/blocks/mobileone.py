"""MobileOne block (Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone",
arXiv 2206.04040)."""

from __future__ import annotations

from torch import Tensor, nn

from ..algebra import add
from .common import ConvBN, Pair, RepBlock, bn_identity_kernel, kernel_to_conv, pair, require_odd, same_padding


class MobileOneBlock(RepBlock):
    """k over-parameterized KxK conv-BN branches + a 1x1 conv-BN "scale" branch + identity BN.

    MobileOne's unit is a depthwise block (K=3, ``groups = channels``) followed by a pointwise block
    (K=1, where the scale branch is omitted because it would duplicate the conv branches); see
    :func:`mobileone_unit`. ``num_conv_branches`` is the paper's over-parameterization factor k
    (k=4 for MobileOne-S0, 1 for S1-S4). The identity branch exists when shapes allow
    (``in == out``, stride 1, centred padding). Deploys as one KxK conv + ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Pair = 3, stride: int | Pair = 1,
                 padding: int | Pair | None = None, groups: int = 1, num_conv_branches: int = 1,
                 act: bool = True, deploy: bool = False) -> None:
        super().__init__()
        if num_conv_branches < 1:
            raise ValueError("MobileOneBlock needs at least one conv branch")
        k, s = pair(kernel_size), pair(stride)
        require_odd(k, "MobileOneBlock")
        c = same_padding(k)
        p = c if padding is None else pair(padding)
        p11 = (p[0] - c[0], p[1] - c[1])
        if min(p11) < 0:
            raise ValueError(f"MobileOneBlock: padding {p} is smaller than the centred padding {c}")
        self.groups = groups
        same_shape = in_channels == out_channels and s == (1, 1) and p == c
        self.bn_identity: nn.BatchNorm2d | None = nn.BatchNorm2d(in_channels) if same_shape else None
        self.conv_scale: ConvBN | None = (ConvBN(in_channels, out_channels, 1, s, p11, 1, groups)
                                          if k != (1, 1) else None)
        self.conv_branches: nn.ModuleList | None = nn.ModuleList(
            ConvBN(in_channels, out_channels, k, s, p, 1, groups) for _ in range(num_conv_branches))
        self.reparam_conv: nn.Conv2d | None = None
        self.act = nn.ReLU() if act else nn.Identity()
        if deploy:
            self.reparameterize()

    def _branches(self, x: Tensor) -> Tensor:
        out = self.conv_branches[0](x)
        for branch in self.conv_branches[1:]:
            out = out + branch(x)
        if self.conv_scale is not None:
            out = out + self.conv_scale(x)
        if self.bn_identity is not None:
            out = out + self.bn_identity(x)
        return out

    def _reparameterize(self) -> None:
        ref = self.conv_branches[0].conv.weight
        kernels = [b.kernel() for b in self.conv_branches]
        if self.conv_scale is not None:
            kernels.append(self.conv_scale.kernel())
        if self.bn_identity is not None:
            kernels.append(bn_identity_kernel(self.bn_identity, self.groups))
        self.reparam_conv = kernel_to_conv(add(kernels), ref)
        self.conv_branches = self.conv_scale = self.bn_identity = None


def mobileone_unit(in_channels: int, out_channels: int, stride: int = 1, num_conv_branches: int = 1) -> nn.Sequential:
    """MobileOne's basic unit: 3x3 depthwise block then 1x1 pointwise block, each with ReLU."""
    return nn.Sequential(
        MobileOneBlock(in_channels, in_channels, 3, stride, groups=in_channels, num_conv_branches=num_conv_branches),
        MobileOneBlock(in_channels, out_channels, 1, 1, num_conv_branches=num_conv_branches),
    )

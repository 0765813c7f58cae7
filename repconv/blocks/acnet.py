"""Asymmetric Convolution Block (Ding et al., "ACNet: Strengthening the Kernel Skeletons for Powerful
CNN via Asymmetric Convolution Blocks", arXiv 1908.03930)."""

from __future__ import annotations

from torch import Tensor, nn

from ..algebra import add
from .common import ConvBN, Pair, RepBlock, kernel_to_conv, pair, require_odd, same_padding


class ACBlock(RepBlock):
    """KxK conv-BN + 1xK conv-BN + Kx1 conv-BN, summed; deploys as one KxK conv.

    A drop-in replacement for a KxK conv (no activation). The asymmetric kernels strengthen the
    "skeleton" (centre row and column) of the square kernel; adding them is exact because all three
    read the same input and share a centre (ACNet's additivity of convolution). ``gamma_init``
    optionally initialises the asymmetric branches' BN gamma (ACNet v2 uses 1/3).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Pair = 3, stride: int | Pair = 1,
                 padding: int | Pair | None = None, dilation: int | Pair = 1, groups: int = 1,
                 gamma_init: float | None = None, deploy: bool = False) -> None:
        super().__init__()
        k, d, s = pair(kernel_size), pair(dilation), pair(stride)
        require_odd(k, "ACBlock")
        c = same_padding(k, d)
        p = c if padding is None else pair(padding)
        extra = (p[0] - c[0], p[1] - c[1])
        if min(extra) < 0:
            raise ValueError(f"ACBlock: padding {p} is smaller than the centred padding {c}")
        self.conv_square: ConvBN | None = ConvBN(in_channels, out_channels, k, s, p, d, groups)
        # the Kx1 kernel spans the full height, the 1xK the full width; the collapsed axis keeps
        # only the padding beyond the centred amount
        self.conv_ver: ConvBN | None = ConvBN(in_channels, out_channels, (k[0], 1), s, (p[0], extra[1]), d, groups)
        self.conv_hor: ConvBN | None = ConvBN(in_channels, out_channels, (1, k[1]), s, (extra[0], p[1]), d, groups)
        if gamma_init is not None:
            nn.init.constant_(self.conv_ver.bn.weight, gamma_init)
            nn.init.constant_(self.conv_hor.bn.weight, gamma_init)
        self.reparam_conv: nn.Conv2d | None = None
        if deploy:
            self.reparameterize()

    def _branches(self, x: Tensor) -> Tensor:
        return self.conv_square(x) + self.conv_ver(x) + self.conv_hor(x)

    def _reparameterize(self) -> None:
        ref = self.conv_square.conv.weight
        k = add([self.conv_square.kernel(), self.conv_ver.kernel(), self.conv_hor.kernel()])
        self.reparam_conv = kernel_to_conv(k, ref)
        self.conv_square = self.conv_ver = self.conv_hor = None

"""QARepVGG block (Chu et al., "Make RepVGG Greater Again: A Quantization-aware Approach", arXiv 2212.01593)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..algebra import ConvKernel, add, bn_module_scale_shift, conv_then_affine, identity
from .common import ConvBN, Pair, RepBlock, conv_kernel, kernel_to_conv, kxk_and_1x1_geometry


class QARepVGGBlock(RepBlock):
    """3x3 conv-BN + 1x1 conv + identity, summed, then one BN and ReLU; deploys as one 3x3 conv + ReLU.

    The paper's quantization-friendly form of :class:`~repconv.blocks.RepVGGBlock`: the BNs of the
    identity and 1x1 branches are gone (a BN with a small running variance there multiplies its
    channel of the fused kernel, the outliers that make RepVGG lose accuracy in INT8), and a single BN
    after the sum keeps the output's variance under control. The 1x1 conv has no bias, as in the
    paper's reference code. Identity exists when ``in == out``, stride 1 and the padding is centred.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Pair = 3, stride: int | Pair = 1,
                 padding: int | Pair | None = None, dilation: int | Pair = 1, groups: int = 1,
                 act: bool = True, deploy: bool = False) -> None:
        super().__init__()
        k, s, d, p, p11, centred = kxk_and_1x1_geometry(kernel_size, stride, padding, dilation, "QARepVGGBlock")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.conv_kxk: ConvBN | None = ConvBN(in_channels, out_channels, k, s, p, d, groups)
        self.conv_1x1: nn.Conv2d | None = nn.Conv2d(in_channels, out_channels, 1, s, p11, groups=groups, bias=False)
        self.use_identity = in_channels == out_channels and s == (1, 1) and centred
        self.bn: nn.BatchNorm2d | None = nn.BatchNorm2d(out_channels)
        self.reparam_conv: nn.Conv2d | None = None
        self.act = nn.ReLU() if act else nn.Identity()
        if deploy:
            self.reparameterize()

    def _branches(self, x: Tensor) -> Tensor:
        out = self.conv_kxk(x) + self.conv_1x1(x)
        if self.use_identity:
            out = out + x
        return self.bn(out)

    def _reparameterize(self) -> None:
        ref = self.conv_kxk.conv.weight
        kernels = [self.conv_kxk.kernel(), conv_kernel(self.conv_1x1)]
        if self.use_identity:
            ident = identity(self.in_channels, self.groups, dtype=torch.float64)
            kernels.append(ConvKernel(ident.weight.to(ref.device), ident.bias.to(ref.device), ident.geom))
        scale, shift = bn_module_scale_shift(self.bn, torch.float64)
        fused = conv_then_affine(add(kernels), scale.to(ref.device), shift.to(ref.device))
        self.reparam_conv = kernel_to_conv(fused, ref)
        self.conv_kxk = self.conv_1x1 = self.bn = None

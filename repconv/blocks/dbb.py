"""Diverse Branch Block (Ding et al., "Diverse Branch Block: Building a Convolution as an
Inception-like Unit", arXiv 2103.13425)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import torch
from torch import Tensor, nn

from ..algebra import ConvKernel, add, avg_pool, bn_module_scale_shift, compose, conv_then_affine
from .common import (
    ConvBN,
    PadBN,
    Pair,
    RepBlock,
    conv_kernel,
    kernel_to_conv,
    pair,
    require_odd,
    same_padding,
)


def _pointwise_pad_bn(conv: nn.Conv2d, pad_bn: PadBN) -> ConvKernel:
    """1x1 conv -> zero pad -> BN as one kernel: a bias-free 1x1 conv padded by p outputs 0 on the
    border, which is what ``F.pad`` adds, so the pad moves into the conv's geometry; the BN then
    folds as a channel affine and its shift lands on the border too (the "pad with BN(0)" rule)."""
    k = conv_kernel(conv)
    k = ConvKernel(k.weight, k.bias, replace(k.geom, padding=pad_bn.padding))
    scale, shift = bn_module_scale_shift(pad_bn.bn, torch.float64)
    return conv_then_affine(k, scale.to(k.weight.device), shift.to(k.weight.device))


def _bn_after(k: ConvKernel, bn: nn.BatchNorm2d) -> ConvKernel:
    scale, shift = bn_module_scale_shift(bn, torch.float64)
    return conv_then_affine(k, scale.to(k.weight.device), shift.to(k.weight.device))


class DiverseBranchBlock(RepBlock):
    """KxK conv-BN + 1x1 conv-BN + (1x1 -> BN-and-pad -> KxK -> BN) + (1x1 -> BN-and-pad -> AvgPool -> BN).

    Deploys as one KxK conv through the paper's six transforms: I (BN fold) on every conv-BN,
    II (branch addition) for the sum, III (sequential 1x1 -> KxK) for the two sequences, IV (depth
    concatenation) implicitly for ``groups > 1`` (the grouped channel products in
    :func:`repconv.algebra.compose`), V (average pooling as a conv) and VI (multi-scale: the 1x1
    branch zero-padded to KxK).

    Paper defaults: the 1x1 of the 1x1-KxK branch has ``internal_channels = in_channels`` and
    starts as the identity (for depthwise blocks it doubles the channels and is randomly
    initialised); depthwise blocks (``groups == out_channels``) have no 1x1 branch and pool the
    input directly. The identity start uses a plain ``nn.Conv2d`` initialised to the identity matrix
    (the official code adds a frozen identity inside forward, which changes only what weight decay
    pulls towards), keeping the traced graph free of computed weights.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Pair = 3, stride: int | Pair = 1,
                 padding: int | Pair | None = None, groups: int = 1, internal_channels: int | None = None,
                 act: bool = False, deploy: bool = False) -> None:
        super().__init__()
        k, s = pair(kernel_size), pair(stride)
        require_odd(k, "DiverseBranchBlock")
        c = same_padding(k)
        p = c if padding is None else pair(padding)
        p11 = (p[0] - c[0], p[1] - c[1])
        if min(p11) < 0:
            raise ValueError(f"DiverseBranchBlock: padding {p} is smaller than the centred padding {c}")
        depthwise = groups == out_channels
        if depthwise and in_channels != out_channels:
            raise ValueError("depthwise DiverseBranchBlock needs in_channels == out_channels")
        self.kernel_size, self.stride, self.padding, self.groups = k, s, p, groups
        self.out_channels = out_channels

        self.branch_kxk: ConvBN | None = ConvBN(in_channels, out_channels, k, s, p, 1, groups)
        self.branch_1x1: ConvBN | None = None if depthwise else ConvBN(in_channels, out_channels, 1, s, p11, 1, groups)

        if depthwise:
            avg = OrderedDict(pool=nn.AvgPool2d(k, s, p))
        else:
            avg = OrderedDict(conv=nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False),
                              pad_bn=PadBN(out_channels, p), pool=nn.AvgPool2d(k, s, 0))
        avg["bn"] = nn.BatchNorm2d(out_channels)
        self.branch_avg: nn.Sequential | None = nn.Sequential(avg)

        if internal_channels is None:
            internal_channels = in_channels if not depthwise else 2 * in_channels
        conv1 = nn.Conv2d(in_channels, internal_channels, 1, groups=groups, bias=False)
        if internal_channels == in_channels:
            with torch.no_grad():
                conv1.weight.zero_()
                ig = in_channels // groups
                for ch in range(in_channels):
                    conv1.weight[ch, ch % ig, 0, 0] = 1.0
        self.branch_1x1_kxk: nn.Sequential | None = nn.Sequential(OrderedDict(
            conv1=conv1,
            pad_bn1=PadBN(internal_channels, p),
            conv2=nn.Conv2d(internal_channels, out_channels, k, s, 0, groups=groups, bias=False),
            bn2=nn.BatchNorm2d(out_channels),
        ))
        self.reparam_conv: nn.Conv2d | None = None
        self.act = nn.ReLU() if act else nn.Identity()
        if deploy:
            self.reparameterize()

    def _branches(self, x: Tensor) -> Tensor:
        out = self.branch_kxk(x) + self.branch_avg(x) + self.branch_1x1_kxk(x)
        if self.branch_1x1 is not None:
            out = out + self.branch_1x1(x)
        return out

    def _reparameterize(self) -> None:
        ref = self.branch_kxk.conv.weight
        dev = ref.device
        kernels = [self.branch_kxk.kernel()]
        if self.branch_1x1 is not None:
            kernels.append(self.branch_1x1.kernel())  # transform VI happens inside add()

        seq = self.branch_1x1_kxk
        first = _pointwise_pad_bn(seq.conv1, seq.pad_bn1)
        second = _bn_after(conv_kernel(seq.conv2), seq.bn2)
        kernels.append(compose(first, second))  # transform III

        avg = self.branch_avg
        pool = avg.pool
        pk = avg_pool(self.out_channels, pool.kernel_size, pool.stride, pool.padding,
                      count_include_pad=pool.count_include_pad, ceil_mode=pool.ceil_mode,
                      divisor_override=pool.divisor_override)  # transform V
        pk = ConvKernel(pk.weight.to(dev), pk.bias.to(dev), pk.geom)
        pk = _bn_after(pk, avg.bn)
        if hasattr(avg, "conv"):
            pk = compose(_pointwise_pad_bn(avg.conv, avg.pad_bn), pk)
        kernels.append(pk)

        self.reparam_conv = kernel_to_conv(add(kernels), ref)  # transform II
        self.branch_kxk = self.branch_1x1 = self.branch_avg = self.branch_1x1_kxk = None

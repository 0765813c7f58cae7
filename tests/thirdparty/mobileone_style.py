# ruff: noqa: UP008, UP032, B905  -- written in the official repositories' (Python 2 era) style on purpose
"""MobileOne (arXiv 2206.04040) in the layout of the official code: ``rbr_skip`` (BN), ``rbr_conv``
(ModuleList of conv-BN, summed with Python ``sum()``), ``rbr_scale`` (1x1 conv-BN), ``se``, and
``activation``. Re-implemented."""

import torch.nn as nn


class MobileOneBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 use_se=False, num_conv_branches=1):
        super(MobileOneBlock, self).__init__()
        self.groups = groups
        self.stride = stride
        self.padding = padding
        self.kernel_size = kernel_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_conv_branches = num_conv_branches
        assert not use_se, "SE is not part of this test formulation"
        self.se = nn.Identity()
        self.activation = nn.ReLU()

        self.rbr_skip = nn.BatchNorm2d(num_features=in_channels) \
            if out_channels == in_channels and stride == 1 else None
        rbr_conv = list()
        for _ in range(self.num_conv_branches):
            rbr_conv.append(self._conv_bn(kernel_size=kernel_size, padding=padding))
        self.rbr_conv = nn.ModuleList(rbr_conv)
        self.rbr_scale = None
        if kernel_size > 1:
            self.rbr_scale = self._conv_bn(kernel_size=1, padding=0)

    def forward(self, x):
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        out = scale_out + identity_out
        out = out + sum(conv(x) for conv in self.rbr_conv)
        return self.activation(self.se(out))

    def _conv_bn(self, kernel_size, padding):
        mod_list = nn.Sequential()
        mod_list.add_module("conv", nn.Conv2d(in_channels=self.in_channels, out_channels=self.out_channels,
                                              kernel_size=kernel_size, stride=self.stride, padding=padding,
                                              groups=self.groups, bias=False))
        mod_list.add_module("bn", nn.BatchNorm2d(num_features=self.out_channels))
        return mod_list


class MobileOneUnit(nn.Module):
    """Depthwise 3x3 block followed by a pointwise block, as in a MobileOne stage."""

    def __init__(self, in_planes, planes, stride=1, num_conv_branches=2):
        super(MobileOneUnit, self).__init__()
        self.dw = MobileOneBlock(in_planes, in_planes, 3, stride, 1, groups=in_planes,
                                 num_conv_branches=num_conv_branches)
        self.pw = MobileOneBlock(in_planes, planes, 1, 1, 0, groups=1, num_conv_branches=num_conv_branches)

    def forward(self, x):
        return self.pw(self.dw(x))

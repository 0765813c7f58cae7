# ruff: noqa: UP008, UP032, B905  -- written in the official repositories' (Python 2 era) style on purpose
"""RepLKNet (arXiv 2203.06717) and UniRepLKNet's dilated reparam block in the layouts of their
official code: ``lkb_origin`` / ``small_conv`` with ``hasattr`` checks and ``+=``; a full RepLKNet block
with a BN *before* its first 1x1 conv (``prelkb_bn``); ``dil_conv_k{k}_{r}`` / ``dil_bn_k{k}_{r}``
attributes set with ``__setattr__``. Re-implemented."""

import torch.nn as nn


def conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups, dilation=1):
    result = nn.Sequential()
    result.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                        groups, bias=False))
    result.add_module("bn", nn.BatchNorm2d(out_channels))
    return result


def conv_bn_relu(in_channels, out_channels, kernel_size, stride, padding, groups, dilation=1):
    result = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups, dilation)
    result.add_module("nonlinear", nn.ReLU())
    return result


class ReparamLargeKernelConv(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride, groups, small_kernel):
        super(ReparamLargeKernelConv, self).__init__()
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        padding = kernel_size // 2
        self.lkb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups)
        if small_kernel is not None:
            assert small_kernel <= kernel_size
            self.small_conv = conv_bn(in_channels, out_channels, small_kernel, stride, small_kernel // 2, groups)

    def forward(self, inputs):
        if hasattr(self, "lkb_reparam"):
            return self.lkb_reparam(inputs)
        out = self.lkb_origin(inputs)
        if hasattr(self, "small_conv"):
            out += self.small_conv(inputs)
        return out


class RepLKBlock(nn.Module):
    def __init__(self, in_channels, dw_channels, block_lk_size, small_kernel):
        super(RepLKBlock, self).__init__()
        self.pw1 = conv_bn_relu(in_channels, dw_channels, 1, 1, 0, groups=1)
        self.pw2 = conv_bn(dw_channels, in_channels, 1, 1, 0, groups=1)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, dw_channels, block_lk_size, stride=1,
                                                   groups=dw_channels, small_kernel=small_kernel)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = nn.BatchNorm2d(in_channels)
        self.drop_path = nn.Identity()

    def forward(self, x):
        out = self.prelkb_bn(x)
        out = self.pw1(out)
        out = self.large_kernel(out)
        out = self.lk_nonlinear(out)
        out = self.pw2(out)
        return x + self.drop_path(out)


class DilatedReparamBlock(nn.Module):
    _settings = {13: ([5, 7, 3, 3, 3], [1, 2, 3, 4, 5]), 9: ([5, 5, 3, 3], [1, 2, 3, 4]), 7: ([5, 3, 3], [1, 2, 3])}

    def __init__(self, channels, kernel_size):
        super(DilatedReparamBlock, self).__init__()
        self.lk_origin = nn.Conv2d(channels, channels, kernel_size, 1, kernel_size // 2, 1, channels, bias=False)
        self.kernel_sizes, self.dilates = self._settings[kernel_size]
        self.origin_bn = nn.BatchNorm2d(channels)
        for k, r in zip(self.kernel_sizes, self.dilates):
            self.__setattr__("dil_conv_k{}_{}".format(k, r),
                             nn.Conv2d(channels, channels, k, 1, (r * (k - 1) + 1) // 2, r, channels, bias=False))
            self.__setattr__("dil_bn_k{}_{}".format(k, r), nn.BatchNorm2d(channels))

    def forward(self, x):
        if not hasattr(self, "origin_bn"):
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for k, r in zip(self.kernel_sizes, self.dilates):
            conv = self.__getattr__("dil_conv_k{}_{}".format(k, r))
            bn = self.__getattr__("dil_bn_k{}_{}".format(k, r))
            out = out + bn(conv(x))
        return out

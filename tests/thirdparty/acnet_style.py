# ruff: noqa: UP008, UP032, B905  -- written in the official repositories' (Python 2 era) style on purpose
"""ACNet's asymmetric convolution block in the official layout (``square_conv``/``square_bn``,
``ver_conv``/``ver_bn``, ``hor_conv``/``hor_bn``), re-implemented from the paper (arXiv 1908.03930)."""

import torch.nn as nn


class ACBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 padding_mode="zeros", use_affine=True):
        super(ACBlock, self).__init__()
        self.square_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, kernel_size), stride, padding,
                                     dilation, groups, bias=False, padding_mode=padding_mode)
        self.square_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        center = padding - kernel_size // 2
        assert center >= 0, "this re-implementation does not crop"
        self.ver_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, 1), stride, (padding, center),
                                  dilation, groups, bias=False, padding_mode=padding_mode)
        self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, kernel_size), stride, (center, padding),
                                  dilation, groups, bias=False, padding_mode=padding_mode)
        self.ver_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        self.hor_bn = nn.BatchNorm2d(out_channels, affine=use_affine)

    def forward(self, input):
        square_outputs = self.square_bn(self.square_conv(input))
        vertical_outputs = self.ver_bn(self.ver_conv(input))
        horizontal_outputs = self.hor_bn(self.hor_conv(input))
        return square_outputs + vertical_outputs + horizontal_outputs

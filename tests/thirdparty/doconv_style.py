# ruff: noqa: UP008, UP032, B905  -- written in the official repositories' (Python 2 era) style on purpose
"""DO-Conv (arXiv 2006.12030) in the style of the official layer: parameters ``W`` and ``D`` plus a
frozen ``D_diag`` *Parameter* (requires_grad=False), with the kernel composed by ``torch.einsum`` inside
forward and applied with ``F.conv2d``. Re-implemented; supports ``groups`` = 1 and depthwise (DO-DConv)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import Parameter, init


class DOConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=3, D_mul=None, stride=1, padding=1,
                 dilation=1, groups=1, bias=False):
        super(DOConv2d, self).__init__()
        assert groups in (1, in_channels), "this formulation covers dense and depthwise DO-Conv"
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kernel_size, kernel_size)
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        M, N = self.kernel_size
        self.D_mul = M * N if D_mul is None or M * N <= 1 else D_mul
        self.W = Parameter(torch.Tensor(out_channels, in_channels // groups, self.D_mul))
        init.kaiming_uniform_(self.W, a=math.sqrt(5))
        if M * N > 1:
            self.D = Parameter(torch.zeros(in_channels, M * N, self.D_mul))
            eye = torch.eye(M * N).reshape(1, M * N, M * N)
            d_diag = eye.repeat(in_channels, 1, self.D_mul // (M * N))
            if self.D_mul % (M * N) != 0:
                zeros = torch.zeros(in_channels, M * N, self.D_mul % (M * N))
                d_diag = torch.cat([d_diag, zeros], dim=2)
            self.D_diag = Parameter(d_diag, requires_grad=False)
        if bias:
            self.bias = Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter("bias", None)

    def forward(self, input):
        M, N = self.kernel_size
        DoW_shape = (self.out_channels, self.in_channels // self.groups, M, N)
        if M * N > 1:
            D = self.D + self.D_diag
            if self.groups == 1:
                DoW = torch.reshape(torch.einsum("ims,ois->oim", D, self.W), DoW_shape)
            else:
                mult = self.out_channels // self.in_channels
                W = torch.reshape(self.W, (self.in_channels, mult, self.D_mul))
                DoW = torch.reshape(torch.einsum("cms,cts->ctm", D, W), DoW_shape)
        else:
            DoW = torch.reshape(self.W, DoW_shape)
        return F.conv2d(input, DoW, self.bias, self.stride, self.padding, self.dilation, self.groups)


class DOConvBNReLU(nn.Module):
    """DO-Conv used as a drop-in conv inside a conv-BN-ReLU layer, then a depthwise DO-DConv + BN."""

    def __init__(self, cin=8, cout=16):
        super(DOConvBNReLU, self).__init__()
        self.conv = DOConv2d(cin, cout, 3, D_mul=12, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.dwconv = DOConv2d(cout, cout * 2, 3, padding=1, groups=cout)
        self.dwbn = nn.BatchNorm2d(cout * 2)

    def forward(self, x):
        return self.dwbn(self.dwconv(self.relu(self.bn(self.conv(x)))))

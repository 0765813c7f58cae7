"""Depthwise over-parameterized convolution (Cao et al., "DO-Conv: Depthwise Over-parameterized
Convolutional Layer", arXiv 2006.12030): DOConv2d and its depthwise variant DO-DConv."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..algebra import ConvGeometry
from ..algebra.doconv import compose_kernel, doconv_identity, doconv_kernel
from .common import Pair, RepBlock, kernel_to_conv, pair

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class DOConv2d(RepBlock):
    """A conv whose kernel is the composition of a depthwise factor D and a conventional factor W.

    ``D`` (C_in, M*N, D_mul) is trained as ``D + I`` with D starting at zero, so the layer starts as
    the plain conv ``W``; ``D_mul`` defaults to M*N and must be >= M*N (otherwise the product cannot
    represent every kernel and the layer would lose capacity instead of gaining parameters).
    Training uses kernel composition ``W' = D^T o W`` (cheaper than composing features, same
    output); deployment stores W' in a plain ``nn.Conv2d``, so inference costs nothing extra.
    Signature mirrors ``nn.Conv2d``; ``bias`` defaults to False as in the paper's layer.
    1x1 kernels have no D (M*N = 1): the layer is then an ordinary conv.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Pair, stride: int | Pair = 1,
                 padding: int | Pair = 0, dilation: int | Pair = 1, groups: int = 1, bias: bool = False,
                 padding_mode: str = "zeros", D_mul: int | None = None, deploy: bool = False) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels ({in_channels}, {out_channels}) must be divisible by groups={groups}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        self.groups, self.padding_mode = groups, padding_mode
        mn = self.kernel_size[0] * self.kernel_size[1]
        self.D_mul = mn if D_mul is None or mn == 1 else int(D_mul)
        if self.D_mul < mn:
            raise ValueError(f"DO-Conv needs D_mul >= M*N = {mn}, got {D_mul}")

        self.W: nn.Parameter | None = nn.Parameter(torch.empty(out_channels, in_channels // groups, self.D_mul))
        nn.init.kaiming_uniform_(self.W, a=math.sqrt(5))  # same fan-in as nn.Conv2d when D_mul = M*N
        if mn > 1:
            self.D: nn.Parameter | None = nn.Parameter(torch.zeros(in_channels, mn, self.D_mul))
            self.register_buffer("D_diag", doconv_identity(in_channels, self.kernel_size, self.D_mul),
                                 persistent=False)
        else:
            self.register_parameter("D", None)
            self.register_buffer("D_diag", None, persistent=False)
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(out_channels))
            bound = 1 / math.sqrt((in_channels // groups) * mn)
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            self.register_parameter("bias", None)
        self.reparam_conv: nn.Conv2d | None = None
        if deploy:
            self.reparameterize()

    def composed_weight(self) -> Tensor:
        """W' = (D + I)^T o W, shaped like an ``nn.Conv2d`` weight (differentiable)."""
        if self.D is None:
            return self.W.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        return compose_kernel(self.D + self.D_diag, self.W, self.kernel_size, self.groups,
                              sizes=(self.in_channels, self.out_channels, self.D_mul))

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        weight = self.composed_weight()
        if self.padding_mode != "zeros":
            ph, pw = self.padding
            x = F.pad(x, [pw, pw, ph, ph], mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _reparameterize(self) -> None:
        ref = self.W
        d = None if self.D is None else (self.D.detach().double() + self.D_diag.double())
        b = None if self.bias is None else self.bias.detach().double()
        geom = ConvGeometry(self.stride, self.padding, self.dilation, self.groups, self.padding_mode)
        k = doconv_kernel(d, self.W.detach().double(), b, self.kernel_size, geom)
        self.reparam_conv = kernel_to_conv(k, ref)
        self.W = self.D = self.bias = None
        self.D_diag = None

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, D_mul={self.D_mul}")


class DODConv2d(DOConv2d):
    """DO-DConv: the depthwise conv of DO-Conv (``groups = channels``), with a depth multiplier.

    Each input channel c gets its own D[c] and ``depth_multiplier`` rows of W, so the deploy form is
    a depthwise conv with ``channels * depth_multiplier`` outputs (kernel composition
    ``(D^T o W^T)^T`` in the paper's notation).
    """

    def __init__(self, channels: int, kernel_size: int | Pair, stride: int | Pair = 1, padding: int | Pair = 0,
                 dilation: int | Pair = 1, depth_multiplier: int = 1, bias: bool = False,
                 padding_mode: str = "zeros", D_mul: int | None = None, deploy: bool = False) -> None:
        super().__init__(channels, channels * depth_multiplier, kernel_size, stride, padding, dilation,
                         groups=channels, bias=bias, padding_mode=padding_mode, D_mul=D_mul, deploy=deploy)

"""Convolutions and average pooling: one kernel each (DBB transform V makes avg-pool a conv)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from repconv import algebra as A
from repconv.algebra import ConvKernel, FusionRefused

from .. import affine as V
from ..affine import Affine
from . import NotAffine, Op, transfer

aten = torch.ops.aten
_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
CONV_FUNCTIONS = (F.conv2d, torch.conv2d, aten.conv2d.default, aten.conv2d.padding, aten.convolution.default,
                  aten._convolution.default)


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def conv_kernel(weight: torch.Tensor, bias: torch.Tensor | None, stride: Any, padding: Any, dilation: Any,
                groups: int, padding_mode: str = "zeros") -> ConvKernel:
    w = f64(weight)
    if w.dim() != 4:
        raise NotAffine  # conv1d / conv3d: not an image conv
    b = f64(bias) if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # 'same': symmetric only for odd effective kernel sizes
            d = A.conv._pair(dilation)
            eff = [d[i] * (w.shape[2 + i] - 1) for i in range(2)]
            if any(e % 2 for e in eff) or A.conv._pair(stride) != (1, 1):
                raise FusionRefused("padding='same' with an even effective kernel pads asymmetrically")
            padding = (eff[0] // 2, eff[1] // 2)
    geom = A.ConvGeometry(A.conv._pair(stride), A.conv._pair(padding), A.conv._pair(dilation), int(groups),
                          padding_mode)
    return ConvKernel(w, b, geom)


@transfer(modules=[nn.Conv2d])
def conv_module(op: Op) -> Affine:
    m = op.module
    if type(m).forward is not nn.Conv2d.forward:  # a subclass computing its own weight: traced inside
        raise NotAffine
    if isinstance(m.padding, str):
        k = conv_kernel(m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, m.padding_mode)
    else:
        k = ConvKernel.of(m)
        k = ConvKernel(f64(k.weight), f64(k.bias), k.geom)
    return V.through_conv(op.node, op.tensor(), k)


@transfer(functions=[(F.conv2d, _CONV), (torch.conv2d, _CONV), aten.conv2d.default, aten.conv2d.padding,
                     aten.convolution.default, aten._convolution.default])
def conv_function(op: Op) -> Affine:
    """``F.conv2d(x, w(params))`` and the aten convolutions of TorchScript / exported graphs."""
    if op.static("transposed", False):
        raise NotAffine
    w = op.const("weight")
    if not isinstance(w, torch.Tensor):
        raise NotAffine
    k = conv_kernel(w, op.const("bias"), op.static("stride", 1), op.static("padding", 0), op.static("dilation", 1),
                    op.static("groups", 1))
    return V.through_conv(op.node, op.tensor(), k)


@transfer(modules=[nn.AvgPool2d])
def avg_pool_module(op: Op) -> Affine:
    m = op.module
    if type(m) is not nn.AvgPool2d:
        raise NotAffine
    v = op.tensor()
    pool = A.avg_pool(v.out_channels, m.kernel_size, m.stride, m.padding, count_include_pad=m.count_include_pad,
                      ceil_mode=m.ceil_mode, divisor_override=m.divisor_override)
    return V.through_conv(op.node, v, pool)


_POOL = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


@transfer(functions=[(F.avg_pool2d, _POOL), aten.avg_pool2d.default])
def avg_pool_function(op: Op) -> Affine:
    v = op.tensor()
    k = op.static("kernel_size")
    pool = A.avg_pool(v.out_channels, k, op.static("stride", None) or k, op.static("padding", 0),
                      ceil_mode=op.static("ceil_mode", False), count_include_pad=op.static("count_include_pad", True),
                      divisor_override=op.static("divisor_override", None))
    return V.through_conv(op.node, v, pool)

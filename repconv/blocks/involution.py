"""Involution (arXiv 2103.06255) and inhomogeneous dynamic depth-wise conv (I-D-DW, arXiv 2106.04263).

Both generate one K x K kernel per output pixel, shared by the C/G channels of each of G groups, and
aggregate with ``torch.ops.repconv.involution`` (one fx ``call_function`` node; exported as the
``ai.repconv::Involution`` ONNX node). The kernel-generation branch is made of standard modules
(1x1 conv, BN, ReLU, avg-pool), so repconv's graph pass folds its BN like any conv-BN pair.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from repconv.ops.involution import involution

__all__ = ["Involution", "InhomogeneousDynamicDWConv"]


def _groups(channels: int, group_channels: int) -> int:
    if group_channels < 1 or channels % group_channels != 0:
        raise ValueError(f"channels ({channels}) must be a multiple of group_channels ({group_channels})")
    return channels // group_channels


def _check_kernel_size(kernel_size: int) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")


def _init_kernel_generator(conv: nn.Conv2d, kernel_size: int, hidden: int) -> None:
    """Start near a box filter (bias 1/K^2) plus a small dynamic part.

    The aggregation is quadratic in the input (kernel and data both scale with x), so with a
    default init and eval-mode BN (unit running stats) activations grow doubly exponentially with
    depth and an untrained RedNet outputs inf/NaN. Starting close to a linear averaging filter keeps
    untrained models finite, which export / fuse checks on random weights rely on.
    """
    kk = kernel_size * kernel_size
    nn.init.normal_(conv.weight, std=0.5 / (kk * hidden**0.5))
    nn.init.constant_(conv.bias, 1.0 / kk)


class Involution(nn.Module):
    """Involution: kernel = span(ReLU(BN(reduce(avgpool_s(x))))), out = involution(x, kernel).

    reduce: 1x1 conv C -> C/r (no bias, BN follows); span: 1x1 conv C/r -> G*K*K (bias);
    G = C / group_channels. For stride > 1 the branch sees x average-pooled with kernel = stride =
    s and ``ceil_mode=True``, so its spatial size is ceil(H/s), exactly the op's output size (odd
    inputs such as 57x57 with stride 2 give 29x29 on both paths).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        stride: int = 1,
        reduction: int = 4,
        group_channels: int = 16,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        _check_kernel_size(kernel_size)
        if stride < 1 or dilation < 1 or reduction < 1:
            raise ValueError("stride, dilation and reduction must be >= 1")
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.groups = _groups(channels, group_channels)
        hidden = max(1, channels // reduction)
        self.pool: nn.Module = (
            nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        )
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU()
        self.span = nn.Conv2d(hidden, self.groups * kernel_size * kernel_size, 1)
        _init_kernel_generator(self.span, kernel_size, hidden)

    def kernel(self, x: Tensor) -> Tensor:
        """The per-pixel kernels (N, G*K*K, ceil(H/s), ceil(W/s))."""
        return self.span(self.act(self.bn(self.reduce(self.pool(x)))))

    def forward(self, x: Tensor) -> Tensor:
        return involution(x, self.kernel(x), self.kernel_size, self.stride, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"dilation={self.dilation}, groups={self.groups}"
        )


class InhomogeneousDynamicDWConv(nn.Module):
    """I-D-DW conv: per-pixel depth-wise weights shared within channel heads (stride 1).

    The weights are a token-wise (1x1) MLP of the feature: Linear C -> C/r (+bias), BN, ReLU,
    Linear C/r -> heads*K*K (+bias); aggregation is the same op as involution with G = heads, so
    it exports and runs exactly like involution. An optional learnt per-channel bias is added after
    the aggregation, as in a depth-wise conv with bias.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        heads: int | None = None,
        group_channels: int = 32,
        reduction: int = 4,
        bias: bool = True,
    ) -> None:
        super().__init__()
        _check_kernel_size(kernel_size)
        if heads is None:
            heads = _groups(channels, group_channels)
        elif heads < 1 or channels % heads != 0:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.channels = channels
        self.kernel_size = kernel_size
        self.heads = heads
        hidden = max(1, channels // reduction)
        self.proj = nn.Conv2d(channels, hidden, 1)
        self.bn = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU()
        self.weight_proj = nn.Conv2d(hidden, heads * kernel_size * kernel_size, 1)
        _init_kernel_generator(self.weight_proj, kernel_size, hidden)
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight_proj(self.act(self.bn(self.proj(x))))
        out = involution(x, w, self.kernel_size, 1, 1, self.heads)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, heads={self.heads}"

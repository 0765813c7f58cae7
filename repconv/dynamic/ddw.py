"""Dynamic depth-wise convolution, D-DW (Han et al., arXiv 2106.04263).

The homogeneous dynamic variant of the paper: one depth-wise kernel per (sample, channel), shared
over all pixels, predicted from globally pooled features: GAP -> 1x1 conv (C -> C/r, no bias) ->
BN -> ReLU -> 1x1 conv (-> C*k*k) -> kernels. (The inhomogeneous I-D-DW variant, per-pixel kernels
shared within channel heads, is the involution op: ``repconv.ops.involution``.)

:class:`DynamicDWConv2d` convolves sample by sample (the reference); :class:`DynamicDWConv2dDeploy`
folds the generator's BN into its first FC and runs ONE depth-wise conv with the batch folded into
the groups (groups = N*C).
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from repconv.algebra import LinearKernel, bn_module_scale_shift, linear_then_affine

from ._common import Pair, pair, per_sample_conv2d, refuse

# Imported by name: register here too so fx records it as one node (fx.wrap patches per module).
torch.fx.wrap("per_sample_conv2d")

__all__ = ["DynamicDWConv2d", "DynamicDWConv2dDeploy"]


class DynamicDWConv2d(nn.Module):
    """D-DW conv (arXiv 2106.04263). Paper defaults (DWNet, replacing Swin's 7x7 windows):
    ``kernel_size=7``, ``reduction=4``, a learned static bias per channel."""

    def __init__(self, channels: int, kernel_size: int = 7, stride: int | Pair = 1, reduction: int = 4,
                 bias: bool = True) -> None:
        super().__init__()
        if channels // reduction < 1:
            raise refuse(self, f"channels={channels} too small for reduction={reduction}")
        self.channels, self.kernel_size, self.stride = channels, pair(kernel_size), pair(stride)
        self.padding = (self.kernel_size[0] // 2, self.kernel_size[1] // 2)
        hidden = channels // reduction
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels * self.kernel_size[0] * self.kernel_size[1], 1)
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def generate(self, x: Tensor) -> Tensor:
        """(N, C, 1, kh, kw) per-sample depth-wise kernels."""
        w = self.fc2(self.act(self.bn(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return w.reshape(x.shape[0], self.channels, 1, *self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        kernels = self.generate(x)  # batched: BN needs the batch for its training statistics
        outs = [F.conv2d(x[i:i + 1], kernels[i], self.bias, self.stride, self.padding, 1, self.channels)
                for i in range(x.shape[0])]  # the naive per-sample loop: the reference
        return torch.cat(outs, 0)

    def to_deploy(self) -> DynamicDWConv2dDeploy:
        return DynamicDWConv2dDeploy.from_train(self)


class DynamicDWConv2dDeploy(nn.Module):
    """Inference D-DW: Linear(+folded BN) -> ReLU -> Linear -> one depth-wise per-sample conv."""

    def __init__(self, channels: int, kernel_size: Pair, stride: Pair, padding: Pair, hidden: int,
                 bias: bool) -> None:
        super().__init__()
        self.channels, self.kernel_size, self.stride, self.padding = channels, kernel_size, stride, padding
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, channels * kernel_size[0] * kernel_size[1])
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    @staticmethod
    def from_train(m: DynamicDWConv2d) -> DynamicDWConv2dDeploy:
        hidden = m.fc1.out_channels
        d = DynamicDWConv2dDeploy(m.channels, m.kernel_size, m.stride, m.padding, hidden, m.bias is not None)
        w = m.fc1.weight
        d = d.to(device=w.device, dtype=w.dtype)
        k1 = LinearKernel(w.detach().reshape(hidden, -1).double(), torch.zeros(hidden, dtype=torch.float64))
        k1 = linear_then_affine(k1, *bn_module_scale_shift(m.bn))
        with torch.no_grad():
            d.fc1.weight.copy_(k1.weight)
            d.fc1.bias.copy_(k1.bias)
            d.fc2.weight.copy_(m.fc2.weight.reshape(m.fc2.out_channels, hidden))
            d.fc2.bias.copy_(m.fc2.bias)
            if m.bias is not None:
                d.bias.copy_(m.bias)
        return d.eval()

    def forward(self, x: Tensor) -> Tensor:
        w = self.fc2(self.act(self.fc1(x.mean(dim=(2, 3)))))
        kernels = w.reshape(-1, self.channels, 1, self.kernel_size[0], self.kernel_size[1])
        return per_sample_conv2d(x, kernels, self.bias, self.stride, self.padding, (1, 1), self.channels)

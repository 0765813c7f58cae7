"""DRConv: dynamic region-aware convolution (Chen et al., arXiv 2003.12243).

A guide branch (a KxK conv, C -> m) produces the guided feature F (N, m, H, W); the guided mask
assigns every pixel the region argmax_j F[:, j]. A filter generator makes m kernels per sample:
AdaptiveAvgPool2d(k) -> 1x1 conv (C -> m*m) -> sigmoid -> grouped 1x1 conv (m groups, -> m*O*C),
read as m kernels of shape (O, C, k, k) (each pooled k x k cell yields one tap of every kernel).
Each pixel is convolved with its region's kernel.

Training (the paper's straight-through scheme): the forward pass uses the hard one-hot mask, the
backward pass the softmax gradient, dL/dF = softmax(F) * (g - <softmax(F), g>) with g = dL/dmask.
:class:`DRConv2d` computes the m region convolutions sample by sample and mixes them with that
mask (the reference). :class:`DRConv2dDeploy` computes all m region convolutions of the whole
batch in ONE per-sample conv and picks each pixel's region with ``argmax`` + ``gather``.

Ties: ``torch.argmax`` and ONNX ``ArgMax`` (``select_last_index=0``, the exporter's value) both return
the FIRST maximal index, so exactly tied guide values pick the lower region in PyTorch and ONNX
Runtime alike (tests build exact ties). A fuse pass that changed the guide conv's rounding could
move a near-tie either way; the guide branch has no BN, so repconv leaves it untouched.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import adaptive_avg_pool2d, pair, per_sample_conv2d, refuse

torch.fx.wrap("per_sample_conv2d")

__all__ = ["DRConv2d", "DRConv2dDeploy"]


class DRConv2d(nn.Module):
    """DRConv layer (arXiv 2003.12243).

    Paper defaults: ``region_num=8`` (m; the paper ablates 2-16), ``kernel_size=3``, guide branch a
    ``kernel_size`` conv with the same stride; generator hidden width ``m*m`` (sigmoid after the
    first 1x1 conv, no activation after the second, as in the paper's figure).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 region_num: int = 8, hidden: int | None = None) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise refuse(self, f"kernel_size must be odd (same-size output), got {kernel_size}")
        m = region_num
        hidden = hidden if hidden is not None else m * m
        if hidden % m:
            raise refuse(self, f"generator hidden width {hidden} not divisible by region_num={m}")
        self.in_channels, self.out_channels, self.region_num = in_channels, out_channels, m
        self.kernel_size, self.stride, self.padding = kernel_size, pair(stride), pair(kernel_size // 2)
        self.guide = nn.Conv2d(in_channels, m, kernel_size, stride, kernel_size // 2)
        self.generator = nn.Sequential(
            nn.AdaptiveAvgPool2d(kernel_size),
            nn.Conv2d(in_channels, hidden, 1),
            nn.Sigmoid(),
            nn.Conv2d(hidden, m * out_channels * in_channels, 1, groups=m),
        )

    def region_kernels(self, x: Tensor) -> Tensor:
        """(N, m*O, C, k, k): the m region kernels of every sample, region-major."""
        g = self.generator(x)  # (N, m*O*C, k, k)
        k = self.kernel_size
        return g.reshape(x.shape[0], self.region_num * self.out_channels, self.in_channels, k, k)

    def guided_mask(self, guide: Tensor) -> Tensor:
        """(N, m, H, W) straight-through mask: value = one-hot(argmax), gradient = softmax's."""
        soft = torch.softmax(guide, dim=1)
        regions = torch.arange(self.region_num, device=guide.device).reshape(1, -1, 1, 1)
        hard = (guide.argmax(dim=1, keepdim=True) == regions).to(guide.dtype)  # one-hot over dim 1
        return hard + (soft - soft.detach())  # exactly `hard` in value: soft - soft == 0

    def forward(self, x: Tensor) -> Tensor:
        kernels = self.region_kernels(x)
        outs = torch.cat([F.conv2d(x[i:i + 1], kernels[i], None, self.stride, self.padding)
                          for i in range(x.shape[0])], 0)  # per sample: all m region convs
        outs = outs.reshape(x.shape[0], self.region_num, self.out_channels, outs.shape[-2], outs.shape[-1])
        mask = self.guided_mask(self.guide(x))
        return (outs * mask.unsqueeze(2)).sum(dim=1)

    def to_deploy(self) -> DRConv2dDeploy:
        return DRConv2dDeploy.from_train(self)


class DRConv2dDeploy(nn.Module):
    """Inference DRConv: one per-sample conv for all regions of all samples, hard argmax, gather.
    The generator's k x k adaptive pooling is written with Slice/ReduceMean (any input size exports)."""

    def __init__(self, m: DRConv2d) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.region_num = m.in_channels, m.out_channels, m.region_num
        self.kernel_size, self.stride, self.padding = m.kernel_size, m.stride, m.padding
        self.guide = m.guide
        self.gen1, self.gen_act, self.gen2 = m.generator[1], m.generator[2], m.generator[3]

    @staticmethod
    def from_train(m: DRConv2d) -> DRConv2dDeploy:
        import copy

        return DRConv2dDeploy(copy.deepcopy(m)).eval()

    def forward(self, x: Tensor) -> Tensor:
        k, o = self.kernel_size, self.out_channels
        # exportable pooling: ONNX has no adaptive pool to k x k when k does not divide H (14x14, 28x28)
        g = self.gen2(self.gen_act(self.gen1(adaptive_avg_pool2d(x, k))))
        kernels = g.reshape(-1, self.region_num * o, self.in_channels, k, k)
        outs = per_sample_conv2d(x, kernels, None, self.stride, self.padding, (1, 1), 1)
        outs = outs.reshape(-1, self.region_num, o, outs.shape[-2], outs.shape[-1])
        index = self.guide(x).argmax(dim=1, keepdim=True)  # (N, 1, H, W): first max on ties
        index = index.unsqueeze(2).expand(-1, -1, o, -1, -1)
        return torch.gather(outs, 1, index).squeeze(1)

"""RepMLP block (Ding et al., "RepMLP: Re-parameterizing Convolutions into Fully-connected Layers for
Image Recognition", arXiv 2105.01883)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from ..algebra import ConvKernel, LinearKernel, affine_then_linear, bn_module_scale_shift, conv_to_fc
from .common import ConvBN, RepBlock, fold_conv_bn


class RepMLPBlock(RepBlock):
    """Global perceptron + partition perceptron (grouped FC "fc3") + local perceptron (conv-BN branches).

    The (N, C, H, W) map is cut into (H/h) x (W/w) partitions of h x w pixels. The *global
    perceptron* (avg-pool per partition -> BN -> FC -> ReLU -> FC) adds one value per partition and
    channel, restoring the cross-partition correlation the cut removed; it is only built when there
    is more than one partition. The *partition perceptron* fc3 is an FC from C*h*w to O*h*w shared by
    all partitions, grouped (``fc3_groups``) to save parameters and followed by BN1d. The *local
    perceptron* runs conv-BN branches (``reparam_conv_k``) on every partition (zero-padded at the
    partition border) and adds their output.

    Deploy: every conv-BN is a linear map on a fixed h x w input, so it equals an FC (found by
    feeding the identity, :func:`repconv.algebra.conv_to_fc`); those FCs and the BN1d merge into fc3.
    The global perceptron keeps its nonlinearity, only its BN folds (into its first FC).
    Defaults are the paper's RepMLP-Res50 setting: branches 1, 3, 5, fc3_groups 4, reduction 1.
    """

    # the generic fx pass cannot move the local convs into the FC across the partition reshapes:
    # repconv.fuse calls reparameterize() on this block first
    fuse_by_reparameterize = True


    def __init__(self, in_channels: int, out_channels: int, H: int, W: int, h: int, w: int,
                 reparam_conv_k: tuple[int, ...] = (1, 3, 5), fc1_fc2_reduction: int = 1, fc3_groups: int = 4,
                 deploy: bool = False) -> None:
        super().__init__()
        if H % h or W % w:
            raise ValueError(f"partition {h}x{w} must tile the {H}x{W} input")
        if in_channels % fc3_groups or out_channels % fc3_groups:
            raise ValueError(f"channels ({in_channels}, {out_channels}) must be divisible by fc3_groups")
        if any(k % 2 == 0 for k in reparam_conv_k):
            raise ValueError(f"local-perceptron kernels {reparam_conv_k} must be odd (centred on each pixel)")
        self.C, self.O, self.H, self.W, self.h, self.w = in_channels, out_channels, H, W, h, w
        self.h_parts, self.w_parts = H // h, W // w
        self.fc3_groups = fc3_groups

        self.gp_pool: nn.AvgPool2d | None = None
        self.gp_bn: nn.BatchNorm2d | None = None
        self.gp_fc1: nn.Linear | None = None
        self.gp_fc2: nn.Linear | None = None
        if (H, W) != (h, w):
            n = in_channels * self.h_parts * self.w_parts
            hidden = max(1, n // fc1_fc2_reduction)
            self.gp_pool = nn.AvgPool2d((h, w))
            self.gp_bn = nn.BatchNorm2d(in_channels)
            self.gp_fc1 = nn.Linear(n, hidden)
            self.gp_act = nn.ReLU()
            self.gp_fc2 = nn.Linear(hidden, n)

        self.fc3 = nn.Conv2d(in_channels * h * w, out_channels * h * w, 1, groups=fc3_groups, bias=False)
        self.fc3_bn: nn.BatchNorm1d | None = nn.BatchNorm1d(out_channels * h * w)
        self.local = nn.ModuleList(ConvBN(in_channels, out_channels, k, 1, k // 2, 1, fc3_groups)
                                   for k in reparam_conv_k)
        if deploy:
            self.reparameterize()

    def forward(self, x: Tensor) -> Tensor:
        C, O, h, w, hp, wp = self.C, self.O, self.h, self.w, self.h_parts, self.w_parts
        if self.gp_fc1 is not None:
            v = self.gp_pool(x)
            if self.gp_bn is not None:
                v = self.gp_bn(v)
            v = self.gp_fc2(self.gp_act(self.gp_fc1(v.reshape(-1, C * hp * wp))))
            x = x.reshape(-1, C, hp, h, wp, w) + v.reshape(-1, C, hp, 1, wp, 1)
        else:
            x = x.reshape(-1, C, hp, h, wp, w)
        parts = x.permute(0, 2, 4, 1, 3, 5)  # N, hp, wp, C, h, w
        y = self.fc3(parts.reshape(-1, C * h * w, 1, 1)).reshape(-1, O * h * w)
        if self.fc3_bn is not None:
            y = self.fc3_bn(y)
        y = y.reshape(-1, hp, wp, O, h, w)
        if len(self.local) > 0:
            local_in = parts.reshape(-1, C, h, w)
            z = self.local[0](local_in)
            for branch in self.local[1:]:
                z = z + branch(local_in)
            y = y + z.reshape(-1, hp, wp, O, h, w)
        return y.permute(0, 3, 1, 4, 2, 5).reshape(-1, O, self.H, self.W)

    def _fc3_kernel(self) -> LinearKernel:
        """fc3 (+ BN1d) as the block-diagonal blocks stacked: weight (O*h*w, C*h*w/groups)."""
        wt = self.fc3.weight.detach().double()[:, :, 0, 0]
        b = torch.zeros(wt.shape[0], dtype=wt.dtype, device=wt.device)
        if self.fc3_bn is not None:
            scale, shift = bn_module_scale_shift(self.fc3_bn, torch.float64)
            scale, shift = scale.to(wt.device), shift.to(wt.device)
            wt, b = wt * scale[:, None], b * scale + shift
        return LinearKernel(wt, b)

    def _reparameterize(self) -> None:
        ref = self.fc3.weight
        fc = self._fc3_kernel()
        wt, b = fc.weight.clone(), fc.bias.clone()
        g = self.fc3_groups
        og, cg = self.O // g, self.C // g
        rows = og * self.h * self.w
        for branch in self.local:
            k = fold_conv_bn(branch.conv, branch.bn)
            for j in range(g):  # one FC per group: the grouped conv is block-diagonal like fc3
                sub = ConvKernel(k.weight[j * og:(j + 1) * og], k.bias[j * og:(j + 1) * og],
                                 replace(k.geom, groups=1))
                lin = conv_to_fc(sub, (cg, self.h, self.w))
                wt[j * rows:(j + 1) * rows] += lin.weight
                b[j * rows:(j + 1) * rows] += lin.bias
        fc3 = nn.Conv2d(self.fc3.in_channels, self.fc3.out_channels, 1, groups=g, bias=True)
        fc3 = fc3.to(device=ref.device, dtype=ref.dtype)
        fc3.weight.copy_(wt[:, :, None, None].to(ref.dtype))
        fc3.bias.copy_(b.to(ref.dtype))
        self.fc3 = fc3
        self.fc3_bn = None
        self.local = nn.ModuleList()

        if self.gp_bn is not None:
            scale, shift = bn_module_scale_shift(self.gp_bn, torch.float64)
            reps = self.h_parts * self.w_parts  # v is flattened as (C, hp, wp)
            fc1 = self.gp_fc1
            lin = LinearKernel.of(fc1).double()
            dev = lin.weight.device
            lin = affine_then_linear(scale.repeat_interleave(reps).to(dev), shift.repeat_interleave(reps).to(dev),
                                     lin)
            self.gp_fc1 = lin.to_module(dtype=fc1.weight.dtype, device=fc1.weight.device)
            self.gp_bn = None


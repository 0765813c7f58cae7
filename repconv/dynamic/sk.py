"""Selective Kernel convolution (Li et al., arXiv 1903.06586).

Split: M grouped conv-BN-ReLU branches with growing receptive fields (the paper replaces the 5x5
branch by a 3x3 with dilation 2). Fuse: U = sum of branches, s = GAP(U), z = ReLU(BN(FC(s))) with
d = max(C/r, L). Select: per branch a FC, softmax across branches per channel, V = sum a_m * U_m.

Deploy: fold every conv-BN (the branch convs and the FC's BN); selection stays dynamic. The M
branch FCs are one 1x1 conv producing M*C logits (same math, one node).
"""

from __future__ import annotations

from torch import Tensor, nn

from ._common import conv_bn, fold_conv_bns, refuse

__all__ = ["SKConv"]


class SKConv(nn.Module):
    """SK conv (arXiv 1903.06586). Paper defaults (SKNet-50): ``M=2`` branches (3x3, 3x3 dilation 2),
    ``groups=32``, ``r=16``, ``L=32``."""

    def __init__(self, channels: int, stride: int = 1, M: int = 2, groups: int = 32,  # noqa: N803
                 r: int = 16, L: int = 32) -> None:  # noqa: N803
        super().__init__()
        if channels % groups:
            raise refuse(self, f"channels={channels} not divisible by groups={groups}")
        self.channels, self.M = channels, M
        d = max(channels // r, L)
        self.branches = nn.ModuleList(
            conv_bn(channels, channels, 3, stride, dilation=1 + m, groups=groups, act=nn.ReLU()) for m in range(M))
        self.fc = conv_bn(channels, d, 1, act=nn.ReLU())
        self.fcs = nn.Conv2d(d, M * channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        feats = [b(x) for b in self.branches]
        u = feats[0]
        for f in feats[1:]:
            u = u + f
        z = self.fc(u.mean(dim=(2, 3), keepdim=True))
        a = self.fcs(z).reshape(-1, self.M, self.channels, 1, 1).softmax(dim=1)
        out = feats[0] * a[:, 0]
        for m in range(1, self.M):
            out = out + feats[m] * a[:, m]
        return out

    def to_deploy(self, example_inputs: tuple[Tensor, ...] | None = None) -> nn.Module:
        """Every conv-BN folded (through ``repconv.fuse`` when present and ``example_inputs`` given)."""
        return fold_conv_bns(self, example_inputs)

"""ULSAM: ultra-lightweight subspace attention (Saini et al., arXiv 2006.15102).

The channels are split into g subspaces; each learns one spatial attention map:
dw = ReLU(BN(DW1x1(F_n))), m = MaxPool3x3(dw), A_n = softmax_HW(ReLU(BN(PW(m)))) (PW: nin -> 1),
out_n = F_n + A_n * F_n; outputs concatenated. (The public code max-pools the *input* instead of
the depth-wise output, which makes the DW layer dead; this follows the paper's equations.)

:class:`ULSAM` keeps one small module per subspace (g times 6 ops). :class:`ULSAMDeploy` runs all
subspaces at once: the g depth-wise 1x1 convs are one C-channel depth-wise conv, the g PW convs one
grouped 1x1 conv (C -> g, g groups), every BN folded; one softmax over (N, g, H*W).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import conv_bn, fold_conv_bn, refuse

__all__ = ["ULSAM", "ULSAMDeploy", "SubSpace"]


class SubSpace(nn.Module):
    """One ULSAM subspace of ``nin`` channels."""

    def __init__(self, nin: int) -> None:
        super().__init__()
        self.dw = conv_bn(nin, nin, 1, groups=nin, act=nn.ReLU())
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.pw = conv_bn(nin, 1, 1, act=nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        a = self.pw(self.pool(self.dw(x)))
        n, _, h, w = a.shape
        a = torch.softmax(a.reshape(n, 1, h * w), dim=2).reshape(n, 1, h, w)
        return x + a * x


class ULSAM(nn.Module):
    """ULSAM (arXiv 2006.15102). Paper default: ``num_subspaces=4`` (g; the paper studies 1-16),
    inserted into MobileNet-V1/V2 blocks."""

    def __init__(self, channels: int, num_subspaces: int = 4) -> None:
        super().__init__()
        if channels % num_subspaces:
            raise refuse(self, f"channels={channels} not divisible by num_subspaces={num_subspaces}")
        self.channels, self.num_subspaces = channels, num_subspaces
        self.subspaces = nn.ModuleList(SubSpace(channels // num_subspaces) for _ in range(num_subspaces))

    def forward(self, x: Tensor) -> Tensor:
        nin = self.channels // self.num_subspaces  # slices, not chunk(): fx-traceable
        return torch.cat([s(x[:, i * nin:(i + 1) * nin]) for i, s in enumerate(self.subspaces)], dim=1)

    def to_deploy(self) -> ULSAMDeploy:
        return ULSAMDeploy.from_train(self)


class ULSAMDeploy(nn.Module):
    """All subspaces at once: DW 1x1 (C groups) -> ReLU -> MaxPool -> 1x1 conv (C -> g, g groups) ->
    ReLU -> softmax over H*W per subspace -> x + A * x, BNs folded."""

    def __init__(self, channels: int, num_subspaces: int) -> None:
        super().__init__()
        self.channels, self.num_subspaces = channels, num_subspaces
        self.dw = nn.Conv2d(channels, channels, 1, groups=channels)
        self.act1 = nn.ReLU()
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.pw = nn.Conv2d(channels, num_subspaces, 1, groups=num_subspaces)
        self.act2 = nn.ReLU()

    @staticmethod
    def from_train(m: ULSAM) -> ULSAMDeploy:
        d = ULSAMDeploy(m.channels, m.num_subspaces)
        dws = [fold_conv_bn(s.dw.conv, s.dw.bn) for s in m.subspaces]
        pws = [fold_conv_bn(s.pw.conv, s.pw.bn) for s in m.subspaces]
        d = d.to(device=dws[0].weight.device, dtype=dws[0].weight.dtype)
        with torch.no_grad():
            d.dw.weight.copy_(torch.cat([c.weight for c in dws]))
            d.dw.bias.copy_(torch.cat([c.bias for c in dws]))
            d.pw.weight.copy_(torch.cat([c.weight for c in pws]))
            d.pw.bias.copy_(torch.cat([c.bias for c in pws]))
        return d.eval()

    def forward(self, x: Tensor) -> Tensor:
        a = self.act2(self.pw(self.pool(self.act1(self.dw(x)))))  # (N, g, H, W)
        n, g, h, w = a.shape
        a = torch.softmax(a.reshape(n, g, h * w), dim=2).reshape(n, g, 1, h, w)
        xs = x.reshape(n, g, self.channels // g, h, w)
        return (xs + a * xs).reshape(n, self.channels, h, w)

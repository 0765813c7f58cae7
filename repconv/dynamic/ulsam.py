"""ULSAM: ultra-lightweight subspace attention (Saini et al., arXiv 2006.15102).

The channels are split into g subspaces; each learns one spatial attention map:
dw = ReLU(BN(DW1x1(F_n))), m = MaxPool3x3(dw), A_n = softmax_HW(ReLU(BN(PW(m)))) (PW: nin -> 1),
out_n = F_n + A_n * F_n; outputs concatenated. (The public code max-pools the *input* instead of
the depth-wise output, which makes the DW layer dead; this follows the paper's equations.)

:class:`ULSAM` keeps one small module per subspace (g times 6 ops). :class:`ULSAMDeploy` runs all
subspaces at once: the g depth-wise 1x1 convs are one per-channel affine, the g PW convs one batched
matmul (C -> g), every BN folded; one softmax over (N, g, H*W).
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

from ._common import conv_bn, fold_conv_bn, grouped_pointwise, max_pool2d_same, refuse

torch.fx.wrap("max_pool2d_same")
torch.fx.wrap("grouped_pointwise")

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
    """All subspaces at once, BNs folded: per-channel affine (the DW 1x1 convs; ONNX: one depth-wise
    1x1 Conv, which ORT fuses with the ReLU) -> ReLU -> 3x3 max
    (stride 1) -> per-subspace weighted channel sum (the PW convs: one grouped 1x1, a batched matmul
    in eager) -> ReLU -> softmax over H*W per subspace -> x + A * x.

    The 1x1 convs are not Conv2d modules because PyTorch runs grouped 1x1 convs at batch < 16 with
    one thread through a slow per-group loop; ONNX still gets one grouped 1x1 ``Conv``."""

    def __init__(self, channels: int, num_subspaces: int) -> None:
        super().__init__()
        self.channels, self.num_subspaces = channels, num_subspaces
        nin = channels // num_subspaces
        self.dw_weight = nn.Parameter(torch.ones(channels, 1))
        self.dw_bias = nn.Parameter(torch.zeros(channels))
        self.act1 = nn.ReLU()
        self.pw_weight = nn.Parameter(torch.zeros(num_subspaces, nin))
        self.pw_bias = nn.Parameter(torch.zeros(num_subspaces))
        self.act2 = nn.ReLU()

    @staticmethod
    def from_train(m: ULSAM) -> ULSAMDeploy:
        d = ULSAMDeploy(m.channels, m.num_subspaces)
        dws = [fold_conv_bn(s.dw.conv, s.dw.bn) for s in m.subspaces]
        pws = [fold_conv_bn(s.pw.conv, s.pw.bn) for s in m.subspaces]
        d = d.to(device=dws[0].weight.device, dtype=dws[0].weight.dtype)
        with torch.no_grad():
            d.dw_weight.copy_(torch.cat([c.weight.reshape(-1, 1) for c in dws]))
            d.dw_bias.copy_(torch.cat([c.bias for c in dws]))
            d.pw_weight.copy_(torch.cat([c.weight.reshape(1, -1) for c in pws]))
            d.pw_bias.copy_(torch.cat([c.bias for c in pws]))
        return d.eval()

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        g = self.num_subspaces
        pooled = max_pool2d_same(self.act1(grouped_pointwise(x, self.dw_weight, self.dw_bias, c)), 3)
        a = self.act2(grouped_pointwise(pooled, self.pw_weight, self.pw_bias, g))  # (N, g, H, W)
        a = torch.softmax(a.reshape(n, g, h * w), dim=2).reshape(n, g, 1, h, w)
        xs = x.reshape(n, g, c // g, h, w)
        return (xs + a * xs).reshape(n, c, h, w)

"""CondConv: conditionally parameterized convolution (Yang et al., arXiv 1904.04971).

Training-time :class:`CondConv2d` follows the paper and its naive public code: per sample,
routing r = sigmoid(FC(GAP(x))) over E experts, kernel W = sum_e r_e W_e, then an ordinary conv.
Its forward is that per-sample loop (the reference). :meth:`CondConv2d.to_deploy` returns
:class:`CondConv2dDeploy`, which mixes all samples' kernels with ONE matmul (N, E) x (E, O*I*k*k)
and runs ONE convolution with the batch folded into the groups (see
:func:`repconv.dynamic._common.per_sample_conv2d`; ONNX with a dynamic batch gets im2col + MatMul).
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import Pair, pair, per_sample_conv2d, refuse

# Imported by name: register here too so fx records it as one node (fx.wrap patches per module).
torch.fx.wrap("per_sample_conv2d")

__all__ = ["CondConv2d", "CondConv2dDeploy"]


class CondConv2d(nn.Module):
    """CondConv layer (arXiv 1904.04971).

    Paper defaults: ``num_experts=8`` (the paper studies 4-32 experts; 8 in CondConv-MobileNet /
    EfficientNet), routing = global average pool -> fully connected -> **sigmoid** (not softmax: the
    experts are not competing), kernels mixed before convolving (equivalent to a mixture of E convs
    at 1/E of the cost). ``routing_dropout`` is dropout on the routing input (the naive public code
    uses 0.2); it vanishes in eval / deploy.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Pair = 3, stride: int | Pair = 1,
                 padding: int | Pair | None = None, dilation: int | Pair = 1, groups: int = 1, bias: bool = False,
                 num_experts: int = 8, routing_dropout: float = 0.0) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise refuse(self, f"channels ({in_channels}, {out_channels}) not divisible by groups={groups}")
        k, d = pair(kernel_size), pair(dilation)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = k, pair(stride), d
        self.padding = pair(padding) if padding is not None else (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, *k))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.dropout = nn.Dropout(routing_dropout)
        self.routing = nn.Linear(in_channels, num_experts)
        for e in range(num_experts):  # each expert initialised like an ordinary conv
            nn.init.kaiming_uniform_(self.weight[e], a=math.sqrt(5))

    def routing_weights(self, x: Tensor) -> Tensor:
        """(N, E) sigmoid routing weights."""
        return torch.sigmoid(self.routing(self.dropout(x.mean(dim=(2, 3)))))

    def forward(self, x: Tensor) -> Tensor:
        # The paper's naive form: route, mix and convolve one sample at a time.
        outs = []
        for i in range(x.shape[0]):
            xi = x[i:i + 1]
            r = torch.sigmoid(self.routing(self.dropout(xi.mean(dim=(2, 3))))).reshape(-1)
            kernel = (r[:, None, None, None, None] * self.weight).sum(0)
            outs.append(F.conv2d(xi, kernel, self.bias, self.stride, self.padding, self.dilation, self.groups))
        return torch.cat(outs, 0)

    def to_deploy(self) -> CondConv2dDeploy:
        return CondConv2dDeploy.from_train(self)


class CondConv2dDeploy(nn.Module):
    """Inference CondConv: ``r = sigmoid(FC(GAP x))``; kernels = r @ experts (one matmul for the whole
    batch); one per-sample conv for the whole batch. fx-traceable, ONNX with a dynamic batch axis."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Pair, stride: Pair, padding: Pair,
                 dilation: Pair, groups: int, num_experts: int, bias: bool) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.routing = nn.Linear(in_channels, num_experts)
        self.experts = nn.Parameter(torch.zeros(num_experts, out_channels * (in_channels // groups)
                                                * kernel_size[0] * kernel_size[1]))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @staticmethod
    def from_train(m: CondConv2d) -> CondConv2dDeploy:
        d = CondConv2dDeploy(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                             m.groups, m.num_experts, m.bias is not None)
        d = d.to(device=m.weight.device, dtype=m.weight.dtype)
        with torch.no_grad():
            d.routing.load_state_dict(m.routing.state_dict())
            d.experts.copy_(m.weight.reshape(m.num_experts, -1))
            if m.bias is not None:
                d.bias.copy_(m.bias)
        return d.eval()

    def forward(self, x: Tensor) -> Tensor:
        r = torch.sigmoid(self.routing(x.mean(dim=(2, 3))))  # (N, E)
        kernels = torch.matmul(r, self.experts).reshape(
            -1, self.out_channels, self.in_channels // self.groups, self.kernel_size[0], self.kernel_size[1])
        return per_sample_conv2d(x, kernels, self.bias, self.stride, self.padding, self.dilation, self.groups)

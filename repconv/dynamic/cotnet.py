"""CoTNet: Contextual Transformer networks (Li et al., arXiv 2107.12292).

The CoT block replaces a bottleneck's 3x3 conv (input X, C channels):

* static context   K1 = ReLU(BN(GroupConv_kxk(X)))            (keys; ``key_groups`` groups)
* attention        A  = Conv1x1(ReLU(BN(Conv1x1([X, K1]))))   (N, G*k*k, H, W): per-pixel k x k
                   kernels, one per head, each head shared by ``share_planes`` channels
* values           V  = BN(Conv1x1(X))
* dynamic context  K2 = SiLU(BN(aggregate(V, A)))              aggregate = involution (per head)
* fusion (SK-style attention over {K2, K1}):  g = GAP(K2 + K1);
  [a2, a1] = softmax over the pair of Conv1x1(ReLU(BN(Conv1x1(g)))); Y = a2*K2 + a1*K1

The aggregation is exactly ``repconv.ops.involution`` (x = V, kernel = A, groups = heads, channel
c in head c // share_planes). :class:`CoTAttention` can aggregate with that op (default, fast,
differentiable) or with the paper's unfold formulation (``aggregation="unfold"``: the independent
reference used by the tests). :class:`CoTAttentionDeploy` folds every conv-BN, also the BN after
the aggregation: its scale commutes with the per-channel aggregation and goes into the value conv,
its shift becomes a bias add.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repconv.algebra import bn_module_scale_shift
from repconv.ops.involution import involution

from ._common import conv_bn, fold_conv_bn, refuse

__all__ = ["CoTAttention", "CoTAttentionDeploy", "CoTBottleneck", "CoTNet", "cotnet26", "unfold_aggregate"]


def unfold_aggregate(v: Tensor, kernel: Tensor, kernel_size: int, heads: int) -> Tensor:
    """The paper's local aggregation via unfold: out[n,c] = sum_t kernel[n, head(c), t] * patch_t(v)[n,c]."""
    n, c, h, w = v.shape
    kk = kernel_size * kernel_size
    cols = F.unfold(v, kernel_size, padding=kernel_size // 2).reshape(n, heads, c // heads, kk, h, w)
    return (cols * kernel.reshape(n, heads, 1, kk, h, w)).sum(dim=3).reshape(n, c, h, w)


class CoTAttention(nn.Module):
    """CoT block (arXiv 2107.12292), stride 1 (CoTNet downsamples with an avg-pool before it).

    Defaults follow the official CoTNet-50: ``kernel_size=3``, keys by a 3x3 conv with
    ``key_groups=4``, ``share_planes=8`` channels per attention head, attention-embedding reduction
    ``factor=2``, fusion attention width ``max(2*C/4, 32)``, SiLU after the aggregation. (The official
    code normalises A with a GroupNorm; the paper's two 1x1 convs are used here, which keeps A
    foldable - a GroupNorm would stay as an ONNX GroupNormalization either way.)
    """

    radix = 2  # fused contexts: dynamic (aggregated values) and static (keys)

    def __init__(self, dim: int, kernel_size: int = 3, key_groups: int = 4, share_planes: int = 8,
                 factor: int = 2, aggregation: str = "op") -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise refuse(self, f"kernel_size must be odd, got {kernel_size}")
        if dim % share_planes or dim % key_groups:
            raise refuse(self, f"dim={dim} must be divisible by share_planes={share_planes} and "
                               f"key_groups={key_groups}")
        if aggregation not in ("op", "unfold"):
            raise ValueError(f"CoTAttention: aggregation must be 'op' or 'unfold', got {aggregation!r}")
        self.dim, self.kernel_size, self.heads = dim, kernel_size, dim // share_planes
        self.aggregation = aggregation
        self.key_embed = conv_bn(dim, dim, kernel_size, groups=key_groups, act=nn.ReLU())
        self.embed = nn.Sequential(conv_bn(2 * dim, dim // factor, 1, act=nn.ReLU()),
                                   nn.Conv2d(dim // factor, kernel_size * kernel_size * self.heads, 1))
        self.value = conv_bn(dim, dim, 1)
        self.bn = nn.BatchNorm2d(dim)
        self.act = nn.SiLU()
        attn = max(dim * self.radix // 4, 32)
        self.se = nn.Sequential(conv_bn(dim, attn, 1, act=nn.ReLU()), nn.Conv2d(attn, self.radix * dim, 1))

    def aggregate(self, v: Tensor, kernel: Tensor) -> Tensor:
        if self.aggregation == "unfold":
            return unfold_aggregate(v, kernel, self.kernel_size, self.heads)
        return involution(v, kernel, self.kernel_size, 1, 1, self.heads)

    def forward(self, x: Tensor) -> Tensor:
        k = self.key_embed(x)
        a = self.embed(torch.cat([x, k], dim=1))
        y = self.act(self.bn(self.aggregate(self.value(x), a)))
        att = self.se((y + k).mean(dim=(2, 3), keepdim=True))
        att = att.reshape(-1, self.dim, self.radix, 1, 1).softmax(dim=2)
        return y * att[:, :, 0] + k * att[:, :, 1]

    def to_deploy(self) -> CoTAttentionDeploy:
        return CoTAttentionDeploy.from_train(self)


class CoTAttentionDeploy(nn.Module):
    """Inference CoT block: conv-BNs folded, post-aggregation BN folded into the value conv (scale)
    and a bias (shift); aggregation through ``torch.ops.repconv.involution`` (ONNX: one
    ``ai.repconv::Involution`` node via ``repconv.export_onnx``)."""

    radix = 2

    def __init__(self, m: CoTAttention) -> None:
        super().__init__()
        self.dim, self.kernel_size, self.heads = m.dim, m.kernel_size, m.heads
        self.key_conv = fold_conv_bn(m.key_embed.conv, m.key_embed.bn)
        self.key_act = nn.ReLU()
        self.embed1 = fold_conv_bn(m.embed[0].conv, m.embed[0].bn)
        self.embed_act = nn.ReLU()
        self.embed2 = copy.deepcopy(m.embed[1])
        value = fold_conv_bn(m.value.conv, m.value.bn)
        scale, shift = bn_module_scale_shift(m.bn)
        with torch.no_grad():  # BN(agg(v)) = agg(scale * v) + shift: agg is linear per channel
            value.weight.copy_(value.weight.double().mul(scale.reshape(-1, 1, 1, 1)).to(value.weight.dtype))
            value.bias.copy_(value.bias.double().mul(scale).to(value.bias.dtype))
        self.value = value
        self.agg_bias = nn.Parameter(shift.to(value.weight.dtype).reshape(1, -1, 1, 1).clone())
        self.act = nn.SiLU()
        self.se1 = fold_conv_bn(m.se[0].conv, m.se[0].bn)
        self.se_act = nn.ReLU()
        self.se2 = copy.deepcopy(m.se[1])

    @staticmethod
    def from_train(m: CoTAttention) -> CoTAttentionDeploy:
        return CoTAttentionDeploy(m).eval()

    def forward(self, x: Tensor) -> Tensor:
        k = self.key_act(self.key_conv(x))
        a = self.embed2(self.embed_act(self.embed1(torch.cat([x, k], dim=1))))
        y = self.act(involution(self.value(x), a, self.kernel_size, 1, 1, self.heads) + self.agg_bias)
        att = self.se2(self.se_act(self.se1((y + k).mean(dim=(2, 3), keepdim=True))))
        att = att.reshape(-1, self.dim, self.radix, 1, 1).softmax(dim=2)
        return y * att[:, :, 0] + k * att[:, :, 1]


class CoTBottleneck(nn.Module):
    """ResNet bottleneck with the 3x3 conv replaced by a CoT block (official CoTNet layout):
    1x1-BN-ReLU, [3x3 avg-pool stride 2 when downsampling], CoT, BN-ReLU, 1x1-BN, + shortcut, ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, aggregation: str = "op") -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = conv_bn(in_channels, width, 1, act=nn.ReLU())
        self.avd = nn.AvgPool2d(3, stride, 1) if stride > 1 else nn.Identity()
        self.cot = CoTAttention(width, aggregation=aggregation)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU()
        self.conv3 = conv_bn(width, out, 1)
        self.shortcut = conv_bn(in_channels, out, 1, stride) if stride != 1 or in_channels != out else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.act2(self.bn2(self.cot(self.avd(self.conv1(x)))))
        return self.act(self.conv3(y) + self.shortcut(x))


class CoTNet(nn.Module):
    """CoTNet backbone: ResNet stem (7x7/2 conv-BN-ReLU, 3x3/2 max-pool), four stages of
    :class:`CoTBottleneck` (widths w, 2w, 4w, 8w; stride 2 from stage 2 on), GAP, FC."""

    def __init__(self, layers: tuple[int, int, int, int] = (2, 2, 2, 2), num_classes: int = 1000,
                 base_width: int = 64, aggregation: str = "op") -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, base_width, 7, 2, act=nn.ReLU()), nn.MaxPool2d(3, 2, 1))
        stages, in_ch = [], base_width
        for i, n in enumerate(layers):
            width = base_width * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(CoTBottleneck(in_ch, width, 2 if (j == 0 and i > 0) else 1, aggregation))
                in_ch = width * CoTBottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.stages(self.stem(x)).mean(dim=(2, 3)))

    def to_deploy(self, example_inputs: tuple[Tensor, ...] | None = None) -> nn.Module:
        """CoT blocks replaced by their deploy form, then every remaining conv-BN folded."""
        from . import to_deploy

        return to_deploy(self, example_inputs)


def cotnet26(num_classes: int = 1000, base_width: int = 64, aggregation: str = "op") -> CoTNet:
    """CoTNet-26: ResNet-26 (bottleneck blocks 2-2-2-2) with every 3x3 conv a CoT block."""
    return CoTNet((2, 2, 2, 2), num_classes, base_width, aggregation)

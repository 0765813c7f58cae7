# ruff: noqa: UP008, UP032, B905  -- written in the official repositories' (Python 2 era) style on purpose
"""timm-style building blocks (``ConvNormAct`` with ``conv``/``bn``, a ``BatchNormAct2d`` that subclasses
BatchNorm2d and calls ``F.batch_norm`` itself, byobnet's ``RepVggBlock`` with ``conv_kxk``/``conv_1x1``/
``identity``/``attn``/``drop_path``/``act``). Re-implemented for tests.

Because ``BatchNormAct2d`` is defined outside ``torch.nn``, fx traces *into* it: the graph shows a
functional ``batch_norm`` whose statistics are ``get_attr`` nodes rather than a BatchNorm2d module.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, drop_layer=None):
        super(BatchNormAct2d, self).__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                                             track_running_stats=track_running_stats)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=True) if apply_act else nn.Identity()

    def forward(self, x):
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, exponential_average_factor, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


def get_padding(kernel_size, stride=1, dilation=1):
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


class ConvNormAct(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, apply_act=True, act_layer=nn.ReLU):
        super(ConvNormAct, self).__init__()
        if padding is None:
            padding = get_padding(kernel_size, 1, dilation)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=bias)
        self.bn = BatchNormAct2d(out_channels, apply_act=apply_act, act_layer=act_layer)

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        return x


class RepVggBlock(nn.Module):
    def __init__(self, in_chs, out_chs, kernel_size=3, stride=1, dilation=(1, 1), group_size=None):
        super(RepVggBlock, self).__init__()
        groups = 1 if not group_size else in_chs // group_size
        use_ident = in_chs == out_chs and stride == 1 and dilation[0] == dilation[1]
        self.identity = BatchNormAct2d(out_chs, apply_act=False) if use_ident else None
        self.conv_kxk = ConvNormAct(in_chs, out_chs, kernel_size, stride=stride, dilation=dilation[0],
                                    groups=groups, apply_act=False)
        self.conv_1x1 = ConvNormAct(in_chs, out_chs, 1, stride=stride, groups=groups, apply_act=False)
        self.attn = nn.Identity()
        self.drop_path = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.identity is None:
            x = self.conv_1x1(x) + self.conv_kxk(x)
        else:
            identity = self.identity(x)
            x = self.conv_1x1(x) + self.conv_kxk(x)
            x = self.drop_path(x)
            x = x + identity
        x = self.attn(x)
        return self.act(x)


class ByobLikeNet(nn.Module):
    """stem ConvNormAct + three RepVggBlocks (strided, identity, grouped) + head."""

    def __init__(self, num_classes=10):
        super(ByobLikeNet, self).__init__()
        self.stem = ConvNormAct(3, 16, 3, stride=2)
        self.stages = nn.Sequential(
            RepVggBlock(16, 24, stride=2),
            RepVggBlock(24, 24),
            RepVggBlock(24, 24, group_size=8),
        )
        self.head = nn.Linear(24, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(x.mean((2, 3)), 1))

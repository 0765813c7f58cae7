# ruff: noqa: UP008, UP032, B905  -- written in the official repositories' (Python 2 era) style on purpose
"""RepVGG written the way the official repository lays it out (``conv_bn`` Sequential with ``conv``/``bn``,
``rbr_dense`` / ``rbr_1x1`` / ``rbr_identity``), re-implemented from the paper (arXiv 2101.03697)."""

import torch.nn as nn


def conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=1):
    result = nn.Sequential()
    result.add_module("conv", nn.Conv2d(in_channels=in_channels, out_channels=out_channels,
                                        kernel_size=kernel_size, stride=stride, padding=padding,
                                        groups=groups, bias=False))
    result.add_module("bn", nn.BatchNorm2d(num_features=out_channels))
    return result


class RepVGGBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, groups=1):
        super(RepVGGBlock, self).__init__()
        assert kernel_size == 3 and padding == 1
        self.groups = groups
        self.in_channels = in_channels
        self.nonlinearity = nn.ReLU()
        if out_channels == in_channels and stride == 1:
            self.rbr_identity = nn.BatchNorm2d(num_features=in_channels)
        else:
            self.rbr_identity = None
        self.rbr_dense = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=groups)
        self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, stride, padding - kernel_size // 2, groups=groups)

    def forward(self, inputs):
        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)
        return self.nonlinearity(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)


class RepVGG(nn.Module):
    """A short RepVGG: stem + stages built with ``_make_stage``, GAP and a linear head."""

    def __init__(self, num_blocks=(1, 2, 1), widths=(8, 16, 24), num_classes=10, override_groups_map=None):
        super(RepVGG, self).__init__()
        self.override_groups_map = override_groups_map or dict()
        self.in_planes = widths[0]
        self.stage0 = RepVGGBlock(3, self.in_planes, kernel_size=3, stride=2, padding=1)
        self.cur_layer_idx = 1
        stages = []
        for planes, n in zip(widths, num_blocks):
            stages.append(self._make_stage(planes, n, stride=2))
        self.stages = nn.Sequential(*stages)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(widths[-1], num_classes)

    def _make_stage(self, planes, num_blocks, stride):
        strides = [stride] + [1] * (num_blocks - 1)
        blocks = []
        for s in strides:
            g = self.override_groups_map.get(self.cur_layer_idx, 1)
            blocks.append(RepVGGBlock(self.in_planes, planes, 3, s, 1, groups=g))
            self.in_planes = planes
            self.cur_layer_idx += 1
        return nn.Sequential(*blocks)

    def forward(self, x):
        out = self.stage0(x)
        out = self.stages(out)
        out = self.gap(out)
        out = out.view(out.size(0), -1)
        return self.linear(out)

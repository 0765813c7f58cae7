# ruff: noqa: UP008, UP032, B905  -- written in the official repositories' (Python 2 era) style on purpose
"""RepMLP (arXiv 2105.01883) in the layout of the original release: ``fc1_fc2`` global perceptron
behind ``avg`` (AvgPool + BN), grouped 1x1 ``fc3`` + ``fc3_bn`` (BatchNorm1d), and local conv
branches registered as ``repconv{k}`` attributes and accumulated with ``+=``. Re-implemented."""

import torch.nn as nn


def conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=1):
    result = nn.Sequential()
    result.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                        groups=groups, bias=False))
    result.add_module("bn", nn.BatchNorm2d(out_channels))
    return result


class RepMLP(nn.Module):
    def __init__(self, in_channels, out_channels, H, W, h, w, reparam_conv_k=None, fc1_fc2_reduction=1,
                 fc3_groups=1):
        super(RepMLP, self).__init__()
        self.C = in_channels
        self.O = out_channels
        self.fc3_groups = fc3_groups
        self.H, self.W, self.h, self.w = H, W, h, w
        self.h_parts = self.H // self.h
        self.w_parts = self.W // self.w
        assert self.H % self.h == 0 and self.W % self.w == 0
        self.target_shape = (-1, self.O, self.H, self.W)
        self.need_global_perceptron = (H != h) or (W != w)
        if self.need_global_perceptron:
            internal_neurons = int(self.C * self.h_parts * self.w_parts // fc1_fc2_reduction)
            self.fc1_fc2 = nn.Sequential()
            self.fc1_fc2.add_module("fc1", nn.Linear(self.C * self.h_parts * self.w_parts, internal_neurons))
            self.fc1_fc2.add_module("relu", nn.ReLU())
            self.fc1_fc2.add_module("fc2", nn.Linear(internal_neurons, self.C * self.h_parts * self.w_parts))
            self.avg = nn.Sequential()
            self.avg.add_module("avg", nn.AvgPool2d(kernel_size=(self.h, self.w)))
            self.avg.add_module("bn", nn.BatchNorm2d(num_features=self.C))
        self.fc3 = nn.Conv2d(self.C * self.h * self.w, self.O * self.h * self.w, 1, 1, 0, bias=False,
                             groups=fc3_groups)
        self.fc3_bn = nn.BatchNorm1d(self.O * self.h * self.w)
        self.reparam_conv_k = reparam_conv_k
        if reparam_conv_k is not None:
            for k in reparam_conv_k:
                conv_branch = conv_bn(self.C, self.O, kernel_size=k, stride=1, padding=k // 2, groups=fc3_groups)
                self.__setattr__("repconv{}".format(k), conv_branch)

    def forward(self, inputs):
        if self.need_global_perceptron:
            v = self.avg(inputs)
            v = v.reshape(-1, self.C * self.h_parts * self.w_parts)
            v = self.fc1_fc2(v)
            v = v.reshape(-1, self.C, self.h_parts, 1, self.w_parts, 1)
            inputs = inputs.reshape(-1, self.C, self.h_parts, self.h, self.w_parts, self.w)
            inputs = inputs + v
        else:
            inputs = inputs.view(-1, self.C, self.h_parts, self.h, self.w_parts, self.w)
        partitions = inputs.permute(0, 2, 4, 1, 3, 5)

        fc3_inputs = partitions.reshape(-1, self.C * self.h * self.w, 1, 1)
        fc3_out = self.fc3(fc3_inputs)
        fc3_out = fc3_out.reshape(-1, self.O * self.h * self.w)
        fc3_out = self.fc3_bn(fc3_out)
        fc3_out = fc3_out.reshape(-1, self.h_parts, self.w_parts, self.O, self.h, self.w)

        if self.reparam_conv_k is not None:
            conv_inputs = partitions.reshape(-1, self.C, self.h, self.w)
            conv_out = 0
            for k in self.reparam_conv_k:
                conv_branch = self.__getattr__("repconv{}".format(k))
                conv_out += conv_branch(conv_inputs)
            conv_out = conv_out.reshape(-1, self.h_parts, self.w_parts, self.O, self.h, self.w)
            fc3_out += conv_out

        fc3_out = fc3_out.permute(0, 3, 1, 4, 2, 5)
        return fc3_out.reshape(*self.target_shape)

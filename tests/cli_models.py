"""Importable factories for CLI tests (`tests.cli_models:small_repvgg`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Branchy(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.k1 = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))
        self.ident = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.k3(x) + self.k1(x)
        if self.ident is not None:
            y = y + self.ident(x)
        return F.relu(y)


def small_repvgg() -> nn.Module:
    """Two RepVGG-style blocks with non-trivial BN statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(Branchy(3, 8, 2), Branchy(8, 8))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()

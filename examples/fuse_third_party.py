"""Fuse a model repconv has never seen: plain PyTorch code with its own class names.

Run: python examples/fuse_third_party.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from repconv import fuse_with_report
from repconv.graph import region_kind, region_result


class MyBlock(nn.Module):
    """A RepVGG/ACNet hybrid written the way a user might: branches in a ModuleList, summed with sum()."""

    def __init__(self, c: int):
        super().__init__()
        self.paths = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)),
            nn.Sequential(nn.Conv2d(c, c, (1, 3), padding=(0, 1), bias=False), nn.BatchNorm2d(c)),
            nn.Sequential(nn.Conv2d(c, c, (3, 1), padding=(1, 0), bias=False), nn.BatchNorm2d(c)),
            nn.BatchNorm2d(c),  # identity branch
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(sum(p(x) for p in self.paths))


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(), MyBlock(16), MyBlock(16),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10), nn.BatchNorm1d(10))
    for m in model.modules():  # pretend it was trained: non-trivial BN statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def main() -> None:
    model = build()
    fused, report = fuse_with_report(model, torch.randn(1, 3, 32, 32))
    for r in report.regions:
        print(f"{r.block or '(top)':>8}  {region_kind(r):<12} -> {region_result(r)}")
    print(report.verification.summary())
    print(f"parameters {report.params_before} -> {report.params_after}")


if __name__ == "__main__":
    main()

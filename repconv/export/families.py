"""Small instances of every operator family repconv exports: the runtime matrix's cases.

Used by tests/test_runtime_matrix.py and benchmarks/runtime_support.py; not a stable API. Every
factory returns a seeded eval-mode model with non-trivial BN statistics (``randomize_bn_``); the
shapes are one sample's (the batch is the caller's).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from repconv.blocks.common import randomize_bn_
from repconv.blocks.involution import Involution
from repconv.blocks.models import demo_model
from repconv.blocks.repmlp import RepMLPBlock
from repconv.dynamic import (
    ULSAM,
    CondConv2d,
    CoTAttention,
    DRConv2d,
    DynamicDWConv2d,
    PSConv2d,
    SEModule,
    SKConv,
    WeightNetConv2d,
    mixer_tiny,
)


class InvolutionNet(nn.Module):
    """Involution at stride 1 (K=7), stride 2 (K=3) and dilation 2 (K=3), between 1x1 convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.inv7 = Involution(16, 7, 1, group_channels=8)
        self.inv3s2 = Involution(16, 3, 2, group_channels=4)
        self.inv3d2 = Involution(16, 3, 1, group_channels=16, dilation=2)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inv3d2(self.inv3s2(self.inv7(self.stem(x)))))


def _with_stem(block: nn.Module, channels: int) -> nn.Module:
    """A 3 -> C conv-BN-ReLU stem, then the block (keeps every case a (N, 3, H, W) image model)."""
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), block)


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return randomize_bn_(factory()).eval()

    return make


# name -> (model factory, input shape of one sample)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "involution": (_seeded(InvolutionNet), (3, 12, 12)),
    "cot": (_seeded(lambda: _with_stem(CoTAttention(16, share_planes=8), 16)), (3, 8, 8)),
    "condconv": (_seeded(lambda: _with_stem(CondConv2d(8, 8, 3, num_experts=4), 8)), (3, 8, 8)),
    "weightnet": (_seeded(lambda: _with_stem(WeightNetConv2d(8, 8, 3), 8)), (3, 8, 8)),
    "ddw": (_seeded(lambda: _with_stem(DynamicDWConv2d(8, 3), 8)), (3, 8, 8)),
    "drconv": (_seeded(lambda: _with_stem(DRConv2d(8, 8, 3, region_num=4), 8)), (3, 8, 8)),
    "psconv": (_seeded(lambda: _with_stem(PSConv2d(16, 16, 3), 16)), (3, 8, 8)),
    "sk-se-ulsam": (_seeded(lambda: _with_stem(nn.Sequential(SKConv(32, groups=8), SEModule(32, 8), ULSAM(32)), 32)),
                    (3, 8, 8)),
    "mixer": (_seeded(lambda: mixer_tiny(num_classes=5, img_size=16, dropout=0.0)), (3, 16, 16)),
    # RepVGG, ACNet, DBB, DO-Conv, MobileOne, RepLK blocks and a Linear+BN head, all fused away
    "fused-static": (lambda: demo_model(), (3, 32, 32)),
    "repmlp": (_seeded(lambda: _with_stem(RepMLPBlock(8, 8, 8, 8, 4, 4), 8)), (3, 8, 8)),
}

# the families whose export holds ai.repconv::Involution nodes (the onnxruntime form differs)
INVOLUTION_FAMILIES = ("involution", "cot")


def calibrate(model: nn.Module, shape: tuple[int, ...], residual_gamma: float = 0.2) -> nn.Module:
    """A deep untrained ResNet-like net made numerically sane, in place, returned in eval mode.

    BN statistics come from two train-mode passes over random images; each residual branch's last
    BN (``bn3`` / ``conv3.bn``: RedNet, CoTNet) gets gamma = ``residual_gamma``, as training leaves
    it. Without that an untrained RedNet-26 / CoTNet-26 grows its activations to ~1e10, where float32
    rounding, not the export, decides every comparison."""
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
            if name.endswith(("bn3", "conv3.bn")):
                with torch.no_grad():
                    m.weight.fill_(residual_gamma)
    model.train()
    with torch.no_grad():
        for seed in range(2):
            model(torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(seed)))
    return model.eval()

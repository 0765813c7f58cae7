# ruff: noqa: UP008, UP032, B905  -- written in the official repositories' (Python 2 era) style on purpose
"""Hand-written models with no re-parameterization classes at all: plain ``nn.Sequential`` code with BN
on both sides of convs, and a conv module called twice (weight sharing)."""

import torch.nn as nn


def sequential_bn_around_convs():
    """conv3x3(p1, bias) -> BN -> conv1x1 -> BN -> ReLU -> BN -> conv3x3(p0) -> ReLU -> BN -> conv3x3(p1) -> BN.

    Foldable: the first four layers are one conv (1x1 after a conv composes exactly); the BN before the
    un-padded conv folds into it. Not foldable: the BN before the *padded* conv (the conv's zero border
    would see 0 instead of the BN shift, and a ReLU separates it from the previous conv), so the best
    result has three convs and that one BN left.
    """
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 16, 3, padding=0),
        nn.ReLU(),
        nn.BatchNorm2d(16),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
    )


class SharedConv(nn.Module):
    """One conv module applied twice, each use followed by its own BN.

    Folding BN1 into the module in place would corrupt the second use; a correct pass produces two
    distinct fused convs (or leaves the sharing alone).
    """

    def __init__(self, channels=8):
        super(SharedConv, self).__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.act(self.bn1(self.conv(x)))
        return self.bn2(self.conv(y))

"""Large-kernel re-parameterized conv: RepLKNet (Ding et al., "Scaling Up Your Kernels to 31x31",
arXiv 2203.06717) and UniRepLKNet's dilated reparam block (Ding et al., arXiv 2311.15599)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..algebra import add
from .common import ConvBN, RepBlock, kernel_to_conv

# UniRepLKNet's default (kernel, dilation) branches per large-kernel size.
_UNIREPLK_BRANCHES: dict[int, tuple[tuple[int, int], ...]] = {
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    7: ((5, 1), (3, 2), (3, 3)),
    5: ((3, 1), (3, 2)),
}


def unireplk_branches(kernel_size: int) -> tuple[tuple[int, int], ...]:
    """UniRepLKNet's parallel (kernel, dilation) branches for a large kernel of ``kernel_size``."""
    try:
        return _UNIREPLK_BRANCHES[kernel_size]
    except KeyError:
        raise ValueError(f"UniRepLKNet defines dilated branches for kernel sizes {sorted(_UNIREPLK_BRANCHES)}, "
                         f"not {kernel_size}") from None


class RepLKBlock(RepBlock):
    """Large depthwise KxK conv-BN + parallel small-kernel conv-BN (+ dilated small-kernel conv-BNs).

    RepLKNet trains a very large depthwise kernel (31, 29, 27, 13 per stage) with a parallel 5x5
    conv-BN (``small_kernel``) that eases optimisation and adds locality; UniRepLKNet replaces the
    single small kernel with several small *dilated* kernels (``dilated_branches`` as
    ``(kernel, dilation)`` pairs, see :func:`unireplk_branches` and :meth:`unireplk`), which cover
    the large footprint sparsely. Every branch is centred (padding ``d*(k-1)//2``), so each folded
    kernel -- dilated ones expanded with zeros between taps -- is zero-padded into the large kernel
    and summed: one depthwise KxK conv at deploy time.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, kernel_size: int = 31, stride: int = 1,
                 groups: int | None = None, small_kernel: int | None = 5,
                 dilated_branches: Sequence[tuple[int, int]] = (), act: bool = False, deploy: bool = False) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        groups = in_channels if groups is None else groups
        branches = [(small_kernel, 1)] if small_kernel else []
        branches += [tuple(b) for b in dilated_branches]
        for k, d in [(kernel_size, 1), *branches]:
            if k % 2 == 0:
                raise ValueError(f"RepLKBlock kernels must be odd, got {k}")
            if d * (k - 1) + 1 > kernel_size:
                raise ValueError(f"branch k={k} d={d} spans {d * (k - 1) + 1} > large kernel {kernel_size}")
        self.kernel_size = kernel_size
        self.large: ConvBN | None = ConvBN(in_channels, out_channels, kernel_size, stride, kernel_size // 2, 1, groups)
        self.small: nn.ModuleList | None = nn.ModuleList(
            ConvBN(in_channels, out_channels, k, stride, d * (k - 1) // 2, d, groups) for k, d in branches)
        self.reparam_conv: nn.Conv2d | None = None
        self.act = nn.ReLU() if act else nn.Identity()
        if deploy:
            self.reparameterize()

    @classmethod
    def unireplk(cls, channels: int, kernel_size: int = 13, deploy: bool = False) -> RepLKBlock:
        """UniRepLKNet's DilatedReparamBlock: depthwise, branches from :func:`unireplk_branches`."""
        return cls(channels, channels, kernel_size, 1, channels, small_kernel=None,
                   dilated_branches=unireplk_branches(kernel_size), deploy=deploy)

    def _branches(self, x: Tensor) -> Tensor:
        out = self.large(x)
        for branch in self.small:
            out = out + branch(x)
        return out

    def _reparameterize(self) -> None:
        ref = self.large.conv.weight
        k = add([self.large.kernel(), *(b.kernel() for b in self.small)])
        self.reparam_conv = kernel_to_conv(k, ref)
        self.large = self.small = None

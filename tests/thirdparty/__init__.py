"""Independent third-party-style formulations of re-parameterizable structures.

Each module re-implements a paper's training-time structure in the coding style of its official
repository (class and attribute names, ``+=`` accumulation, Python ``sum()``, ``hasattr`` checks,
weights computed inside forward, slice assignment), written from the papers, not copied. They are the
inputs the generic graph pass (:func:`repconv.fuse`) must handle without knowing their classes.

``THIRD_PARTY_CASES``: ``(name, factory, input_shape, expected_max_convs_after_fusion)``.
``factory()`` returns a deterministic model in eval mode with random BN statistics (and any
zero-initialised factor perturbed) so a fusion that ignores a term fails. The last field is the
number of ``nn.Conv2d`` modules a correct fusion of the eval-mode model can reach with generic rules
(an upper bound for the pass); each entry's comment says why. A conv module called twice with
different BNs after it must become two modules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from repconv.blocks.common import randomize_bn_

from . import (
    acnet_style,
    dbb_style,
    doconv_style,
    mobileone_style,
    plain_style,
    replk_style,
    repmlp_style,
    repvgg_style,
    timm_style,
)

Factory = Callable[[], nn.Module]


def _seeded(build: Callable[[], nn.Module], seed: int) -> Factory:
    def factory() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    # factors that start at exactly zero would hide mistakes in their handling
                    if name.endswith("idconv1.weight") or name.endswith(".D") or name == "D":
                        p.add_(torch.randn_like(p) * 0.1)
        randomize_bn_(model, seed)
        return model.eval()

    factory.__name__ = f"make_{getattr(build, '__name__', 'model')}"
    return factory


THIRD_PARTY_CASES: list[tuple[str, Factory, tuple[int, ...], int]] = [
    # RepVGG: 3x3 + 1x1 + identity BN -> one 3x3
    ("repvgg_block", _seeded(lambda: repvgg_style.RepVGGBlock(8, 8), 1), (2, 8, 12, 20), 1),
    ("repvgg_block_s2_g2", _seeded(lambda: repvgg_style.RepVGGBlock(8, 16, stride=2, groups=2), 2),
     (2, 8, 15, 16), 1),
    # stem + 4 blocks, each one conv; the Linear head is not a conv
    ("repvgg_net", _seeded(lambda: repvgg_style.RepVGG(override_groups_map={2: 2}), 3), (2, 3, 32, 32), 5),
    # ACNet: KxK + 1xK + Kx1 -> one KxK
    ("acnet_block", _seeded(lambda: acnet_style.ACBlock(8, 16, 3, padding=1), 4), (2, 8, 12, 20), 1),
    ("acnet_block_k5_s2_g2", _seeded(lambda: acnet_style.ACBlock(8, 16, 5, stride=2, padding=2, groups=2), 5),
     (2, 8, 13, 17), 1),
    # DBB: BNAndPad slice assignment, IdentityBasedConv1x1 (computed weight), avg pool -> one KxK
    ("dbb_block", _seeded(lambda: dbb_style.DiverseBranchBlock(8, 16, 3, padding=1), 6), (2, 8, 12, 20), 1),
    ("dbb_block_g2_s2", _seeded(lambda: dbb_style.DiverseBranchBlock(8, 16, 3, stride=2, padding=1, groups=2), 7),
     (2, 8, 15, 16), 1),
    ("dbb_block_dw", _seeded(lambda: dbb_style.DiverseBranchBlock(8, 8, 3, padding=1, groups=8), 8),
     (2, 8, 12, 20), 1),
    ("dbb_block_k5_relu", _seeded(lambda: dbb_style.DiverseBranchBlock(8, 8, 5, padding=2, nonlinear=nn.ReLU()), 9),
     (2, 8, 12, 12), 1),
    # RepMLP: generic rules fold the conv-BN branches and merge them (they read the same partitions and
    # are summed) into one conv, but cannot move that conv into fc3 (it needs the reshape/permute
    # semantics): fc3 + 1 remain, plus the global perceptron's AvgPool->BN if the pass rewrites it as a
    # depthwise conv. RepMLPBlock.reparameterize reaches fc3 alone.
    ("repmlp_block", _seeded(lambda: repmlp_style.RepMLP(8, 8, 8, 8, 4, 4, reparam_conv_k=(1, 3), fc3_groups=2), 10),
     (2, 8, 8, 8), 3),
    ("repmlp_block_single_partition",
     _seeded(lambda: repmlp_style.RepMLP(8, 16, 4, 6, 4, 6, reparam_conv_k=(1, 3, 5)), 11), (2, 8, 4, 6), 2),
    # MobileOne: k branches + 1x1 scale + identity BN -> one conv per block
    ("mobileone_block_dw", _seeded(lambda: mobileone_style.MobileOneBlock(8, 8, 3, 1, 1, groups=8,
                                                                          num_conv_branches=3), 12),
     (2, 8, 12, 20), 1),
    ("mobileone_unit", _seeded(lambda: mobileone_style.MobileOneUnit(8, 16, stride=2, num_conv_branches=2), 13),
     (2, 8, 15, 16), 2),
    # DO-Conv: einsum-composed weights (constant-foldable) followed by BN -> two convs
    ("doconv_bn", _seeded(lambda: doconv_style.DOConvBNReLU(8, 16), 14), (2, 8, 12, 20), 2),
    # RepLKNet large + small kernel -> one depthwise conv
    ("replk_conv", _seeded(lambda: replk_style.ReparamLargeKernelConv(16, 16, 13, 1, 16, 5), 15), (2, 16, 20, 24), 1),
    # full RepLKNet block: pre-BN folds into pw1 (1x1, no padding), pw1/large/pw2 remain
    ("replk_block", _seeded(lambda: replk_style.RepLKBlock(8, 16, 13, 5), 16), (2, 8, 20, 24), 3),
    # UniRepLKNet: large kernel + five dilated branches -> one conv
    ("unireplk_dilated", _seeded(lambda: replk_style.DilatedReparamBlock(16, 13), 17), (2, 16, 20, 24), 1),
    # plain Sequential: see plain_style.sequential_bn_around_convs (one BN must stay)
    ("sequential_bn_around_convs", _seeded(plain_style.sequential_bn_around_convs, 18), (2, 3, 16, 16), 3),
    # shared conv called twice, each use with its own BN -> two distinct fused convs
    ("shared_conv", _seeded(lambda: plain_style.SharedConv(8), 19), (2, 8, 12, 12), 2),
    # timm: functional batch_norm inside BatchNormAct2d, identity branch is a BatchNormAct2d
    ("timm_repvgg_block", _seeded(lambda: timm_style.RepVggBlock(16, 16), 20), (2, 16, 12, 20), 1),
    ("timm_byob_net", _seeded(timm_style.ByobLikeNet, 21), (2, 3, 32, 32), 4),
]

# Cases whose forward writes into a tensor with slice assignment: stock ``torch.fx.symbolic_trace``
# refuses them (``Proxy`` has no ``__setitem__``); a tracer must record ``operator.setitem``.
SETITEM_CASES = frozenset({"dbb_block", "dbb_block_g2_s2", "dbb_block_dw", "dbb_block_k5_relu"})

__all__ = ["SETITEM_CASES", "THIRD_PARTY_CASES"]

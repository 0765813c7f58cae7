"""Dynamic operators: training-time modules faithful to their papers, plus inference deploy forms.

Every training module has ``to_deploy()`` returning an eval-mode inference module with equal
outputs that is faster, torch.fx traceable (so ``repconv.fuse`` can fold conv-BNs inside it) and
exportable to ONNX with standard ops and a dynamic batch axis (CoTNet: plus the repconv
Involution op). :func:`to_deploy` converts a whole model. Operator table: docs/operators.md.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from ._common import FusionRefused, fold_conv_bns, onnx_static_batch, per_sample_conv2d
from .condconv import CondConv2d, CondConv2dDeploy
from .cotnet import CoTAttention, CoTAttentionDeploy, CoTBottleneck, CoTNet, cotnet26
from .ddw import DynamicDWConv2d, DynamicDWConv2dDeploy
from .drconv import DRConv2d, DRConv2dDeploy
from .mixer import MixerBlock, MlpMixer, fold_layernorm_affine, mixer_tiny
from .psconv import PSConv2d, PSConv2dDeploy, PSConv2dSparse
from .se import SEBottleneck, SEModule
from .sk import SKConv
from .ulsam import ULSAM, ULSAMDeploy
from .weightnet import WeightNetConv2d, WeightNetConv2dDeploy

__all__ = [
    "CoTAttention", "CoTAttentionDeploy", "CoTBottleneck", "CoTNet", "CondConv2d", "CondConv2dDeploy",
    "DRConv2d", "DRConv2dDeploy", "DynamicDWConv2d", "DynamicDWConv2dDeploy", "FusionRefused", "MixerBlock",
    "MlpMixer", "PSConv2d", "PSConv2dDeploy", "PSConv2dSparse", "SEBottleneck", "SEModule", "SKConv", "ULSAM",
    "ULSAMDeploy", "WeightNetConv2d", "WeightNetConv2dDeploy", "cotnet26", "fold_conv_bns",
    "fold_layernorm_affine", "mixer_tiny", "deploy_rewrites", "onnx_static_batch", "per_sample_conv2d", "to_deploy",
]

# to_deploy() of these only folds conv-BNs (SE, SK) or recurses here (CoTNet): descend instead, so
# the fold happens once, at the end.
_DESCEND = (SEBottleneck, SKConv, CoTNet)


def _replace(module: nn.Module, prefix: str = "", done: list[str] | None = None) -> list[str]:
    done = [] if done is None else done
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if hasattr(child, "to_deploy") and not isinstance(child, _DESCEND):
            setattr(module, name, child.to_deploy())
            done.append(f"{path} ({type(child).__name__})")
        else:
            _replace(child, path, done)
    return done


def deploy_rewrites(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """``model`` with every dynamic operator swapped for its deploy form (an eval-mode copy when
    there is any, else ``model`` itself), and the list of what was swapped. No conv-BN folding:
    that is ``repconv.fuse``'s job, which calls this first."""
    if not any(hasattr(m, "to_deploy") and not isinstance(m, _DESCEND) for m in model.modules()):
        return model, []
    root = copy.deepcopy(model).eval()
    if hasattr(root, "to_deploy") and not isinstance(root, _DESCEND):
        return root.to_deploy(), [f"(top) ({type(root).__name__})"]
    return root, _replace(root)


def to_deploy(model: nn.Module, example_inputs: tuple[Tensor, ...] | None = None, *,
              generic: bool = True) -> nn.Module:
    """An eval-mode copy of ``model`` with every dynamic operator in its deploy form and every
    conv-BN folded: by ``repconv.fuse`` (which also verifies) when it is present, ``generic`` is
    true and ``example_inputs`` are given; otherwise locally (the ``conv_bn`` Sequentials)."""
    root = copy.deepcopy(model).eval()
    if hasattr(root, "to_deploy") and not isinstance(root, _DESCEND):
        root = root.to_deploy()
    else:
        _replace(root)
    return fold_conv_bns(root, example_inputs, generic=generic)

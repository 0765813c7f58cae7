"""Normalizations: eval-mode BatchNorm is a per-channel affine; LayerNorm / GroupNorm are a
normalization (kept) followed by an affine (gamma, beta) that may fold into the next layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from repconv import algebra as A
from repconv.algebra import FusionRefused

from .. import affine as V
from ..affine import Affine, identity_of
from . import NotAffine, Op, transfer
from .conv import f64

aten = torch.ops.aten
_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


@transfer(modules=[nn.modules.batchnorm._BatchNorm])
def batch_norm_module(op: Op) -> Affine:
    m = op.module
    if type(m).forward not in _BN_FORWARDS or m.training:
        raise NotAffine
    if m.running_mean is None:
        raise FusionRefused("BatchNorm without running statistics normalizes with batch stats: left as is")
    scale, shift = A.bn_module_scale_shift(m)
    return V.through_channel_affine(op.node, op.tensor(), scale, shift, axis="dim1")


@transfer(functions=[F.batch_norm, aten.batch_norm.default])
def batch_norm_function(op: Op) -> Affine:
    rm, rv = op.const("running_mean"), op.const("running_var")
    if op.static("training", False) or not isinstance(rm, torch.Tensor) or not isinstance(rv, torch.Tensor):
        raise NotAffine
    w, b = op.const("weight"), op.const("bias")
    scale, shift = A.bn_scale_shift(f64(rm), f64(rv), None if w is None else f64(w), None if b is None else f64(b),
                                    op.static("eps", 1e-5))
    return V.through_channel_affine(op.node, op.tensor(), scale, shift, axis="dim1")


def _affine_after_norm(op: Op, gamma: torch.Tensor, beta: torch.Tensor | None, axis: str, strip) -> Affine:
    """The norm node itself becomes the plain normalization (the root); its affine is a value that a
    following conv / linear may absorb. When nothing absorbs it, the node is left as it was."""
    root = identity_of(op.node)
    if root is None:
        raise NotAffine
    g = f64(gamma)
    v = V.through_channel_affine(op.node, root, g, f64(beta) if beta is not None else torch.zeros_like(g), axis)
    return Affine(**{**v.__dict__, "sources": frozenset(), "root_fixes": (strip,), "extra": frozenset({op.node}),
                     "terms": ()})


@transfer(modules=[nn.LayerNorm])
def layer_norm_module(op: Op) -> Affine:
    m = op.module
    if type(m).forward is not nn.LayerNorm.forward or m.weight is None or len(m.normalized_shape) != 1:
        raise NotAffine
    node = op.node

    def strip(gm: torch.fx.GraphModule, node: torch.fx.Node = node, m: nn.LayerNorm = m) -> None:
        name = f"{node.target}_noaffine".replace(".", "_")
        gm.add_submodule(name, nn.LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=False))
        node.target = name

    return _affine_after_norm(op, m.weight, m.bias, "last", strip)


@transfer(modules=[nn.GroupNorm])
def group_norm_module(op: Op) -> Affine:
    m = op.module
    if type(m).forward is not nn.GroupNorm.forward or m.weight is None:
        raise NotAffine
    node = op.node

    def strip(gm: torch.fx.GraphModule, node: torch.fx.Node = node, m: nn.GroupNorm = m) -> None:
        name = f"{node.target}_noaffine".replace(".", "_")
        gm.add_submodule(name, nn.GroupNorm(m.num_groups, m.num_channels, eps=m.eps, affine=False))
        node.target = name

    return _affine_after_norm(op, m.weight, m.bias, "dim1", strip)


def _norm_function(op: Op, axis: str) -> Affine:
    w = op.const("weight")
    if not isinstance(w, torch.Tensor):
        raise NotAffine
    if axis == "last" and len(op.static("normalized_shape")) != 1:
        raise NotAffine
    b = op.const("bias")

    def strip(_gm: torch.fx.GraphModule, op: Op = op) -> None:
        op.set_arg("weight", None)
        if op.has("bias") or b is not None:
            op.set_arg("bias", None)

    return _affine_after_norm(op, w, b, axis, strip)


@transfer(functions=[F.layer_norm, aten.layer_norm.default])
def layer_norm_function(op: Op) -> Affine:
    """timm's LayerNorm2d (permute, F.layer_norm, permute) and channels-last blocks."""
    return _norm_function(op, "last")


@transfer(functions=[F.group_norm, aten.group_norm.default])
def group_norm_function(op: Op) -> Affine:
    return _norm_function(op, "dim1")

"""Ops that move values without arithmetic: concat, pass-throughs, leading-dim reshapes, crops."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from repconv import algebra as A

from .. import affine as V
from ..affine import Affine
from . import NotAffine, Op, transfer

aten = torch.ops.aten


@transfer(functions=[(torch.cat, ("tensors", "dim")), (torch.concat, ("tensors", "dim")),
                     (torch.concatenate, ("tensors", "dim")), aten.cat.default])
def cat(op: Op) -> Affine:
    tensors = op.raw("tensors")
    if not isinstance(tensors, list | tuple) or not tensors or not all(
            isinstance(t, fx.Node) and t not in op.an.consts for t in tensors):
        raise NotAffine
    return V.through_concat(op.node, [op.get(t) for t in tensors], op.static("dim", 0))


_DROPOUT = ("input", "p", "training", "inplace")


@transfer(functions=[(F.dropout, _DROPOUT), (F.dropout1d, _DROPOUT), (F.dropout2d, _DROPOUT),
                     (F.dropout3d, _DROPOUT), (F.alpha_dropout, _DROPOUT), (F.feature_alpha_dropout, _DROPOUT),
                     aten.dropout.default])
def dropout(op: Op) -> Affine:
    if op.static("training", op.static("train", True)):
        raise NotAffine
    return V.passthrough(op.node, op.tensor())


@transfer(functions=[(torch.clone, ("input", "memory_format")), aten.clone.default, aten.alias.default,
                     aten.contiguous.default],
          methods=[("contiguous", ("memory_format",)), ("clone", ("memory_format",)), "detach"])
def identity_op(op: Op) -> Affine:
    return V.passthrough(op.node, op.tensor())


@transfer(modules=[nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout])
def identity_module(op: Op) -> Affine:
    if type(op.module).__module__.split(".")[0] != "torch" or op.module.training:
        raise NotAffine
    return V.passthrough(op.node, op.tensor())


_VIEW = ("input", "shape")


@transfer(functions=[(torch.flatten, ("input", "start_dim", "end_dim")), (torch.reshape, _VIEW),
                     aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints],
          methods=[("view", ("*shape",)), ("reshape", ("*shape",)), ("flatten", ("start_dim", "end_dim")),
                   ("reshape_as", ("other",)), ("view_as", ("other",)), ("unflatten", ("dim", "sizes"))])
def leading_view(op: Op) -> Affine:
    """Reshapes that keep the last dim: LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)``."""
    shape = op.out_shape()
    if shape is None or len(shape) < 2:
        raise NotAffine
    v = op.tensor()
    if v.is_identity:
        raise NotAffine  # reshaping a root: the reshaped tensor is a root of its own
    return V.through_view(op.node, v, shape)


@transfer(modules=[nn.Flatten])
def flatten_module(op: Op) -> Affine:
    shape = op.out_shape()
    v = op.tensor()
    if shape is None or len(shape) < 2 or v.is_identity:
        raise NotAffine
    return V.through_view(op.node, v, shape)


@transfer(functions=[(operator.getitem, ("input", "index"))])
def crop(op: Op) -> Affine:
    """``x[:, :, r:-r, c:-c]``: ACNet's crop of its Kx1 / 1xK branches."""
    rc = _crop_index(op.raw("index"))
    if rc is None:
        raise NotAffine
    v = op.tensor()
    if v.rank != 4:
        raise NotAffine
    return V.through_conv(op.node, v, A.crop(v.out_channels, *rc))


def _crop_index(index: Any) -> tuple[int, int] | None:
    """``x[:, :, r:-r, c:-c]`` (either dim may be ``:``) as (r, c); anything else None."""
    if not isinstance(index, tuple) or len(index) != 4 or not all(isinstance(s, slice) for s in index):
        return None
    full = slice(None, None, None)
    if index[0] != full or index[1] != full:
        return None
    rc = []
    for s in index[2:]:
        if s == full:
            rc.append(0)
        elif (s.step in (None, 1) and isinstance(s.start, int) and isinstance(s.stop, int)
              and s.start > 0 and s.stop == -s.start):
            rc.append(s.start)
        else:
            return None
    return (rc[0], rc[1]) if any(rc) else None


@transfer(functions=[(torch.permute, ("input", "dims")), aten.permute.default], methods=[("permute", ("*dims",))])
def permute(op: Op) -> Affine:
    dims = op.static("dims")
    if len(dims) == 1 and isinstance(dims[0], list | tuple):  # x.permute([0, 3, 1, 2])
        dims = dims[0]
    v = op.tensor()
    if v.is_identity:
        raise NotAffine  # a permuted root is a root of its own
    return V.through_permute(op.node, v, tuple(dims))

"""Arithmetic: sums of branches (``+``, ``-``, ``torch.add(alpha=)``, ``stack(...).sum(0)``) and
scalar / per-channel scales and shifts."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .. import affine as V
from ..affine import Affine, identity_of
from . import NotAffine, Op, transfer
from .conv import f64

aten = torch.ops.aten
_BINARY = ("input", "other")
_ALPHA = ("input", "other", "alpha")
_ONE = torch.ones(1, dtype=torch.float64)


def _weighted_sum(op: Op, signs: tuple[float, float]) -> Affine:
    """``input * signs[0] + other * signs[1]`` where either may be a constant."""
    alpha = op.static("alpha", 1)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise NotAffine
    operands = [(op.raw("input"), signs[0]), (op.raw("other"), signs[1] * float(alpha))]
    tensors = [(a, s) for a, s in operands if _is_tensor(op, a)]
    if not tensors:
        raise NotAffine
    values = [op.get(a) for a, _ in tensors]
    if len(values) == 2:
        out = V.through_add(op.node, values, [s for _, s in tensors])
    else:  # tensor +- constant: a shift (and a sign)
        out = V.through_channel_affine(op.node, values[0], tensors[0][1] * _ONE, 0 * _ONE)
    for a, s in operands:
        if not _is_tensor(op, a):
            shift, axis = per_channel(op.an.const(a), out)
            out = V.through_channel_affine(op.node, out, _ONE, s * shift, axis)
    return out


def _is_tensor(op: Op, a: Any) -> bool:
    return isinstance(a, fx.Node) and a not in op.an.consts


@transfer(functions=[(operator.add, _BINARY), (operator.iadd, _BINARY), (torch.add, _ALPHA), aten.add.Tensor,
                     aten.add.Scalar, aten.add_.Tensor], methods=[("add", ("other", "alpha"))])
def add(op: Op) -> Affine:
    return _weighted_sum(op, (1.0, 1.0))


@transfer(functions=[(operator.sub, _BINARY), (operator.isub, _BINARY), (torch.sub, _ALPHA),
                     (torch.subtract, _ALPHA), aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar],
          methods=[("sub", ("other", "alpha")), ("subtract", ("other", "alpha"))])
def sub(op: Op) -> Affine:
    if op.node.target is aten.rsub.Scalar:  # other - alpha * input
        return _weighted_sum(op, (-1.0, 1.0)) if op.static("alpha", 1) == 1 else _raise()
    return _weighted_sum(op, (1.0, -1.0))


def _raise() -> Affine:
    raise NotAffine


def _scale(op: Op, divide: bool) -> Affine:
    a_t, b_t = op.is_tensor("input"), op.is_tensor("other")
    if a_t == b_t or (divide and b_t):
        raise NotAffine  # tensor * tensor is not linear; const / tensor neither
    if divide and op.raw("rounding_mode") is not None:
        raise NotAffine
    v = op.tensor("input" if a_t else "other")
    scale, axis = per_channel(op.const("other" if a_t else "input"), v)
    if divide:
        scale = 1.0 / scale
    return V.through_channel_affine(op.node, v, scale, torch.zeros_like(scale), axis)


@transfer(functions=[(operator.mul, _BINARY), (operator.imul, _BINARY), (torch.mul, _BINARY),
                     (torch.multiply, _BINARY), aten.mul.Tensor, aten.mul.Scalar],
          methods=[("mul", ("other",)), ("multiply", ("other",))])
def mul(op: Op) -> Affine:
    return _scale(op, divide=False)


_DIV = ("input", "other", "rounding_mode")


@transfer(functions=[(operator.truediv, _BINARY), (operator.itruediv, _BINARY), (torch.div, _DIV),
                     (torch.divide, _DIV), aten.div.Tensor, aten.div.Scalar],
          methods=[("div", ("other", "rounding_mode")), ("divide", ("other", "rounding_mode"))])
def div(op: Op) -> Affine:
    return _scale(op, divide=True)


@transfer(functions=[(operator.neg, ("input",)), (torch.neg, ("input",)), aten.neg.default], methods=["neg"])
def neg(op: Op) -> Affine:
    return V.through_channel_affine(op.node, op.tensor(), -_ONE, 0 * _ONE)


@transfer(functions=[(torch.stack, ("tensors", "dim")), aten.stack.default])
def stack(op: Op) -> Affine | None:
    """Remember the stacked branches; read as a tensor, the stack is a root of its own."""
    tensors = op.raw("tensors")
    if not isinstance(tensors, list | tuple) or not all(_is_tensor(op, t) for t in tensors):
        raise NotAffine
    members = [op.get(t) for t in tensors]
    op.an.stacks[op.node] = (members, int(op.static("dim", 0)))
    return identity_of(op.node)


@transfer(functions=[(torch.sum, ("input", "dim", "keepdim", "dtype")), aten.sum.dim_IntList,
                     (torch.mean, ("input", "dim", "keepdim", "dtype")), aten.mean.dim],
          methods=[("sum", ("dim", "keepdim", "dtype")), ("mean", ("dim", "keepdim", "dtype"))])
def reduce_stack(op: Op) -> Affine:
    """``torch.stack(branches).sum(0)`` / ``.mean(0)``: the branches' sum (or average)."""
    x = op.raw("input")
    stacked = op.an.stacks.get(x)
    if stacked is None or op.static("keepdim", False) or op.raw("dtype") is not None:
        raise NotAffine
    members, dim = stacked
    d = op.static("dim")
    d = d[0] if isinstance(d, list | tuple) and len(d) == 1 else d
    rank = members[0].rank + 1
    if not isinstance(d, int) or d % rank != dim % rank:
        raise NotAffine
    name = getattr(op.node.target, "__name__", str(op.node.target))
    w = 1.0 / len(members) if "mean" in name else 1.0
    if len(members) == 1:
        return V.through_channel_affine(op.node, members[0], w * _ONE, 0 * _ONE)
    return V.through_add(op.node, members, [w] * len(members))


def per_channel(c: Any, v: Affine) -> tuple[torch.Tensor, str]:
    """A scalar or per-channel constant as (vector, axis); anything else is not a channel affine."""
    if isinstance(c, int | float) and not isinstance(c, bool):
        return torch.tensor([float(c)], dtype=torch.float64), "any"
    if not isinstance(c, torch.Tensor) or not c.is_floating_point() and c.dtype not in (torch.int64, torch.int32):
        raise NotAffine
    t = f64(c)
    if t.numel() == 1:
        return t.reshape(1), "any"
    shape = list(t.shape)
    nontrivial = [i for i, s in enumerate(shape) if s != 1]
    if len(nontrivial) != 1 or len(shape) > v.rank:
        raise NotAffine
    from_end = len(shape) - nontrivial[0]  # 1 = last dim
    if v.rank == 4 and from_end == 3:
        return t.reshape(-1), "dim1"
    if from_end == 1:
        return t.reshape(-1), "last"
    raise NotAffine

"""Fully-connected layers: nn.Linear, F.linear, aten.linear and ``x @ W`` with a constant W."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from repconv.algebra import LinearKernel

from .. import affine as V
from ..affine import Affine
from . import NotAffine, Op, transfer
from .conv import f64

aten = torch.ops.aten


def bias_or_zeros(b: torch.Tensor | None, n: int) -> torch.Tensor:
    return f64(b) if b is not None else torch.zeros(n, dtype=torch.float64)


@transfer(modules=[nn.Linear])
def linear_module(op: Op) -> Affine:
    m = op.module
    if type(m).forward is not nn.Linear.forward:
        raise NotAffine
    return V.through_linear(op.node, op.tensor(), LinearKernel(f64(m.weight), bias_or_zeros(m.bias, m.out_features)))


@transfer(functions=[(F.linear, ("input", "weight", "bias")), aten.linear.default])
def linear_function(op: Op) -> Affine:
    w = op.const("weight")
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise NotAffine
    return V.through_linear(op.node, op.tensor(), LinearKernel(f64(w), bias_or_zeros(op.const("bias"), w.shape[0])))


@transfer(functions=[(operator.matmul, ("input", "other")), (torch.matmul, ("input", "other")),
                     aten.matmul.default, aten.mm.default], methods=[("matmul", ("other",))])
def matmul_constant(op: Op) -> Affine:
    """``x @ W`` with a constant 2-D ``W`` is a bias-free linear map of the last dim."""
    if op.is_tensor("other"):
        raise NotAffine
    w = op.const("other")
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise NotAffine
    k = LinearKernel(f64(w).t().contiguous(), bias_or_zeros(None, w.shape[1]))
    return V.through_linear(op.node, op.tensor(), k)


LINEAR_FUNCTIONS = (F.linear, aten.linear.default)

"""DO-Conv kernel algebra (Cao et al., "DO-Conv: Depthwise Over-parameterized Convolutional Layer",
arXiv 2006.12030): pure functions on the two factors D and W.

Notation (the paper's, with the channel axis first as PyTorch stores it):

* ``D``: (C_in, M*N, D_mul) -- for every input channel c, D_mul depthwise kernels of M x N taps.
* ``W``: (C_out, C_in/groups, D_mul) -- a conventional kernel whose spatial axis is replaced by D_mul.

The layer computes O = W x (D o P) on every M x N patch P ("feature composition"). Because both
factors are linear, the same output comes from one conventional kernel W' = D^T o W ("kernel
composition"): ``W'[o, j, m] = sum_s D[c(o, j), m, s] * W[o, j, s]`` where ``c(o, j)`` is the input
channel that slot ``j`` of output ``o`` reads (``group(o) * C_in/groups + j``). W' is what a deployed
DO-Conv stores, so inference costs exactly one ordinary convolution.

Groups: the paper defines D per *input channel*; we index it that way for every ``groups`` value,
so DO-DConv (the depthwise variant) is simply ``groups == C_in`` with W of shape
(C_in * depth_multiplier, 1, D_mul).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .conv import ConvGeometry, ConvKernel, FusionRefused, compose

Pair = tuple[int, int]


def _check(d: Tensor, w: Tensor, kernel_size: Pair, groups: int) -> tuple[int, int, int]:
    m, n = kernel_size
    if d.dim() != 3 or w.dim() != 3:
        raise ValueError(f"D must be (C_in, M*N, D_mul) and W (C_out, C_in/groups, D_mul); got "
                         f"{tuple(d.shape)} and {tuple(w.shape)}")
    c_in, mn, d_mul = d.shape
    c_out, ig, d_mul_w = w.shape
    if mn != m * n:
        raise ValueError(f"D has {mn} taps per kernel, kernel_size {kernel_size} needs {m * n}")
    if d_mul != d_mul_w:
        raise ValueError(f"D_mul differs between D ({d_mul}) and W ({d_mul_w})")
    if c_in % groups or c_out % groups or ig * groups != c_in:
        raise ValueError(f"C_in={c_in}, C_out={c_out}, W slots {ig} do not fit groups={groups}")
    return c_in, c_out, d_mul


def doconv_identity(in_channels: int, kernel_size: Pair, d_mul: int,
                    dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """The fixed part of D that makes a freshly initialised DO-Conv (D = 0) a plain conv.

    The paper trains ``D + I`` with D starting at zero, so at initialisation W' = W (first M*N
    slots). For D_mul > M*N the identity is tiled ``D_mul // (M*N)`` times and the remainder is zero.
    """
    m, n = kernel_size
    mn = m * n
    if d_mul < mn:
        raise ValueError(f"DO-Conv needs D_mul >= M*N ({mn}) to over-parameterize; got {d_mul}")
    eye = torch.eye(mn, dtype=dtype, device=device)
    reps = d_mul // mn
    blocks = [eye] * reps
    rest = d_mul - reps * mn
    if rest:
        blocks.append(torch.zeros(mn, rest, dtype=dtype, device=device))
    return torch.cat(blocks, dim=1).unsqueeze(0).expand(in_channels, mn, d_mul).contiguous()


def compose_kernel(d: Tensor, w: Tensor, kernel_size: Pair, groups: int = 1, *,
                   sizes: tuple[int, int, int] | None = None) -> Tensor:
    """Kernel composition W' = D^T o W as a conv weight (C_out, C_in/groups, M, N).

    Written with reshape + einsum only so it is torch.fx-traceable and differentiable: DOConv2d
    calls it in its training-time forward, passing ``sizes = (C_in, C_out, D_mul)`` because under
    tracing the tensors are proxies whose shapes cannot be inspected.
    """
    c_in, c_out, d_mul = _check(d, w, kernel_size, groups) if sizes is None else sizes
    ig = c_in // groups
    wg = w.reshape(groups, c_out // groups, ig, d_mul)
    dg = d.reshape(groups, ig, kernel_size[0] * kernel_size[1], d_mul)
    out = torch.einsum("gjms,gojs->gojm", dg, wg)
    return out.reshape(c_out, ig, kernel_size[0], kernel_size[1])


def doconv_kernel(d: Tensor | None, w: Tensor, bias: Tensor | None, kernel_size: Pair,
                  geom: ConvGeometry) -> ConvKernel:
    """A DO-Conv (D may be None for 1x1 kernels, where W alone is the kernel) as one ConvKernel."""
    c_out = w.shape[0]
    if d is None:
        if kernel_size[0] * kernel_size[1] != w.shape[2]:
            raise ValueError("without D, W's last axis must hold the M*N taps")
        weight = w.reshape(c_out, w.shape[1], *kernel_size)
    else:
        weight = compose_kernel(d, w, kernel_size, geom.groups)
    b = bias if bias is not None else torch.zeros(c_out, dtype=w.dtype, device=w.device)
    return ConvKernel(weight, b, geom)


def feature_composition_convs(d: Tensor, w: Tensor, bias: Tensor | None, kernel_size: Pair,
                              geom: ConvGeometry) -> tuple[ConvKernel, ConvKernel]:
    """The paper's feature composition as two ordinary convs: D o P is a depthwise conv with
    depth multiplier D_mul (output channel c*D_mul + s), W x (.) is a grouped 1x1 conv over those
    C_in*D_mul channels. Composing them with :func:`repconv.algebra.compose` must give the same
    kernel as :func:`compose_kernel` -- an independent route used by the tests."""
    c_in, c_out, d_mul = _check(d, w, kernel_size, geom.groups)
    m, n = kernel_size
    dw = d.permute(0, 2, 1).reshape(c_in * d_mul, 1, m, n)  # [c*D_mul + s, 0, m, n] = D[c, mn, s]
    depthwise = ConvKernel(dw, torch.zeros(c_in * d_mul, dtype=d.dtype, device=d.device),
                           replace(geom, groups=c_in))
    ig = c_in // geom.groups
    pw = w.reshape(c_out, ig * d_mul, 1, 1)  # slot j*D_mul + s matches channel order c*D_mul + s
    b = bias if bias is not None else torch.zeros(c_out, dtype=w.dtype, device=w.device)
    pointwise = ConvKernel(pw, b, ConvGeometry(groups=geom.groups))
    return depthwise, pointwise


def feature_composition(x: Tensor, d: Tensor, w: Tensor, bias: Tensor | None, kernel_size: Pair,
                        geom: ConvGeometry) -> Tensor:
    """O = W x (D o P) evaluated literally: the training-time computation the paper describes
    before showing that kernel composition is cheaper."""
    depthwise, pointwise = feature_composition_convs(d, w, bias, kernel_size, geom)
    return pointwise.apply(depthwise.apply(x))


def compose_via_features(d: Tensor, w: Tensor, bias: Tensor | None, kernel_size: Pair,
                         geom: ConvGeometry) -> ConvKernel:
    """Kernel composition derived through the generic conv algebra (depthwise then 1x1)."""
    depthwise, pointwise = feature_composition_convs(d, w, bias, kernel_size, geom)
    k = compose(depthwise, pointwise)  # a 1x1 mix after a conv: exact for any padding mode
    if k.geom.groups != geom.groups:
        raise FusionRefused("feature-composition route changed the group count")
    return k


__all__ = ["compose_kernel", "compose_via_features", "doconv_identity", "doconv_kernel", "feature_composition",
           "feature_composition_convs"]

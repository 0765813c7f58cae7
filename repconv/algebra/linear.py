"""Fusion algebra for fully-connected layers: Linear <-> BatchNorm1d, LayerNorm affine -> Linear,
and a conv at a fixed spatial size as one FC (RepMLP's locality injection)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .conv import ConvKernel


@dataclass
class LinearKernel:
    """out = x @ weight.T + bias, weight (O, I)."""

    weight: Tensor
    bias: Tensor

    @staticmethod
    def of(linear: torch.nn.Linear) -> LinearKernel:
        w = linear.weight.detach()
        b = linear.bias.detach() if linear.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype,
                                                                              device=w.device)
        return LinearKernel(w, b)

    def to(self, dtype: torch.dtype) -> LinearKernel:
        return LinearKernel(self.weight.to(dtype), self.bias.to(dtype))

    def double(self) -> LinearKernel:
        return self.to(torch.float64)

    def to_module(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.nn.Linear:
        dtype = dtype or self.weight.dtype
        # built directly in the target dtype: a default (fp32) module would round fp64 weights
        lin = torch.nn.utils.skip_init(torch.nn.Linear, self.weight.shape[1], self.weight.shape[0], dtype=dtype,
                                       device=device)
        with torch.no_grad():
            lin.weight.copy_(self.weight.to(dtype))
            lin.bias.copy_(self.bias.to(dtype))
        return lin


def linear_then_affine(k: LinearKernel, scale: Tensor, shift: Tensor) -> LinearKernel:
    """Linear followed by a per-feature affine (BatchNorm1d in eval, a scalar scale)."""
    return LinearKernel(k.weight * scale[:, None], k.bias * scale + shift)


def affine_then_linear(scale: Tensor, shift: Tensor, k: LinearKernel) -> LinearKernel:
    """Per-feature affine before a Linear: BatchNorm1d -> Linear, or LayerNorm's (gamma, beta)."""
    return LinearKernel(k.weight * scale[None, :], k.bias + k.weight @ shift)


def compose_linear(first: LinearKernel, second: LinearKernel) -> LinearKernel:
    """Two Linear layers with nothing between them."""
    return LinearKernel(second.weight @ first.weight, second.weight @ first.bias + second.bias)


def conv_to_fc(k: ConvKernel, in_shape: tuple[int, int, int]) -> LinearKernel:
    """A conv on a fixed (C, H, W) input as one FC on the flattened input: feed the identity basis
    (RepMLP's trick) so padding, stride and groups are handled by conv2d itself."""
    c, h, w = in_shape
    if k.in_channels != c:
        raise ValueError(f"conv expects {k.in_channels} channels, input shape has {c}")
    eye = torch.eye(c * h * w, dtype=k.weight.dtype, device=k.weight.device).reshape(c * h * w, c, h, w)
    no_bias = ConvKernel(k.weight, torch.zeros_like(k.bias), k.geom)
    cols = no_bias.apply(eye)  # (CHW, O, Ho, Wo)
    o, ho, wo = cols.shape[1:]
    weight = cols.reshape(c * h * w, -1).t().contiguous()
    bias = k.bias.repeat_interleave(ho * wo)
    return LinearKernel(weight, bias)

"""Padding (any spelling: ``F.pad(mode=)``, pad modules, ``padding_mode=`` inside a conv) and the
border fills of BN-and-pad layers (``out[:, :, 0:p, :] = shift``)."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from repconv.algebra import ConvKernel, FusionRefused

from .. import affine as V
from ..affine import Affine
from . import NotAffine, Op, transfer

aten = torch.ops.aten
# F.pad's mode -> Conv2d's padding_mode
_MODES = {"constant": "zeros", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _pad(op: Op, pad: Any, mode: str, value: Any = 0) -> Affine:
    if mode not in _MODES or mode == "constant" and value not in (None, 0, 0.0):
        raise NotAffine
    pad = (pad,) * 4 if isinstance(pad, int) else tuple(pad)
    if len(pad) != 4 or min(pad) < 0:
        raise FusionRefused("padding of other than the two image dims")
    if pad[0] != pad[1] or pad[2] != pad[3]:
        if _MODES[mode] != "zeros":
            raise FusionRefused(f"asymmetric {mode} padding: one conv pads symmetrically")
        return V.through_asymmetric_pad(op.node, op.tensor(), pad)
    return V.through_pad(op.node, op.tensor(), (pad[2], pad[0]), _MODES[mode])


@transfer(functions=[(F.pad, ("input", "pad", "mode", "value")), aten.pad.default])
def pad_function(op: Op) -> Affine:
    return _pad(op, op.static("pad"), op.static("mode", "constant"), op.static("value", None))


@transfer(functions=[aten.constant_pad_nd.default])
def constant_pad(op: Op) -> Affine:
    return _pad(op, op.static("pad"), "constant", op.static("value", 0))


@transfer(functions=[aten.reflection_pad2d.default, aten.replication_pad2d.default])
def mode_pad(op: Op) -> Affine:
    mode = "reflect" if op.node.target is aten.reflection_pad2d.default else "replicate"
    return _pad(op, op.static("padding"), mode)


_PAD_MODULES = {nn.ZeroPad2d: "constant", nn.ConstantPad2d: "constant", nn.ReflectionPad2d: "reflect",
                nn.ReplicationPad2d: "replicate", getattr(nn, "CircularPad2d", nn.ZeroPad2d): "circular"}


@transfer(modules=list(_PAD_MODULES))
def pad_module(op: Op) -> Affine:
    m = op.module
    mode = _PAD_MODULES.get(type(m))
    if mode is None:
        raise NotAffine
    return _pad(op, m.padding, mode, getattr(m, "value", 0))


@transfer(functions=[(operator.setitem, ("input", "index", "value"))])
def border_fill(op: Op) -> None:
    """``out[:, :, 0:p, :] = v``: a BN-and-pad layer refilling the border it zero-padded with the BN
    shift. Any other slice assignment mutates the tensor: it is only readable as it is."""
    an, target, index, fill = op.an, op.raw("input"), op.raw("index"), op.raw("value")
    v = an.values.get(target)
    side = _border_side(index, v)
    fill_value = an.const(fill) if (not isinstance(fill, fx.Node) or fill in an.consts) else None
    if v is None or side is None or not isinstance(fill_value, torch.Tensor | float | int):
        an.invalidate(target, "slice assignment into the tensor")
        return None
    try:
        an.values[target] = V.fill_border(op.node, v, side, torch.as_tensor(fill_value))
    except FusionRefused as e:
        an.invalidate(target, str(e))
    return None


def _border_side(index: Any, v: Affine | None) -> str | None:
    """Which padded border ``out[index]`` covers: top/bottom/left/right, or None."""
    if v is None or not v.border_debt or not isinstance(index, tuple) or len(index) != 4:
        return None
    if not all(isinstance(s, slice) and s.step in (None, 1) for s in index):
        return None
    full = slice(None, None, None)
    if index[0] != full or index[1] != full:
        return None
    k = v.kernel
    ph, pw = k.geom.padding if isinstance(k, ConvKernel) else (0, 0)

    def band(s: slice, p: int) -> str | None:
        if s.start in (None, 0) and s.stop == p:
            return "start"
        if s.start == -p and s.stop is None:
            return "end"
        return None

    if index[3] == full and ph:
        b = band(index[2], ph)
        return {"start": "top", "end": "bottom"}.get(b or "")
    if index[2] == full and pw:
        b = band(index[3], pw)
        return {"start": "left", "end": "right"}.get(b or "")
    return None


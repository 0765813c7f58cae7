"""Abstract values of the fusion pass: "this tensor is an affine map of that root tensor".

Every traced node gets an :class:`Affine`: either the identity of itself (an opaque tensor that
later ops may read), or a conv / linear kernel applied to an earlier root. Transfer functions
below extend a value through one more op and raise :class:`FusionRefused` when the result would
not be exactly one conv / linear.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
from torch import Tensor

from repconv import algebra as A
from repconv.algebra import ConvKernel, FusionRefused, LinearKernel

# a dense identity / diagonal for an FC layer is F x F in fp64: cap it well below memory limits
MAX_DENSE_FEATURES = 8192


class DifferentRoots(FusionRefused):
    """A merge of tensors that come from different inputs (a residual add): not a linear region."""


@dataclass
class Affine:
    """value = kernel(root). ``kernel is None`` means the identity (root itself)."""

    root: fx.Node
    kernel: ConvKernel | LinearKernel | None = None
    sources: frozenset[fx.Node] = frozenset()
    rank: int = 4
    channels: int = 0  # the root's dim 1 (image channels)
    features: int = 0  # the root's last dim (what nn.Linear / LayerNorm act on)
    # Borders written as zero by F.pad although the affine formula says "bias"; cleared by the
    # slice assignments that BN-and-pad layers perform. Non-empty means not a valid conv yet.
    border_debt: frozenset[str] = frozenset()
    pad_fill: Tensor | None = None
    # nodes absorbed whose role is bookkeeping only (slice assignments, dropout, ...)
    extra: frozenset[fx.Node] = frozenset()
    # applied to the graph when this value's region is materialized (LayerNorm affine stripping)
    root_fixes: tuple = field(default_factory=tuple)
    # consumers whose composition made the kernel bigger than its parts; if the whole region ends
    # up costing more than the original ops, the pass cuts the region at these points
    expensive: frozenset[fx.Node] = frozenset()
    adds: int = 0  # add / cat nodes absorbed (for branch counting)
    add_operands: int = 0

    @property
    def is_identity(self) -> bool:
        return self.kernel is None

    @property
    def is_conv(self) -> bool:
        """Can be read as a conv over dim 1 (an image conv, or the identity of an image)."""
        return isinstance(self.kernel, ConvKernel) or (self.kernel is None and self.rank == 4)

    @property
    def is_linear(self) -> bool:
        """Can be read as a map of the last dim (FC layers, channels-last blocks), any rank >= 2."""
        return isinstance(self.kernel, LinearKernel) or self.kernel is None

    @property
    def out_channels(self) -> int:
        if self.kernel is None:
            return self.channels if self.rank == 4 else self.features
        return int(self.kernel.weight.shape[0])

    @property
    def branches(self) -> int:
        return max(1, self.add_operands - self.adds + 1) if self.adds else 1

    def conv(self) -> ConvKernel:
        if isinstance(self.kernel, ConvKernel):
            return self.kernel
        if self.kernel is None and self.rank == 4:
            return A.identity(self.channels)
        raise FusionRefused("value is not a conv")

    def linear(self) -> LinearKernel:
        if isinstance(self.kernel, LinearKernel):
            return self.kernel
        if self.kernel is None:
            if self.features > MAX_DENSE_FEATURES:
                raise FusionRefused(f"identity on {self.features} features is too large to densify")
            eye = torch.eye(self.features, dtype=torch.float64)
            return LinearKernel(eye, torch.zeros(self.features, dtype=torch.float64))
        raise FusionRefused("value is not a linear map")

    def extend(self, node: fx.Node, kernel: ConvKernel | LinearKernel, **kw: object) -> Affine:
        return replace(self, kernel=kernel, sources=self.sources | {node}, **kw)


def identity_of(node: fx.Node) -> Affine | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) < 2:
        return None
    return Affine(root=node, rank=len(shape), channels=int(shape[1]), features=int(shape[-1]))


def _check_exact(v: Affine) -> None:
    if v.border_debt:
        raise FusionRefused("zero-padded border of a biased value is not refilled (not BN-and-pad)")


# --------------------------------------------------------------------------- transfer functions

def through_conv(node: fx.Node, v: Affine, k: ConvKernel) -> Affine:
    _check_exact(v)
    if not v.is_conv:
        raise FusionRefused("conv applied to a non-image value")
    if v.is_identity:
        return v.extend(node, k)
    first = v.conv()
    sh, sw = k.geom.stride  # the first op runs on sh*sw times as many pixels as the second
    return _chained(node, v, first, k, A.compose(first, k), sh * sw)


def _chained(node: fx.Node, v: Affine, first: ConvKernel | LinearKernel, second: ConvKernel | LinearKernel,
             fused: ConvKernel | LinearKernel, first_runs: int = 1) -> Affine:
    """``v`` extended by a composition; marked expensive when the fused kernel costs more than
    running both (a channel-reducing 1x1 before a KxK, a bottleneck MLP)."""
    if _macs(fused) > _macs(first) * first_runs + _macs(second):
        return v.extend(node, fused, expensive=v.expensive | {node})
    return v.extend(node, fused)


def _macs(k: ConvKernel | LinearKernel) -> int:
    """Multiply-adds per output pixel (conv) or per row (linear)."""
    return int(k.weight.numel())


def through_channel_affine(node: fx.Node, v: Affine, scale: Tensor, shift: Tensor, axis: str = "any") -> Affine:
    """BN, scalar / per-channel scale and shift. ``axis`` is where the op's channels live: "dim1"
    (BatchNorm, (C,1,1) constants), "last" (LayerNorm affine, (F,) constants) or "any" (scalars)."""
    _check_exact(v)
    if isinstance(v.kernel, ConvKernel):
        conv_mode = True
    elif isinstance(v.kernel, LinearKernel):
        conv_mode = False
    else:  # the identity: the op's axis decides how the value is read
        conv_mode = v.rank == 4 and axis != "last"
    if conv_mode and axis == "last" or not conv_mode and axis == "dim1" and v.rank != 2:
        raise FusionRefused("affine acts on a different axis than the preceding layer")
    c = (v.channels if conv_mode else v.features) if v.is_identity else v.out_channels
    scale = scale.to(torch.float64).reshape(-1).expand(c) if scale.numel() == 1 else scale.to(torch.float64)
    shift = shift.to(torch.float64).reshape(-1).expand(c) if shift.numel() == 1 else shift.to(torch.float64)
    if scale.numel() != c or shift.numel() != c:
        raise FusionRefused("per-channel constant does not match the channel count")
    if conv_mode:
        if v.is_identity:
            k = ConvKernel(scale.reshape(c, 1, 1, 1).clone(), shift.clone(), A.ConvGeometry(groups=c))
            return v.extend(node, k)
        return v.extend(node, A.conv_then_affine(v.conv(), scale, shift))
    if v.is_identity:
        if c > MAX_DENSE_FEATURES:
            raise FusionRefused("feature affine too large to densify")
        return v.extend(node, LinearKernel(torch.diag(scale), shift.clone()))
    return v.extend(node, A.linear_then_affine(v.linear(), scale, shift))


def through_linear(node: fx.Node, v: Affine, k: LinearKernel) -> Affine:
    _check_exact(v)
    if not v.is_linear:
        raise FusionRefused("linear (last dim) applied to a conv value (dim 1)")
    if v.is_identity:
        return v.extend(node, k)
    first = v.linear()
    return _chained(node, v, first, k, A.compose_linear(first, k))


def _conv_mode(values: list[Affine], conv_axis: bool) -> bool:
    """Conv (dim 1) or linear (last dim) reading for a merge; identities follow the others."""
    if any(isinstance(v.kernel, ConvKernel) for v in values):
        if any(isinstance(v.kernel, LinearKernel) for v in values):
            raise FusionRefused("merging a conv value with a linear one")
        return True
    if any(isinstance(v.kernel, LinearKernel) for v in values):
        return False
    return conv_axis


def through_add(node: fx.Node, values: list[Affine], signs: list[float]) -> Affine:
    roots = {v.root for v in values}
    if len(roots) != 1:
        raise DifferentRoots("branches start from different tensors")
    for v in values:
        _check_exact(v)
    if _conv_mode(values, values[0].rank == 4):
        if not all(v.is_conv for v in values):
            raise FusionRefused("adding values of different kinds")
        ks = [v.conv() for v in values]
        ks = [k if s == 1 else ConvKernel(k.weight * s, k.bias * s, k.geom) for k, s in zip(ks, signs, strict=True)]
        kernel: ConvKernel | LinearKernel = A.add(ks)
    else:
        ls = [v.linear() for v in values]
        kernel = LinearKernel(sum(s * k.weight for k, s in zip(ls, signs, strict=True)),
                              sum(s * k.bias for k, s in zip(ls, signs, strict=True)))
    return _merged(node, values, kernel, _grows(kernel, values))


def through_concat(node: fx.Node, values: list[Affine], dim: int) -> Affine:
    """torch.cat of branches: along dim 1 of images (conv) or along the last dim (linear)."""
    roots = {v.root for v in values}
    if len(roots) != 1:
        raise DifferentRoots("concatenated branches start from different tensors")
    for v in values:
        _check_exact(v)
    rank = values[0].rank
    along_channels = rank == 4 and dim in (1, -3)
    along_last = dim in (-1, rank - 1)
    if along_channels and _conv_mode(values, True) and all(v.is_conv for v in values):
        kernel: ConvKernel | LinearKernel = A.concat([v.conv() for v in values])
    elif along_last and not _conv_mode(values, False):
        ls = [v.linear() for v in values]
        kernel = LinearKernel(torch.cat([k.weight for k in ls]), torch.cat([k.bias for k in ls]))
    else:
        raise FusionRefused("concatenation along an axis the branches do not map")
    return _merged(node, values, kernel, _grows(kernel, values))


def _grows(kernel: ConvKernel | LinearKernel, values: list[Affine]) -> bool:
    """A merge that costs more than its branches (PSConv's dilations in one sparse 9x9 kernel)."""
    parts = sum(_macs(v.kernel) if v.kernel is not None else v.out_channels for v in values)
    return _macs(kernel) > parts


def _merged(node: fx.Node, values: list[Affine], kernel: ConvKernel | LinearKernel, grows: bool) -> Affine:
    first = values[0]
    sources = frozenset().union(*(v.sources for v in values)) | {node}
    extra = frozenset().union(*(v.extra for v in values))
    fixes = tuple(f for v in values for f in v.root_fixes)
    expensive = frozenset().union(*(v.expensive for v in values)) | ({node} if grows else frozenset())
    return replace(first, kernel=kernel, sources=sources, extra=extra, root_fixes=fixes, expensive=expensive,
                   adds=sum(v.adds for v in values) + 1,
                   add_operands=sum(v.add_operands for v in values) + len(values))


def through_zero_pad(node: fx.Node, v: Affine, pads: tuple[int, int]) -> Affine:
    """F.pad with zeros. Exact only for a per-pixel value: zero-pad then channel mix. A biased value
    gets a border debt that BN-and-pad's slice assignments pay back."""
    _check_exact(v)
    if not v.is_conv:
        raise FusionRefused("padding a non-image value")
    k = v.conv()
    if not k.is_pointwise or (any(k.geom.padding) and k.geom.padding_mode != "zeros"):
        raise FusionRefused("zero padding after a spatial conv changes its border")
    ph, pw = pads
    geom = replace(k.geom, padding=(k.geom.padding[0] + ph, k.geom.padding[1] + pw))
    kernel = ConvKernel(k.weight, k.bias, geom)
    debt: frozenset[str] = frozenset()
    if bool((k.bias != 0).any()):
        debt = frozenset(s for s, p in (("top", ph), ("bottom", ph), ("left", pw), ("right", pw)) if p)
    return replace(v, kernel=kernel, sources=v.sources | {node}, border_debt=debt, pad_fill=k.bias)


def fill_border(node: fx.Node, v: Affine, side: str, fill: Tensor) -> Affine:
    """``v[border] = fill``: pays the border debt when ``fill`` equals the value's bias."""
    if side not in v.border_debt or v.pad_fill is None:
        raise FusionRefused("slice assignment that is not a BN-and-pad border fill")
    want = v.pad_fill
    got = fill.detach().to(torch.float64).reshape(-1)
    if got.numel() == 1:
        got = got.expand_as(want)
    tol = 1e-5 * float(want.abs().max()) + 1e-6
    if got.shape != want.shape or float((got - want).abs().max()) > tol:
        raise FusionRefused("border filled with a value other than the BN shift")
    return replace(v, border_debt=v.border_debt - {side}, extra=v.extra | {node})


def passthrough(node: fx.Node, v: Affine) -> Affine:
    return replace(v, extra=v.extra | {node})

"""Abstract values of the fusion pass: "this tensor is an affine map of that root tensor".

Every traced node gets an :class:`Affine`: either the identity of itself (an opaque tensor that
later ops may read), or a conv / linear kernel applied to an earlier root. Transfer functions
below extend a value through one more op and raise :class:`FusionRefused` when the result would
not be exactly one conv / linear.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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



Kernel = ConvKernel | LinearKernel


class Term:
    """One original branch's share of a value: the value's kernel is the sum of its terms' kernels
    (each in the geometry its branch had; aligned to the result when a region is built). ``nodes``
    are the branch's ops, for naming it; a shift applied after branches met is a term of its own
    with a zero weight (``shift_only``).

    A term's kernel is computed on first use (``make``): most values never become a region, and the
    branches of those that do are only asked for by quantization analysis."""

    __slots__ = ("nodes", "shift_only", "_kernel", "_make")

    def __init__(self, nodes: frozenset[fx.Node], kernel: Kernel | None = None,
                 make: Callable[[], Kernel] | None = None, shift_only: bool = False):
        self.nodes, self.shift_only, self._kernel, self._make = nodes, shift_only, kernel, make

    @property
    def kernel(self) -> Kernel:
        """Raises FusionRefused when this branch alone cannot be expressed (the sum could)."""
        if self._kernel is None:
            self._kernel, self._make = self._make(), None
        return self._kernel

    def then(self, f: Callable[[Kernel], Kernel], nodes: frozenset[fx.Node] | None = None) -> Term:
        """This term with ``f`` applied to its kernel, lazily."""
        return Term(self.nodes if nodes is None else nodes, make=lambda: f(self.kernel), shift_only=self.shift_only)


def _without_bias(k: Kernel) -> Kernel:
    if isinstance(k, ConvKernel):
        return ConvKernel(k.weight, torch.zeros_like(k.bias), k.geom)
    return LinearKernel(k.weight, torch.zeros_like(k.bias))


def _zero_weight(k: Kernel, shift: Tensor) -> Kernel:
    if isinstance(k, ConvKernel):
        return ConvKernel(torch.zeros_like(k.weight), shift.clone(), k.geom)
    return LinearKernel(torch.zeros_like(k.weight), shift.clone())


@dataclass
class Affine:
    """value = kernel(root). ``kernel is None`` means the identity (root itself)."""

    root: fx.Node
    kernel: ConvKernel | LinearKernel | None = None
    sources: frozenset[fx.Node] = frozenset()
    rank: int = 4
    channels: int = 0  # the root's dim 1 (image channels)
    features: int = 0  # the root's last dim (what nn.Linear / LayerNorm act on)
    # Borders written as zero by F.pad although the affine formula says "bias": the sides, and
    # ``pad_debt`` = formula - actual value there (per channel). Slice assignments of BN-and-pad
    # layers clear sides; a later channel affine scales the debt (``F.pad(y - s) + s`` leaves only
    # the rounding of s). A value with a debt that is not negligible is not a conv yet.
    border_debt: frozenset[str] = frozenset()
    pad_debt: Tensor | None = None
    # nodes absorbed whose role is bookkeeping only (slice assignments, dropout, ...)
    extra: frozenset[fx.Node] = frozenset()
    # applied to the graph when this value's region is materialized (LayerNorm affine stripping)
    root_fixes: tuple = field(default_factory=tuple)
    # consumers whose composition made the kernel bigger than its parts; if the whole region ends
    # up costing more than the original ops, the pass cuts the region at these points
    expensive: frozenset[fx.Node] = frozenset()
    adds: int = 0  # add / cat nodes absorbed (for branch counting)
    add_operands: int = 0
    # the additive decomposition by original branch (quantization attribution); None = not tracked
    terms: tuple[Term, ...] | None = ()
    # first op of a chain of leading-dim reshapes (flatten(0, 1) around BatchNorm1d) that has not
    # returned to the root's leading shape: the region may not end there
    view_start: fx.Node | None = None
    # the kernel reads ``root.permute(*root_perm)``: a channels-last map (timm's LayerNorm2d affine)
    # turned into a conv over dim 1 by ``permute(0, 3, 1, 2)``
    root_perm: tuple[int, ...] | None = None
    # the kernel reads ``F.pad(root, pre_pad)``: an asymmetric zero padding (left, right, top,
    # bottom) before a conv, as TF-style "same" padding writes it; one conv has one symmetric padding,
    # so the fused form is that explicit pad and one conv
    pre_pad: tuple[int, int, int, int] | None = None

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
        return int(self.kernel.out_channels if isinstance(self.kernel, ConvKernel) else self.kernel.weight.shape[0])

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

    def extend(self, node: fx.Node, kernel: Kernel, first: Kernel | None = None,
               compose: Callable[[Kernel, Kernel], Kernel] | None = None, **kw: object) -> Affine:
        """This value followed by ``node``; ``kernel`` is the result. When ``node`` applies a kernel
        ``first`` by ``compose`` (``kernel == compose(self.kernel, first)``), several branches' terms
        each go through it; otherwise the value must be a single branch (or the identity)."""
        return replace(self, kernel=kernel, sources=self.sources | {node},
                       terms=self._next_terms(node, kernel, first, compose), **kw)

    def _next_terms(self, node: fx.Node, kernel: Kernel, op: Kernel | None,
                    compose: Callable[[Kernel, Kernel], Kernel] | None) -> tuple[Term, ...] | None:
        if self.terms is None:
            return None
        if not self.terms:  # the identity extended: a branch starts here
            return (Term(frozenset({node}), kernel),)
        if len(self.terms) == 1:  # one branch continues
            return (Term(self.terms[0].nodes | {node}, kernel),)
        if op is None or compose is None:
            return None
        # each branch through the op's linear part; its bias is a term of its own
        linear = _without_bias(op)
        out = tuple(t.then(lambda k: compose(k, linear)) for t in self.terms)
        if bool((op.bias != 0).any()):
            first = out[0]
            out += (Term(frozenset({node}), make=lambda: _zero_weight(first.kernel, op.bias), shift_only=True),)
        return out

    def own_terms(self) -> tuple[Term, ...] | None:
        """Terms for a merge; a value that is no branch yet (the identity: RepVGG's bare identity
        branch, or a padded identity) is one branch of its own."""
        if self.terms is None or self.terms:
            return self.terms
        k = self.kernel if self.kernel is not None else self.conv() if self.is_conv else self.linear()
        return (Term(self.sources or frozenset({self.root}), k),)


def identity_of(node: fx.Node) -> Affine | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) < 2:
        return None
    return Affine(root=node, rank=len(shape), channels=int(shape[1]), features=int(shape[-1]))


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def _check_exact(v: Affine) -> None:
    if v.border_debt and not _negligible(v.pad_debt, v.kernel.bias):
        raise FusionRefused("zero-padded border of a biased value is not refilled (not BN-and-pad)")


def _negligible(debt: Tensor | None, bias: Tensor) -> bool:
    """A border debt that is only the fp32 rounding of constants the model computed itself (the BN
    shift written back by ``F.pad(y - s) + s``): ~1e-7 of the bias, far below any real mistake."""
    if debt is None or not debt.numel():
        return True
    return float(debt.abs().max()) <= 1e-5 * float(bias.abs().max()) + 1e-12


# --------------------------------------------------------------------------- transfer functions

def through_conv(node: fx.Node, v: Affine, k: ConvKernel) -> Affine:
    _check_exact(v)
    if not v.is_conv:
        raise FusionRefused("conv applied to a non-image value")
    if v.is_identity:
        return v.extend(node, k)
    first = v.conv()
    sh, sw = k.geom.stride  # the first op runs on sh*sw times as many pixels as the second
    return _chained(node, v, first, k, A.compose_deferred(first, k), A.compose, sh * sw)


def _chained(node: fx.Node, v: Affine, first: Kernel, second: Kernel, fused: Kernel,
             compose: Callable[[Kernel, Kernel], Kernel], first_runs: int = 1) -> Affine:
    """``v`` extended by a composition; marked expensive when the fused kernel costs more than
    running both (a channel-reducing 1x1 before a KxK, a bottleneck MLP)."""
    expensive = v.expensive | {node} if macs(fused) > macs(first) * first_runs + macs(second) else v.expensive
    return v.extend(node, fused, second, compose, expensive=expensive)


def macs(k: Kernel) -> int:
    """Multiply-adds per output pixel (conv) or per row (linear); from the shape alone, so a deferred
    composition is weighed without being computed."""
    return math.prod(k.shape) if isinstance(k, ConvKernel) else int(k.weight.numel())


def through_channel_affine(node: fx.Node, v: Affine, scale: Tensor, shift: Tensor, axis: str = "any") -> Affine:
    """BN, scalar / per-channel scale and shift. ``axis`` is where the op's channels live: "dim1"
    (BatchNorm, (C,1,1) constants), "last" (LayerNorm affine, (F,) constants) or "any" (scalars).
    A border debt goes along, scaled (the shift lands on border and formula alike)."""
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
        op: Kernel = ConvKernel(scale.reshape(c, 1, 1, 1).clone(), shift.clone(), A.ConvGeometry(groups=c))
        if v.is_identity:
            return v.extend(node, op)
        debt = v.pad_debt * scale if v.border_debt and v.pad_debt is not None else v.pad_debt
        return v.extend(node, A.conv_then_affine(v.conv(), scale, shift), op, _then_channel_affine, pad_debt=debt)
    if v.is_identity:
        if c > MAX_DENSE_FEATURES:
            raise FusionRefused("feature affine too large to densify")
        return v.extend(node, LinearKernel(torch.diag(scale), shift.clone()))
    op = LinearKernel(torch.diag(scale), shift.clone())
    return v.extend(node, A.linear_then_affine(v.linear(), scale, shift), op, _then_channel_affine)


def _then_channel_affine(k: Kernel, op: Kernel) -> Kernel:
    """``k`` followed by the diagonal ``op`` built in :func:`through_channel_affine`."""
    if isinstance(k, ConvKernel):
        return A.conv_then_affine(k, op.weight.reshape(-1), op.bias)
    return A.linear_then_affine(k, torch.diagonal(op.weight), op.bias)


def through_linear(node: fx.Node, v: Affine, k: LinearKernel) -> Affine:
    _check_exact(v)
    if not v.is_linear:
        raise FusionRefused("linear (last dim) applied to a conv value (dim 1)")
    if v.is_identity:
        return v.extend(node, k)
    first = v.linear()
    return _chained(node, v, first, k, A.compose_linear(first, k), A.compose_linear)


def _conv_mode(values: list[Affine], conv_axis: bool) -> bool:
    """Conv (dim 1) or linear (last dim) reading for a merge; identities follow the others."""
    if any(isinstance(v.kernel, ConvKernel) for v in values):
        if any(isinstance(v.kernel, LinearKernel) for v in values):
            raise FusionRefused("merging a conv value with a linear one")
        return True
    if any(isinstance(v.kernel, LinearKernel) for v in values):
        return False
    return conv_axis


def _scaled(k: Kernel, s: float) -> Kernel:
    if s == 1:
        return k
    return ConvKernel(k.weight * s, k.bias * s, k.geom) if isinstance(k, ConvKernel) else \
        LinearKernel(k.weight * s, k.bias * s)


def through_add(node: fx.Node, values: list[Affine], signs: list[float]) -> Affine:
    """A weighted sum of branches on one root (signs are the weights: ``a - b``, ``add(alpha=)``, mean)."""
    roots = {(v.root, v.root_perm, v.pre_pad) for v in values}
    if len(roots) != 1:
        raise DifferentRoots("branches start from different tensors (or differently padded)")
    for v in values:
        _check_exact(v)
    if _conv_mode(values, values[0].rank == 4):
        if not all(v.is_conv for v in values):
            raise FusionRefused("adding values of different kinds")
        kernel: Kernel = A.add([_scaled(v.conv(), s) for v, s in zip(values, signs, strict=True)])
    else:
        ls = [v.linear() for v in values]
        kernel = LinearKernel(sum(s * k.weight for k, s in zip(ls, signs, strict=True)),
                              sum(s * k.bias for k, s in zip(ls, signs, strict=True)))
    parts = [v.own_terms() for v in values]
    terms = None if any(p is None for p in parts) else tuple(
        t if s == 1 else t.then(lambda k, s=s: _scaled(k, s)) for p, s in zip(parts, signs, strict=True) for t in p)
    return _merged(node, values, kernel, _grows(kernel, values), terms)


def through_concat(node: fx.Node, values: list[Affine], dim: int) -> Affine:
    """torch.cat of branches: along dim 1 of images (conv) or along the last dim (linear)."""
    roots = {(v.root, v.root_perm, v.pre_pad) for v in values}
    if len(roots) != 1:
        raise DifferentRoots("concatenated branches start from different tensors")
    for v in values:
        _check_exact(v)
    if len(values) == 1:  # torch.cat([x], 1) is x itself (DenseNet's first layer)
        return passthrough(node, values[0])
    rank = values[0].rank
    along_channels = rank == 4 and dim in (1, -3)
    along_last = dim in (-1, rank - 1)
    if along_channels and _conv_mode(values, True) and all(v.is_conv for v in values):
        kernel: Kernel = A.concat([v.conv() for v in values])
    elif along_last and not _conv_mode(values, False):
        ls = [v.linear() for v in values]
        kernel = LinearKernel(torch.cat([k.weight for k in ls]), torch.cat([k.bias for k in ls]))
    else:
        raise FusionRefused("concatenation along an axis the branches do not map")
    return _merged(node, values, kernel, _grows(kernel, values), None)  # branch shares: not tracked


def _grows(kernel: Kernel, values: list[Affine]) -> bool:
    """A merge that costs more than its branches (PSConv's dilations in one sparse 9x9 kernel)."""
    parts = sum(macs(v.kernel) if v.kernel is not None else v.out_channels for v in values)
    return macs(kernel) > parts


def _merged(node: fx.Node, values: list[Affine], kernel: Kernel, grows: bool,
            terms: tuple[Term, ...] | None) -> Affine:
    first = values[0]
    sources = frozenset().union(*(v.sources for v in values)) | {node}
    extra = frozenset().union(*(v.extra for v in values))
    fixes = tuple(f for v in values for f in v.root_fixes)
    expensive = frozenset().union(*(v.expensive for v in values)) | ({node} if grows else frozenset())
    starts = [v.view_start for v in values if v.view_start is not None]
    return replace(first, kernel=kernel, sources=sources, extra=extra, root_fixes=fixes, expensive=expensive,
                   adds=sum(v.adds for v in values) + 1, terms=terms, view_start=starts[0] if starts else None,
                   add_operands=sum(v.add_operands for v in values) + len(values))


def through_pad(node: fx.Node, v: Affine, pads: tuple[int, int], mode: str = "zeros") -> Affine:
    """F.pad of a per-pixel value. Reflect / replicate / circular padding commutes with any per-pixel
    channel map (bias included): the result is that map with the padding in its geometry. Zero
    padding of a biased value leaves a border debt that BN-and-pad's border fills pay back (or a
    later ``+ shift`` of the value it was shifted by before the pad: ``F.pad(y - s) + s``)."""
    _check_exact(v)
    if not v.is_conv:
        raise FusionRefused("padding a non-image value")
    k = v.conv()
    if not k.is_pointwise or any(k.geom.padding) and k.geom.padding_mode != mode:
        raise FusionRefused("padding after a spatial conv (or a different padding mode) changes its border")
    ph, pw = pads

    def padded(t: Kernel) -> Kernel:
        return ConvKernel(t.weight, t.bias, replace(t.geom, padding=(t.geom.padding[0] + ph, t.geom.padding[1] + pw),
                                                       padding_mode=mode))

    terms = None if v.terms is None else tuple(t.then(padded) for t in v.own_terms())
    debt: frozenset[str] = frozenset()
    if mode == "zeros" and bool((k.bias != 0).any()):
        debt = frozenset(s for s, p in (("top", ph), ("bottom", ph), ("left", pw), ("right", pw)) if p)
    return replace(v, kernel=padded(k), sources=v.sources | {node}, border_debt=debt, pad_debt=k.bias.clone(),
                   terms=terms if not v.is_identity else ())


def fill_border(node: fx.Node, v: Affine, side: str, fill: Tensor) -> Affine:
    """``v[border] = fill``: pays the border debt when ``fill`` equals the value's bias."""
    if side not in v.border_debt or not isinstance(v.kernel, ConvKernel):
        raise FusionRefused("slice assignment that is not a BN-and-pad border fill")
    want = v.kernel.bias
    got = fill.detach().to(torch.float64).reshape(-1)
    if got.numel() == 1:
        got = got.expand_as(want)
    tol = 1e-5 * float(want.abs().max()) + 1e-6
    if got.shape != want.shape or float((got - want).abs().max()) > tol:
        raise FusionRefused("border filled with a value other than the BN shift")
    return replace(v, border_debt=v.border_debt - {side}, extra=v.extra | {node})


def passthrough(node: fx.Node, v: Affine) -> Affine:
    """An op that returns its input unchanged (dropout in eval, clone, a one-tensor cat)."""
    return replace(v, extra=v.extra | {node})


def through_view(node: fx.Node, v: Affine, out_shape: tuple[int, ...]) -> Affine:
    """A reshape of the leading dims of a value mapped along its last dim (LeViT's
    ``bn(x.flatten(0, 1)).reshape_as(x)``): the map commutes with it. The region may only end where
    the leading dims are the root's again (``view_start`` remembers where the chain began)."""
    if not v.is_linear or v.is_identity and v.rank == 4:
        raise FusionRefused("reshape of an image value")
    root_shape = shape_of(v.root)
    if root_shape is None or out_shape[-1] != v.out_channels:
        raise FusionRefused("reshape changes the mapped (last) dim")
    back = out_shape[:-1] == root_shape[:-1]
    start = None if back else (v.view_start or node.args[0])
    return replace(v, rank=len(out_shape), extra=v.extra | {node}, view_start=start)


def through_permute(node: fx.Node, v: Affine, dims: tuple[int, ...]) -> Affine:
    """``y.permute(0, 3, 1, 2)`` of a channels-last feature map: the map becomes a 1x1 conv of the
    permuted root (LayerNorm2d's affine can then fold into the next conv)."""
    if not isinstance(v.kernel, LinearKernel) or v.rank != 4 or tuple(dims) != (0, 3, 1, 2) or v.root_perm:
        raise FusionRefused("permute of a value other than a channels-last feature map")
    _check_exact(v)
    k = v.kernel
    conv = ConvKernel(k.weight[:, :, None, None].contiguous(), k.bias.clone(), A.ConvGeometry())
    terms = None if v.terms is None else tuple(
        t.then(lambda lk: ConvKernel(lk.weight[:, :, None, None], lk.bias, A.ConvGeometry())) for t in v.own_terms())
    return replace(v, kernel=conv, root_perm=(0, 3, 1, 2), extra=v.extra | {node}, channels=conv.out_channels,
                   terms=terms)


def through_asymmetric_pad(node: fx.Node, v: Affine, pads: tuple[int, int, int, int]) -> Affine:
    """Zero padding with different amounts on two sides, of the root or of a bias-free per-pixel map
    of it (zero maps to zero, so padding first is the same): kept as an explicit pad of the root."""
    _check_exact(v)
    if not v.is_conv or v.root_perm:
        raise FusionRefused("asymmetric padding of a non-image value")
    k = v.conv()
    if not k.is_pointwise or any(k.geom.padding) or bool((k.bias != 0).any()):
        raise FusionRefused("asymmetric padding after a spatial or biased op: one conv pads symmetrically")
    total = pads if v.pre_pad is None else tuple(a + b for a, b in zip(v.pre_pad, pads, strict=True))
    terms = () if v.is_identity else v.terms
    return replace(v, kernel=k, pre_pad=total, sources=v.sources | {node}, terms=terms)

"""Fusion algebra for 2-D convolutions: pure functions on (weight, bias, geometry).

Every function takes and returns :class:`ConvKernel` values (or plain tensors) and never touches an
``nn.Module``. Callers promote to float64 first (:func:`ConvKernel.double`) and cast back at the
end, so folding error stays near fp64 round-off. A rule that would not be exact raises
:class:`FusionRefused` with the reason instead of returning an approximation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

Pair = tuple[int, int]


class FusionRefused(ValueError):
    """A rewrite would not be exact; the message says why."""


def _pair(v: int | tuple[int, ...]) -> Pair:
    if isinstance(v, int):
        return (v, v)
    if len(v) == 1:
        return (int(v[0]), int(v[0]))
    return (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a Conv2d except its tensors."""

    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"

    @staticmethod
    def of(conv: torch.nn.Conv2d) -> ConvGeometry:
        if isinstance(conv.padding, str):
            raise FusionRefused(f"string padding {conv.padding!r} is resolved only at run time")
        return ConvGeometry(_pair(conv.stride), _pair(conv.padding), _pair(conv.dilation),
                            conv.groups, conv.padding_mode)


@dataclass
class ConvKernel:
    """out = conv2d(x, weight, bias, geometry). weight is (O, I/groups, kh, kw)."""

    weight: Tensor
    bias: Tensor
    geom: ConvGeometry = ConvGeometry()

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.geom.groups

    @property
    def kernel_size(self) -> Pair:
        return (self.weight.shape[2], self.weight.shape[3])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The weight's shape (known without computing a deferred kernel)."""
        return tuple(self.weight.shape)

    @property
    def is_pointwise(self) -> bool:
        """1x1 kernel, stride 1: acts on each pixel independently (padding may be non-zero)."""
        return self.kernel_size == (1, 1) and self.geom.stride == (1, 1)

    def to(self, dtype: torch.dtype) -> ConvKernel:
        return ConvKernel(self.weight.to(dtype), self.bias.to(dtype), self.geom)

    def double(self) -> ConvKernel:
        return self.to(torch.float64)

    @staticmethod
    def of(conv: torch.nn.Conv2d) -> ConvKernel:
        w = conv.weight.detach()
        b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        return ConvKernel(w, b, ConvGeometry.of(conv))

    def apply(self, x: Tensor) -> Tensor:
        """Reference evaluation (used by tests and verification)."""
        g = self.geom
        if g.padding_mode != "zeros" and any(g.padding):
            ph, pw = g.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=g.padding_mode)
            return F.conv2d(x, self.weight, self.bias, g.stride, 0, g.dilation, g.groups)
        return F.conv2d(x, self.weight, self.bias, g.stride, g.padding, g.dilation, g.groups)

    def to_module(self, dtype: torch.dtype | None = None, device: torch.device | None = None,
                  bias: bool = True) -> torch.nn.Conv2d:
        g = self.geom
        dtype = dtype or self.weight.dtype
        # built directly in the target dtype (a default fp32 module would round fp64 weights) and
        # without the random init the copy overwrites anyway (seconds for a 100M-parameter model)
        conv = torch.nn.utils.skip_init(torch.nn.Conv2d, self.in_channels, self.out_channels, self.kernel_size,
                                        g.stride, g.padding, g.dilation, g.groups, bias=bias,
                                        padding_mode=g.padding_mode, dtype=dtype, device=device)
        with torch.no_grad():
            conv.weight.copy_(self.weight.to(dtype))
            if bias:
                conv.bias.copy_(self.bias.to(dtype))
        return conv


# --------------------------------------------------------------------------- BatchNorm as channel affine

def bn_scale_shift(running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None,
                   eps: float) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as y = scale * x + shift, per channel (affine off means weight 1, bias 0)."""
    if running_mean is None or running_var is None:
        raise FusionRefused("BatchNorm has no running statistics (track_running_stats=False)")
    std = torch.sqrt(running_var + eps)
    scale = (weight if weight is not None else torch.ones_like(std)) / std
    shift = (bias if bias is not None else torch.zeros_like(std)) - running_mean * scale
    return scale, shift


def bn_module_scale_shift(bn: torch.nn.modules.batchnorm._BatchNorm,
                          dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    def t(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.detach().to(dtype)

    return bn_scale_shift(t(bn.running_mean), t(bn.running_var), t(bn.weight), t(bn.bias), bn.eps)


def conv_then_affine(k: ConvKernel, scale: Tensor, shift: Tensor) -> ConvKernel:
    """Conv followed by a per-output-channel affine (BN, scalar scale): always exact."""
    return ConvKernel(k.weight * scale.reshape(-1, 1, 1, 1), k.bias * scale + shift, k.geom)


def fuse_conv_bn(k: ConvKernel, bn_scale: Tensor, bn_shift: Tensor) -> ConvKernel:
    return conv_then_affine(k, bn_scale, bn_shift)


def affine_then_conv(scale: Tensor, shift: Tensor, k: ConvKernel) -> ConvKernel:
    """Per-input-channel affine (BN before a conv) folded into the conv.

    Exact unless zero padding would meet a non-zero shift: the conv then sees zeros where the
    original saw BN(0) = shift. Replicate/reflect/circular padding commute with a channel affine.
    """
    g = k.geom
    if any(g.padding) and g.padding_mode == "zeros" and bool((shift != 0).any()):
        raise FusionRefused("BN before a zero-padded conv: padded border would see 0 instead of the BN "
                            "shift (fold it into a preceding conv instead)")
    groups = g.groups
    o, ig = k.weight.shape[:2]
    s = scale.reshape(groups, 1, ig, 1, 1)
    w = (k.weight.reshape(groups, o // groups, ig, *k.kernel_size) * s).reshape_as(k.weight)
    # bias: sum_w W[o, i] * shift[i] over every tap
    sh = shift.reshape(groups, 1, ig)
    b = k.bias + (k.weight.reshape(groups, o // groups, ig, -1).sum(-1) * sh).sum(-1).reshape(o)
    return ConvKernel(w, b, g)


def fuse_bn_conv(bn_scale: Tensor, bn_shift: Tensor, k: ConvKernel) -> ConvKernel:
    return affine_then_conv(bn_scale, bn_shift, k)


# --------------------------------------------------------------------------- kernel reshaping

def expand_dilation(k: ConvKernel) -> ConvKernel:
    """A dilated kernel as an undilated one with zeros between taps (same output)."""
    dh, dw = k.geom.dilation
    if (dh, dw) == (1, 1):
        return k
    o, i, kh, kw = k.weight.shape
    w = k.weight.new_zeros(o, i, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    w[:, :, ::dh, ::dw] = k.weight
    return ConvKernel(w, k.bias, replace(k.geom, dilation=(1, 1)))


def to_groups(k: ConvKernel, groups: int) -> ConvKernel:
    """Re-express a conv with fewer groups (``groups`` must divide the current count)."""
    g0 = k.geom.groups
    if groups == g0:
        return k
    if g0 % groups:
        raise FusionRefused(f"cannot re-express groups={g0} as groups={groups}")
    o, ig, kh, kw = k.weight.shape
    ratio = g0 // groups
    og = o // g0
    # output channel oc belongs to old group oc // og, which sits at slot (oc // og) % ratio of its new group
    rows = torch.arange(o)[:, None]
    cols = ((torch.arange(o) // og) % ratio * ig)[:, None] + torch.arange(ig)[None, :]
    w = k.weight.new_zeros(o, ig * ratio, kh, kw)
    w[rows, cols] = k.weight
    return ConvKernel(w, k.bias, replace(k.geom, groups=groups))


def _offset(k: ConvKernel) -> tuple[float, float]:
    """Where the kernel's footprint sits relative to the output pixel, for 'same output size' checks.

    Output size is (H + 2p - d(k-1) - 1)/s + 1; two convs agree on it for every H iff
    2p - d(k-1) agrees. That quantity is what we compare.
    """
    (ph, pw), (dh, dw) = k.geom.padding, k.geom.dilation
    kh, kw = k.kernel_size
    return (2 * ph - dh * (kh - 1), 2 * pw - dw * (kw - 1))


def _adopt_dilation(kernels: list[ConvKernel]) -> list[ConvKernel]:
    """A size-1 kernel axis reads a single tap, so its dilation is arbitrary: give it the dilation the
    larger kernels share, so a dilated KxK plus a 1x1 (dilated RepVGG) stays a dilated KxK instead
    of being expanded to a dense (d(K-1)+1)^2 kernel."""
    shared = []
    for axis in (0, 1):
        ds = {k.geom.dilation[axis] for k in kernels if k.kernel_size[axis] > 1}
        shared.append(ds.pop() if len(ds) == 1 else None)
    if shared == [None, None]:
        return kernels
    out = []
    for k in kernels:
        dil = tuple(shared[a] if shared[a] is not None and k.kernel_size[a] == 1 else k.geom.dilation[a]
                    for a in (0, 1))
        out.append(ConvKernel(k.weight, k.bias, replace(k.geom, dilation=dil)))
    return out


def align(kernels: list[ConvKernel]) -> list[ConvKernel]:
    """Bring kernels that read the same input onto one geometry (common padding, size, dilation,
    groups) by zero-padding small kernels into the largest: DBB transform VI, ACNet's 1xK/Kx1."""
    if not kernels:
        raise ValueError("nothing to align")
    strides = {k.geom.stride for k in kernels}
    # an unpadded kernel never reads the border, so its padding mode is whatever the others use
    modes = {k.geom.padding_mode for k in kernels if any(k.geom.padding)}
    if len(strides) > 1:
        raise FusionRefused(f"branches have different strides {sorted(strides)}")
    if len({k.in_channels for k in kernels}) > 1:
        raise FusionRefused("branches read different channel counts")
    if len({_offset(k) for k in kernels}) > 1:
        raise FusionRefused("branches are not centred alike (2p - d(k-1) differs), outputs would not align")
    if len(modes) > 1:
        raise FusionRefused(f"branches mix padding modes {sorted(modes)}")
    kernels = _adopt_dilation(kernels)
    if len({k.geom.dilation for k in kernels}) > 1:
        kernels = [expand_dilation(k) for k in kernels]
    groups = math.gcd(*[k.geom.groups for k in kernels])
    kernels = [to_groups(k, groups) for k in kernels]
    ph = max(k.geom.padding[0] for k in kernels)
    pw = max(k.geom.padding[1] for k in kernels)
    out = []
    for k in kernels:
        dh, dw = k.geom.dilation
        top, left = ph - k.geom.padding[0], pw - k.geom.padding[1]
        kh, kw = k.kernel_size
        # footprint is centred alike, so the same amount goes on both sides (in dilated taps)
        if top % dh or left % dw:
            raise FusionRefused("padding difference is not a multiple of the dilation")
        th, tw = top // dh, left // dw
        w = F.pad(k.weight, (tw, tw, th, th)) if th or tw else k.weight  # F.pad copies even for 0
        out.append(ConvKernel(w, k.bias, replace(k.geom, padding=(ph, pw))))
    sizes = {o.kernel_size for o in out}
    if len(sizes) > 1:  # cannot happen when offsets agree; guard against a silent mismatch
        raise FusionRefused(f"aligned kernels still differ in size: {sorted(sizes)}")
    mode = next(iter(modes)) if len(modes) == 1 else "zeros"
    return [ConvKernel(o.weight, o.bias, replace(o.geom, padding_mode=mode)) for o in out]


def pad_kernel(k: ConvKernel, kernel_size: Pair) -> ConvKernel:
    """Centre a small kernel inside a larger one, adding the matching padding (DBB transform VI)."""
    kh, kw = k.kernel_size
    th, tw = kernel_size
    if (th - kh) % 2 or (tw - kw) % 2 or th < kh or tw < kw:
        raise FusionRefused(f"cannot centre a {kh}x{kw} kernel in {th}x{tw}")
    dh, dw = k.geom.dilation
    ph, pw = (th - kh) // 2, (tw - kw) // 2
    w = F.pad(k.weight, (pw, pw, ph, ph))
    pad = (k.geom.padding[0] + ph * dh, k.geom.padding[1] + pw * dw)
    return ConvKernel(w, k.bias, replace(k.geom, padding=pad))


def add(kernels: list[ConvKernel]) -> ConvKernel:
    """Sum of parallel branches on the same input (DBB transform II)."""
    aligned = align(kernels)
    if len(aligned) == 1:
        return ConvKernel(aligned[0].weight.clone(), aligned[0].bias.clone(), aligned[0].geom)
    w, b = aligned[0].weight + aligned[1].weight, aligned[0].bias + aligned[1].bias
    for k in aligned[2:]:  # in place: the kernels of a wide layer are hundreds of MB in fp64
        w += k.weight
        b += k.bias
    return ConvKernel(w, b, aligned[0].geom)


def concat(kernels: list[ConvKernel]) -> ConvKernel:
    """Channel concatenation of parallel branches (DBB transform IV)."""
    aligned = align(kernels)
    if aligned[0].geom.groups != 1:
        aligned = [to_groups(k, 1) for k in aligned]
    return ConvKernel(torch.cat([k.weight for k in aligned]), torch.cat([k.bias for k in aligned]),
                      aligned[0].geom)


# --------------------------------------------------------------------------- special kernels

def identity(channels: int, groups: int | None = None, kernel_size: Pair = (1, 1),
             dtype: torch.dtype = torch.float64) -> ConvKernel:
    """The identity map as a conv (RepVGG's identity branch). Depthwise by default; ``groups`` may
    be any divisor of ``channels`` (each group's block is an identity)."""
    groups = groups or channels
    ig = channels // groups
    kh, kw = kernel_size
    w = torch.zeros(channels, ig, kh, kw, dtype=dtype)
    c = torch.arange(channels)
    w[c, c % ig, kh // 2, kw // 2] = 1.0
    return ConvKernel(w, torch.zeros(channels, dtype=dtype),
                      ConvGeometry(padding=(kh // 2, kw // 2), groups=groups))


def crop(channels: int, rows: int, cols: int, dtype: torch.dtype = torch.float64) -> ConvKernel:
    """``x[:, :, rows:-rows, cols:-cols]`` as a depthwise identity conv without padding (ACNet's
    crop layer for its Kx1 / 1xK branches when padding < K // 2)."""
    k = identity(channels, kernel_size=(2 * rows + 1, 2 * cols + 1), dtype=dtype)
    return ConvKernel(k.weight, k.bias, replace(k.geom, padding=(0, 0)))


def _crop_of(k: ConvKernel) -> Pair | None:
    """(rows, cols) when ``k`` is exactly :func:`crop` of its channels, else None."""
    g, (kh, kw) = k.geom, k.kernel_size
    if (g.groups != k.out_channels or k.weight.shape[1] != 1 or g.stride != (1, 1) or g.padding != (0, 0)
            or g.dilation != (1, 1) or kh % 2 == 0 or kw % 2 == 0 or bool((k.bias != 0).any())):
        return None
    if not torch.equal(k.weight, crop(k.out_channels, kh // 2, kw // 2, dtype=k.weight.dtype).weight):
        return None
    return (kh // 2, kw // 2)


def avg_pool(channels: int, kernel_size: int | Pair, stride: int | Pair | None = None,
             padding: int | Pair = 0, *, count_include_pad: bool = True, ceil_mode: bool = False,
             divisor_override: int | None = None, dtype: torch.dtype = torch.float64) -> ConvKernel:
    """AvgPool2d as a depthwise conv with 1/(kh*kw) taps (DBB transform V)."""
    kh, kw = _pair(kernel_size)
    if ceil_mode:
        raise FusionRefused("avg-pool with ceil_mode=True has partial windows of varying size")
    if any(_pair(padding)) and not count_include_pad:
        raise FusionRefused("avg-pool with padding and count_include_pad=False divides border windows "
                            "by fewer taps")
    div = divisor_override or kh * kw
    w = torch.full((channels, 1, kh, kw), 1.0 / div, dtype=dtype)
    stride = _pair(stride if stride is not None else (kh, kw))
    return ConvKernel(w, torch.zeros(channels, dtype=dtype),
                      ConvGeometry(stride, _pair(padding), (1, 1), channels))


# --------------------------------------------------------------------------- sequential composition

def _grouped_product(b: Tensor, gb: int, a: Tensor, ga: int) -> tuple[Tensor, int]:
    """``B @ A`` for block-diagonal channel maps in their grouped storage, per tap pair.

    ``b`` is (O, M/gb, tb) with gb groups, ``a`` (M, I/ga, ta) with ga groups; the product has
    g = gcd(ga, gb) groups and is returned as (O, I/g, tb * ta) with g. The mid channels are split
    into the lcm(ga, gb) chunks that lie in one group of each, so no operand is densified: a dense
    1x1 then a depthwise KxK costs O·I·K² here, not O²·I·K².
    """
    o, mb, tb = b.shape
    m, ia, ta = a.shape
    g, lcm = math.gcd(ga, gb), ga * gb // math.gcd(ga, gb)
    chunk = m // lcm
    bc = b.reshape(gb, o // gb, lcm // gb, chunk, tb).permute(0, 2, 1, 3, 4).reshape(lcm, o // gb, chunk, tb)
    ac = a.reshape(lcm, chunk, ia, ta)
    prod = torch.einsum("lomt,lmis->loits", bc, ac).reshape(lcm, o // gb, ia, tb * ta)
    # chunk l lies in g-group l // (lcm/g), in b-group l // (lcm/gb) and in a-group l // (lcm/ga)
    l_idx = torch.arange(lcm)
    k, jb, ja = l_idx // (lcm // g), (l_idx // (lcm // gb)) % (gb // g), (l_idx // (lcm // ga)) % (ga // g)
    out = prod.new_zeros(g, gb // g, ga // g, o // gb, ia, tb * ta)
    out.index_put_((k, jb, ja), prod, accumulate=True)
    return out.permute(0, 1, 3, 2, 4, 5).reshape(o, (ga // g) * ia, tb * ta), g


def _grouped_bias(b_sum: Tensor, gb: int, bias: Tensor) -> Tensor:
    """Grouped channel map (O, M/gb) applied to a vector of M."""
    o, mb = b_sum.shape
    return torch.einsum("gom,gm->go", b_sum.reshape(gb, o // gb, mb), bias.reshape(gb, mb)).reshape(o)


def compose(first: ConvKernel, second: ConvKernel) -> ConvKernel:
    """``second(first(x))`` as one conv (DBB transform III, 1x1->KxK and KxK->1x1).

    Exact cases:
    * ``second`` is pointwise without padding: a channel mix applied after ``first``.
    * ``first`` is pointwise (any padding): the composition is ``second``'s kernel mixed by
      ``first``'s channel matrix; ``second``'s zero padding is exact only if ``first`` maps 0 to 0
      (zero bias) or ``second`` has no padding; reflect / replicate / circular padding on one side
      commutes with the channel mix (with its bias too), so it is exact.
    Anything else (KxK after KxK with padding, strided 1x1 first) is refused.
    """
    shape, geom, make = _compose_plan(first, second)
    return make()


def compose_deferred(first: ConvKernel, second: ConvKernel) -> ConvKernel:
    """:func:`compose`, checked now (the same refusals) but computed on first use: the fusion pass
    weighs a composition by its shape and often discards it (a depthwise 7x7 then a 1x1 expansion
    would be a dense 7x7 kernel 45x as costly), so the kernel is only built when it is kept."""
    shape, geom, make = _compose_plan(first, second)
    return DeferredConvKernel(shape, geom, make)


class DeferredConvKernel(ConvKernel):
    """A ConvKernel whose weight and bias are computed on first access; its shape and geometry are
    known from the start."""

    def __init__(self, shape: tuple[int, int, int, int], geom: ConvGeometry, make: Callable[[], ConvKernel]):
        self._shape, self.geom, self._make, self._value = shape, geom, make, None

    def _force(self) -> ConvKernel:
        if self._value is None:
            self._value, self._make = self._make(), None
        return self._value

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self._force().weight

    @property
    def bias(self) -> Tensor:  # type: ignore[override]
        return self._force().bias

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self._shape

    @property
    def out_channels(self) -> int:
        return self._shape[0]

    @property
    def in_channels(self) -> int:
        return self._shape[1] * self.geom.groups

    @property
    def kernel_size(self) -> Pair:
        return (self._shape[2], self._shape[3])


def _compose_plan(first: ConvKernel, second: ConvKernel
                  ) -> tuple[tuple[int, int, int, int], ConvGeometry, Callable[[], ConvKernel]]:
    """(result shape, result geometry, computation) of ``compose``, or FusionRefused."""
    if first.out_channels != second.in_channels:
        raise FusionRefused("channel mismatch between composed convs")
    cropped = _compose_crop(first, second)
    if cropped is not None:
        return cropped.shape, cropped.geom, lambda: cropped
    a, b = first, second
    ga, gb = a.geom.groups, b.geom.groups
    g = math.gcd(ga, gb)
    if b.is_pointwise and b.geom.padding == (0, 0):
        geom = replace(a.geom, groups=g)

        def channel_mix() -> ConvKernel:
            w, _ = _grouped_product(b.weight.reshape(b.out_channels, -1, 1), gb,
                                    a.weight.reshape(a.out_channels, a.weight.shape[1], -1), ga)
            bias = _grouped_bias(b.weight[:, :, 0, 0], gb, a.bias) + b.bias
            return ConvKernel(w.reshape(b.out_channels, -1, *a.kernel_size), bias, geom)

        return (b.out_channels, a.in_channels // g, *a.kernel_size), geom, channel_mix
    if a.is_pointwise:
        a_pad, b_pad = any(a.geom.padding), any(b.geom.padding)
        modes = {geo.padding_mode for geo, p in ((a.geom, a_pad), (b.geom, b_pad)) if p}
        if a_pad and b_pad and modes != {"zeros"}:
            raise FusionRefused(f"{'/'.join(sorted(modes))} padding on both sides of a channel mix")
        # reflect / replicate / circular padding commutes with a per-pixel channel map (bias included)
        mode = modes.pop() if modes else "zeros"
        if b_pad and mode == "zeros" and bool((a.bias != 0).any()):
            raise FusionRefused("a per-pixel map with a bias (e.g. BN) before a zero-padded conv: the padded "
                                "border would see 0 instead of the bias (fold it into a preceding conv instead)")
        pad = (a.geom.padding[0] + b.geom.padding[0], a.geom.padding[1] + b.geom.padding[1])
        geom = replace(b.geom, padding=pad, groups=g, padding_mode=mode)

        def mixed_kernel() -> ConvKernel:
            w, _ = _grouped_product(b.weight.reshape(b.out_channels, b.weight.shape[1], -1), gb,
                                    a.weight.reshape(a.out_channels, -1, 1), ga)
            bias = b.bias + _grouped_bias(b.weight.sum((2, 3)), gb, a.bias)
            return ConvKernel(w.reshape(b.out_channels, -1, *b.kernel_size), bias, geom)

        return (b.out_channels, a.in_channels // g, *b.kernel_size), geom, mixed_kernel
    raise FusionRefused(f"cannot compose a {first.kernel_size} conv (stride {first.geom.stride}) with a "
                        f"{second.kernel_size} conv exactly")


def _compose_crop(first: ConvKernel, second: ConvKernel) -> ConvKernel | None:
    """A crop before or after a conv. Crop then conv: the conv's kernel grows by the cropped border
    (exact when it does not zero-pad, or dilate, the cropped dims). Conv then crop: the conv pads
    less (exact while its padding covers the crop)."""
    if first.is_pointwise and first.geom.padding == (0, 0) or second.is_pointwise and second.geom.padding == (0, 0):
        return None  # a channel mix: the general rules below are exact
    rc = _crop_of(first)
    if rc is not None:
        g = second.geom
        if any(c and (p or d != 1) for c, p, d in zip(rc, g.padding, g.dilation, strict=True)):
            raise FusionRefused("crop before a conv that zero-pads or dilates the cropped dims")
        r, c = rc
        return ConvKernel(F.pad(second.weight, (c, c, r, r)), second.bias, g)
    rc = _crop_of(second)
    if rc is not None:
        g = first.geom
        pad = (g.padding[0] - rc[0] * g.stride[0], g.padding[1] - rc[1] * g.stride[1])
        if min(pad) < 0:
            raise FusionRefused("crop of more than a conv's padding")
        return ConvKernel(first.weight, first.bias, replace(g, padding=pad))
    return None

"""Shared pieces of the training-time re-parameterizable blocks.

Every block follows one contract so models mixing them can be converted uniformly:

* the training-time ``forward`` uses only standard modules (``nn.Conv2d``, ``nn.BatchNorm2d``,
  ``nn.AvgPool2d``, ``nn.Linear``) plus ``F.pad``, reshapes and additions, with no data-dependent
  Python, so ``torch.fx`` traces it and the generic graph pass can fuse it without knowing the class;
* ``reparameterize()`` switches the module *in place* to its deploy form. The folding runs in
  float64 through :mod:`repconv.algebra` and is cast back to the block's dtype/device once, so the
  only fp32 error left is the final rounding of the weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..algebra import ConvKernel, bn_module_scale_shift, conv_then_affine, identity

Pair = tuple[int, int]


def pair(v: int | Iterable[int]) -> Pair:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise ValueError(f"expected an int or a pair, got {v!r}")
    return (t[0], t[1])


def same_padding(kernel_size: Pair, dilation: Pair = (1, 1)) -> Pair:
    """Padding that keeps the output centred on the input pixel (odd kernels)."""
    return (dilation[0] * (kernel_size[0] - 1) // 2, dilation[1] * (kernel_size[1] - 1) // 2)


def require_odd(kernel_size: Pair, who: str) -> None:
    if kernel_size[0] % 2 == 0 or kernel_size[1] % 2 == 0:
        raise ValueError(f"{who}: kernel {kernel_size} must be odd so parallel branches share a centre")


def kxk_and_1x1_geometry(kernel_size: int | Pair, stride: int | Pair, padding: int | Pair | None,
                         dilation: int | Pair, who: str) -> tuple[Pair, Pair, Pair, Pair, Pair, bool]:
    """RepVGG-style KxK + 1x1 branches: (k, stride, dilation, KxK padding, 1x1 padding, centred).
    The 1x1 is padded by ``padding - k//2`` so it stays centred under a larger padding; ``centred``
    (the padding is the centred one) is what an identity branch needs besides stride 1."""
    k, d, s = pair(kernel_size), pair(dilation), pair(stride)
    require_odd(k, who)
    c = same_padding(k, d)
    p = c if padding is None else pair(padding)
    p11 = (p[0] - c[0], p[1] - c[1])
    if min(p11) < 0:
        raise ValueError(f"{who}: padding {p} is smaller than the centred padding {c}")
    return k, s, d, p, p11, p == c


class ConvBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d (children ``conv`` and ``bn``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Pair, stride: int | Pair = 1,
                 padding: int | Pair = 0, dilation: int | Pair = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def kernel(self) -> ConvKernel:
        """The eval-mode conv-BN as one float64 kernel (transform I: BN fold)."""
        return fold_conv_bn(self.conv, self.bn)


class PadBN(nn.Module):
    """Zero-pad, then BatchNorm: DBB's "BN-and-pad" written with standard ops.

    DBB (arXiv 2103.13425, Sec. 3.3) pads the output of a BN with the BN's own value at zero,
    ``BN(0) = beta - mu * gamma / sigma``, so that a following un-padded KxK conv sees exactly what
    the deploy conv sees at the border. Because BN acts per channel and pixel,
    ``BN(zero_pad(x)) == pad(BN(x), value=BN(0))`` in eval mode, and this form needs neither
    slice assignment nor a per-channel pad value, so fx records a plain ``F.pad`` followed by the BN
    module. (In training mode the batch statistics here also see the border zeros; the official
    layer instead normalizes the interior with batch statistics and writes the border from running
    statistics. Only eval mode matters for re-parameterization, and there both are identical.)
    """

    def __init__(self, num_features: int, padding: int | Pair) -> None:
        super().__init__()
        self.padding = pair(padding)
        self.bn = nn.BatchNorm2d(num_features)

    def forward(self, x: Tensor) -> Tensor:
        ph, pw = self.padding
        if ph or pw:
            x = F.pad(x, [pw, pw, ph, ph])
        return self.bn(x)


# --------------------------------------------------------------------------- folding helpers

def conv_kernel(conv: nn.Conv2d) -> ConvKernel:
    """A module's conv as a float64 kernel."""
    return ConvKernel.of(conv).double()


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> ConvKernel:
    scale, shift = bn_module_scale_shift(bn, torch.float64)
    return conv_then_affine(conv_kernel(conv), scale.to(conv.weight.device), shift.to(conv.weight.device))


def bn_identity_kernel(bn: nn.BatchNorm2d, groups: int = 1) -> ConvKernel:
    """An identity branch followed by BN (RepVGG / MobileOne skip) as a 1x1 kernel."""
    scale, shift = bn_module_scale_shift(bn, torch.float64)
    dev = bn.running_mean.device if bn.running_mean is not None else None
    k = identity(bn.num_features, groups=groups, dtype=torch.float64)
    k = ConvKernel(k.weight.to(dev), k.bias.to(dev), k.geom)
    return conv_then_affine(k, scale.to(dev), shift.to(dev))


def kernel_to_conv(k: ConvKernel, like: Tensor) -> nn.Conv2d:
    """Materialise a folded kernel as an ``nn.Conv2d`` with the dtype/device of ``like``.

    The module is created directly on that device (also ``meta``, so deploy shapes of huge models
    can be built without allocating them)."""
    g = k.geom
    conv = nn.Conv2d(k.in_channels, k.out_channels, k.kernel_size, g.stride, g.padding, g.dilation, g.groups,
                     bias=True, padding_mode=g.padding_mode, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        conv.weight.copy_(k.weight.to(device=like.device, dtype=like.dtype))
        conv.bias.copy_(k.bias.to(device=like.device, dtype=like.dtype))
    return conv


# --------------------------------------------------------------------------- the block contract

class RepBlock(nn.Module):
    """Base class: a training-time block with an exact deploy form.

    Subclasses implement :meth:`_reparameterize`. :meth:`reparameterize` is idempotent and runs
    under ``torch.no_grad``; the result always uses the BN *running* statistics (eval semantics),
    whatever mode the module is in.
    """

    deployed: bool = False

    def forward(self, x: Tensor) -> Tensor:
        # submodule slots, read from _modules: a class-level default would shadow the registered module
        deploy_conv, act = self._modules.get("reparam_conv"), self._modules.get("act")
        out = deploy_conv(x) if deploy_conv is not None else self._branches(x)
        return out if act is None else act(out)

    def _branches(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The training-time computation: the sum of the block's branches."""
        raise NotImplementedError

    def reparameterize(self) -> None:
        """Switch this block in place to its deploy form (a single conv / linear)."""
        if self.deployed:
            return
        with torch.no_grad():
            self._reparameterize()
        self.deployed = True

    def _reparameterize(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def reparameterize_model(model: nn.Module) -> nn.Module:
    """Call :meth:`RepBlock.reparameterize` on every block inside ``model`` (in place); returns it."""
    for m in list(model.modules()):
        if isinstance(m, RepBlock):
            m.reparameterize()
    return model


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm (and LayerNorm affine) non-trivial statistics and parameters (in place).

    Fresh BNs are the identity in eval mode (mean 0, var 1, gamma 1, beta 0), which would let a
    fusion that ignores BN pass its tests. Ranges are chosen so the scale gamma/sigma stays within
    about [0.35, 2.1] with random sign: every term matters, nothing is ill-conditioned.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:  # its affine folds too (MLP-Mixer)
            with torch.no_grad():
                m.weight.copy_(_uniform(m.weight.numel(), 0.5, 1.5, g).reshape(m.weight.shape))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
            continue
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        n = m.num_features
        with torch.no_grad():
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(_uniform(n, 0.5, 2.0, g))
            if m.weight is not None:
                sign = torch.where(torch.rand(n, generator=g) < 0.2, -1.0, 1.0)
                m.weight.copy_(_uniform(n, 0.5, 1.5, g) * sign)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return model

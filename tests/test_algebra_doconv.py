"""DO-Conv kernel composition (repconv.algebra.doconv) against a literal evaluation of the paper's
definition: unfold the input into M x N patches, apply D per input channel, then W."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from repconv.algebra import ConvGeometry, compose
from repconv.algebra.doconv import (
    compose_kernel,
    compose_via_features,
    doconv_identity,
    doconv_kernel,
    feature_composition,
    feature_composition_convs,
)
from repconv.blocks import DOConv2d, DODConv2d

DT = torch.float64


def direct(x: torch.Tensor, d: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, kernel_size, stride,
           padding, dilation, groups, padding_mode: str = "zeros") -> torch.Tensor:
    """O = W x (D o P) on unfolded patches, with an explicit loop over groups (no reshapes shared
    with the library): P[n, c, m, l] is tap m of input channel c at output location l."""
    kh, kw = kernel_size
    if padding_mode != "zeros":
        x = F.pad(x, [padding[1], padding[1], padding[0], padding[0]], mode=padding_mode)
        padding = (0, 0)
    n, c_in, h, wd = x.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (n, c*kh*kw, L)
    p = cols.reshape(n, c_in, kh * kw, -1)
    dp = torch.einsum("cms,ncml->ncsl", d, p)  # D o P: (n, c_in, D_mul, L)
    c_out = w.shape[0]
    og, ig = c_out // groups, c_in // groups
    out = torch.zeros(n, c_out, dp.shape[-1], dtype=x.dtype)
    for g in range(groups):  # output o of group g reads input channels g*ig .. (g+1)*ig - 1
        out[:, g * og:(g + 1) * og] = torch.einsum("ojs,njsl->nol", w[g * og:(g + 1) * og],
                                                   dp[:, g * ig:(g + 1) * ig])
    if bias is not None:
        out += bias[None, :, None]
    return out.reshape(n, c_out, ho, wo)


@st.composite
def doconv_case(draw):
    groups = draw(st.sampled_from([1, 2, 4]))
    depthwise = draw(st.booleans())
    c_in = groups * draw(st.integers(1, 2)) if not depthwise else draw(st.integers(1, 4))
    if depthwise:
        groups = c_in
    c_out = groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    mn = kernel[0] * kernel[1]
    d_mul = mn + draw(st.integers(0, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    size = (draw(st.integers(5, 8)), draw(st.integers(5, 8)))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return c_in, c_out, groups, kernel, d_mul, stride, dilation, padding, size, bias, seed


@settings(max_examples=50, deadline=None)
@given(doconv_case())
def test_kernel_composition_equals_direct(case):
    c_in, c_out, groups, kernel, d_mul, stride, dilation, padding, size, bias, seed = case
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(c_in, kernel[0] * kernel[1], d_mul, generator=g, dtype=DT)
    w = torch.randn(c_out, c_in // groups, d_mul, generator=g, dtype=DT)
    b = torch.randn(c_out, generator=g, dtype=DT) if bias else None
    x = torch.randn(2, c_in, *size, generator=g, dtype=DT)
    ref = direct(x, d, w, b, kernel, stride, padding, dilation, groups)

    wk = compose_kernel(d, w, kernel, groups)
    assert wk.shape == (c_out, c_in // groups, *kernel)
    out = F.conv2d(x, wk, b, stride, padding, dilation, groups)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

    geom = ConvGeometry(stride, padding, dilation, groups)
    torch.testing.assert_close(doconv_kernel(d, w, b, kernel, geom).apply(x), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(feature_composition(x, d, w, b, kernel, geom), ref, rtol=1e-10, atol=1e-10)
    # the generic conv algebra (depthwise then 1x1) reaches the same kernel by another route
    via = compose_via_features(d, w, b, kernel, geom)
    torch.testing.assert_close(via.weight, wk, rtol=1e-12, atol=1e-12)
    assert via.geom == geom


def test_reflect_padding_feature_route():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(4, 9, 11, generator=g, dtype=DT)
    w = torch.randn(6, 2, 11, generator=g, dtype=DT)
    x = torch.randn(1, 4, 7, 9, generator=g, dtype=DT)
    geom = ConvGeometry((1, 1), (1, 1), (1, 1), 2, "reflect")
    ref = direct(x, d, w, None, (3, 3), (1, 1), (1, 1), (1, 1), 2, "reflect")
    torch.testing.assert_close(doconv_kernel(d, w, None, (3, 3), geom).apply(x), ref)
    dw, pw = feature_composition_convs(d, w, None, (3, 3), geom)
    torch.testing.assert_close(compose(dw, pw).apply(x), ref)


@pytest.mark.parametrize("d_mul", [9, 10, 18, 20])
def test_identity_start_is_plain_conv(d_mul):
    """With D = 0 the trained factor is the fixed identity: W' is W's first M*N slots, summed over
    each whole M*N block of D_mul (the paper's initialisation makes DO-Conv start as a conv)."""
    w = torch.randn(5, 3, d_mul, dtype=DT)
    dd = doconv_identity(3, (3, 3), d_mul, dtype=DT)
    assert dd.shape == (3, 9, d_mul)
    wk = compose_kernel(dd, w, (3, 3))
    expect = sum(w[:, :, 9 * r:9 * (r + 1)] for r in range(d_mul // 9)).reshape(5, 3, 3, 3)
    torch.testing.assert_close(wk, expect)


def test_shape_errors():
    with pytest.raises(ValueError, match="D_mul >= M\\*N"):
        doconv_identity(3, (3, 3), 8)
    with pytest.raises(ValueError):
        compose_kernel(torch.zeros(4, 9, 9), torch.zeros(2, 4, 10), (3, 3))  # D_mul mismatch
    with pytest.raises(ValueError):
        compose_kernel(torch.zeros(4, 8, 9), torch.zeros(2, 4, 9), (3, 3))  # taps mismatch
    with pytest.raises(ValueError):
        compose_kernel(torch.zeros(4, 9, 9), torch.zeros(3, 2, 9), (3, 3), groups=2)  # C_out vs groups
    with pytest.raises(ValueError, match="D_mul"):
        DOConv2d(4, 4, 3, D_mul=4)


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, D_mul=11, bias=True),
    dict(in_channels=4, out_channels=8, kernel_size=(3, 5), stride=2, padding=(1, 2), groups=2),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, dilation=2),
    dict(in_channels=4, out_channels=6, kernel_size=1),
])
def test_doconv_module_matches_direct(kwargs):
    torch.manual_seed(0)
    m = DOConv2d(**kwargs).double()
    if m.D is not None:
        torch.nn.init.normal_(m.D, std=0.2)
    x = torch.randn(2, kwargs["in_channels"], 9, 10, dtype=DT)
    d = None if m.D is None else m.D.detach() + m.D_diag
    k = m.kernel_size
    if d is None:  # 1x1: no D; W is the kernel
        ref = F.conv2d(x, m.W.detach().reshape(m.out_channels, -1, 1, 1), m.bias, m.stride, m.padding)
    else:
        ref = direct(x, d, m.W.detach(), None if m.bias is None else m.bias.detach(), k, m.stride, m.padding,
                     m.dilation, m.groups)
    out = m(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    assert m.W.grad is not None and m.W.grad.abs().sum() > 0
    if m.D is not None:
        assert m.D.grad is not None and m.D.grad.abs().sum() > 0
    dep = copy.deepcopy(m)
    dep.reparameterize()
    assert isinstance(dep.reparam_conv, torch.nn.Conv2d) and dep.W is None and dep.D is None
    torch.testing.assert_close(dep(x), ref, rtol=1e-10, atol=1e-10)


def test_dodconv_is_depthwise_with_multiplier():
    torch.manual_seed(1)
    m = DODConv2d(4, 3, padding=1, depth_multiplier=3, D_mul=12).double()
    torch.nn.init.normal_(m.D, std=0.2)
    x = torch.randn(2, 4, 8, 8, dtype=DT)
    ref = direct(x, m.D.detach() + m.D_diag, m.W.detach(), None, (3, 3), (1, 1), (1, 1), (1, 1), 4)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)
    # each output channel reads only its own input channel: a depthwise kernel
    m.reparameterize()
    conv = m.reparam_conv
    assert conv.groups == 4 and conv.weight.shape == (12, 1, 3, 3)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)

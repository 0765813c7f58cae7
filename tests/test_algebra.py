"""Each fusion rule against direct computation (float64, so the only error is round-off).

Property tests draw random conv geometries (kernel 1-7 incl. non-square, stride 1-2, dilation
1-2, groups incl. depthwise, padding variants, bias on/off, random BN statistics) and assert
the fused kernel reproduces the unfused computation to 1e-10 relative.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from repconv import algebra as A
from repconv.algebra import ConvGeometry, ConvKernel, FusionRefused, LinearKernel

D = torch.float64
TOL = 1e-10  # relative to max |reference|: fp64 round-off of a few hundred products


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    scale = max(float(b.abs().max()), 1e-12)
    return float((a - b).abs().max()) <= tol * scale


def rand_kernel(o: int, i: int, k: tuple[int, int], geom: ConvGeometry, bias: bool, gen: torch.Generator) -> ConvKernel:
    w = torch.randn(o, i // geom.groups, *k, generator=gen, dtype=D)
    b = torch.randn(o, generator=gen, dtype=D) if bias else torch.zeros(o, dtype=D)
    return ConvKernel(w, b, geom)


def rand_bn(c: int, gen: torch.Generator, affine: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    mean = torch.randn(c, generator=gen, dtype=D)
    var = torch.rand(c, generator=gen, dtype=D) + 0.1
    w = torch.rand(c, generator=gen, dtype=D) + 0.5 if affine else None
    b = torch.randn(c, generator=gen, dtype=D) if affine else None
    eps = float(torch.rand(1, generator=gen)) * 1e-2 + 1e-5
    scale, shift = A.bn_scale_shift(mean, var, w, b, eps)
    return scale, shift, dict(running_mean=mean, running_var=var, weight=w, bias=b, eps=eps)


def bn_ref(x: torch.Tensor, p: dict) -> torch.Tensor:
    return F.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], False, 0.0, p["eps"])


geometry = st.fixed_dictionaries({
    "kh": st.integers(1, 7), "kw": st.integers(1, 7), "stride": st.integers(1, 2), "dilation": st.integers(1, 2),
    "groups": st.sampled_from([1, 2, 4, "dw"]), "pad": st.sampled_from(["same", "zero", "big"]),
    "bias": st.booleans(), "affine": st.booleans(), "seed": st.integers(0, 2**16),
    "mode": st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]),
})


def geom_of(g: dict, channels: int) -> tuple[tuple[int, int], ConvGeometry]:
    k = (g["kh"], g["kw"])
    d = g["dilation"]
    if g["pad"] == "same":
        pad = (d * (k[0] - 1) // 2, d * (k[1] - 1) // 2)
    elif g["pad"] == "zero":
        pad = (0, 0)
    else:
        pad = (d * (k[0] - 1) // 2 + 1, d * (k[1] - 1) // 2 + 1)
    groups = channels if g["groups"] == "dw" else g["groups"]
    return k, ConvGeometry((g["stride"],) * 2, pad, (d, d), groups, g["mode"])


@settings(max_examples=60, deadline=None)
@given(geometry)
def test_conv_bn_property(g: dict) -> None:
    gen = torch.Generator().manual_seed(g["seed"])
    c = 8
    k, geom = geom_of(g, c)
    conv = rand_kernel(c, c, k, geom, g["bias"], gen)
    scale, shift, p = rand_bn(c, gen, g["affine"])
    x = torch.randn(2, c, 16, 15, generator=gen, dtype=D)
    assert close(A.fuse_conv_bn(conv, scale, shift).apply(x), bn_ref(conv.apply(x), p))


@settings(max_examples=60, deadline=None)
@given(geometry)
def test_bn_conv_property(g: dict) -> None:
    gen = torch.Generator().manual_seed(g["seed"])
    c = 8
    k, geom = geom_of(g, c)
    conv = rand_kernel(c, c, k, geom, g["bias"], gen)
    scale, shift, p = rand_bn(c, gen, g["affine"])
    x = torch.randn(2, c, 16, 15, generator=gen, dtype=D)
    exact = not any(geom.padding) or geom.padding_mode != "zeros"
    if not exact:
        with pytest.raises(FusionRefused):
            A.fuse_bn_conv(scale, shift, conv)
        return
    assert close(A.fuse_bn_conv(scale, shift, conv).apply(x), conv.apply(bn_ref(x, p)))


@settings(max_examples=60, deadline=None)
@given(geometry, st.sampled_from([(1, 1), (1, 3), (3, 1), (3, 3), (5, 5)]), st.booleans())
def test_branch_add_property(g: dict, small: tuple[int, int], with_identity: bool) -> None:
    """A large kernel plus a smaller centred kernel (and identity) equals one conv."""
    gen = torch.Generator().manual_seed(g["seed"])
    c = 8
    g = {**g, "pad": "same", "mode": "zeros", "kh": max(g["kh"] | 1, small[0]), "kw": max(g["kw"] | 1, small[1])}
    k, geom = geom_of(g, c)
    big = rand_kernel(c, c, k, geom, g["bias"], gen)
    d = geom.dilation[0]
    sgeom = ConvGeometry(geom.stride, (d * (small[0] - 1) // 2, d * (small[1] - 1) // 2), geom.dilation, 1)
    sm = rand_kernel(c, c, small, sgeom, True, gen)
    parts = [big, sm]
    x = torch.randn(2, c, 13, 12, generator=gen, dtype=D)
    ref = big.apply(x) + sm.apply(x)
    if with_identity and geom.stride == (1, 1):
        parts.append(A.identity(c))
        ref = ref + x
    assert close(A.add(parts).apply(x), ref)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 7), st.integers(1, 7), st.sampled_from([1, 2, 3, 4, 6, 12]), st.sampled_from([1, 2, 3, 4, 6, 12]),
       st.booleans(), st.integers(1, 2), st.integers(0, 2**16))
def test_sequential_1x1_then_kxk(kh: int, kw: int, g1: int, g2: int, bias: bool, stride: int, seed: int) -> None:
    """DBB transform III: 1x1 (groups g1) -> KxK (groups g2), and KxK -> 1x1, group-aware (coprime group
    counts included: the product's mid channels split into lcm(g1, g2) chunks)."""
    gen = torch.Generator().manual_seed(seed)
    c, m, o = 12, 24, 12
    first = rand_kernel(m, c, (1, 1), ConvGeometry(groups=g1), bias, gen)
    second = rand_kernel(o, m, (kh, kw), ConvGeometry((stride, stride), (0, 0), (1, 1), g2), True, gen)
    x = torch.randn(2, c, 12, 11, generator=gen, dtype=D)
    assert close(A.compose(first, second).apply(x), second.apply(first.apply(x)))
    # KxK then 1x1 (any padding on the KxK)
    kxk = rand_kernel(m, c, (kh, kw), ConvGeometry((stride, stride), (kh // 2, kw // 2), (1, 1), g1), bias, gen)
    pw = rand_kernel(o, m, (1, 1), ConvGeometry(groups=g2), True, gen)
    assert close(A.compose(kxk, pw).apply(x), pw.apply(kxk.apply(x)))


def test_compose_refuses_biased_1x1_before_padded_conv() -> None:
    gen = torch.Generator().manual_seed(0)
    first = rand_kernel(4, 4, (1, 1), ConvGeometry(), True, gen)
    second = rand_kernel(4, 4, (3, 3), ConvGeometry(padding=(1, 1)), True, gen)
    with pytest.raises(FusionRefused, match="border"):
        A.compose(first, second)
    with pytest.raises(FusionRefused):
        A.compose(second, second)  # KxK after KxK with padding


def test_dbb_bn_and_pad_equals_pointwise_with_padding() -> None:
    """A BN'd 1x1 whose output is padded with the BN shift == a 1x1 conv with padding 1."""
    gen = torch.Generator().manual_seed(1)
    c = 6
    one = rand_kernel(c, c, (1, 1), ConvGeometry(), False, gen)
    scale, shift, p = rand_bn(c, gen)
    x = torch.randn(2, c, 9, 9, generator=gen, dtype=D)
    y = bn_ref(one.apply(x), p)
    ref = F.pad(y, [1] * 4)
    ref[:, :, 0, :] = shift.view(1, -1, 1)
    ref[:, :, -1, :] = shift.view(1, -1, 1)
    ref[:, :, :, 0] = shift.view(1, -1, 1)
    ref[:, :, :, -1] = shift.view(1, -1, 1)
    fused = A.fuse_conv_bn(one, scale, shift)
    fused = ConvKernel(fused.weight, fused.bias, ConvGeometry(padding=(1, 1)))
    assert close(fused.apply(x), ref)
    kxk = rand_kernel(c, c, (3, 3), ConvGeometry(), True, gen)
    assert close(A.compose(fused, kxk).apply(x), kxk.apply(ref))


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_identity_kernel(groups: int) -> None:
    x = torch.randn(2, 6, 5, 5, dtype=D)
    assert close(A.identity(6, groups).apply(x), x)
    assert close(A.identity(6, groups, (3, 3)).apply(x), x)


@pytest.mark.parametrize("k,s,p", [(3, 1, 1), (3, 2, 0), (2, 2, 0), (5, 1, 2)])
def test_avg_pool_as_conv(k: int, s: int, p: int) -> None:
    x = torch.randn(2, 4, 11, 11, dtype=D)
    assert close(A.avg_pool(4, k, s, p).apply(x), F.avg_pool2d(x, k, s, p))
    with pytest.raises(FusionRefused):
        A.avg_pool(4, 3, 1, 1, count_include_pad=False)


def test_concat_of_branches() -> None:
    gen = torch.Generator().manual_seed(2)
    a = rand_kernel(4, 6, (3, 3), ConvGeometry(padding=(1, 1)), True, gen)
    b = rand_kernel(4, 6, (1, 1), ConvGeometry(groups=2), True, gen)
    x = torch.randn(2, 6, 7, 8, generator=gen, dtype=D)
    assert close(A.concat([a, b]).apply(x), torch.cat([a.apply(x), b.apply(x)], 1))


def test_align_refuses_misaligned() -> None:
    gen = torch.Generator().manual_seed(3)
    a = rand_kernel(4, 4, (3, 3), ConvGeometry(padding=(1, 1)), True, gen)
    b = rand_kernel(4, 4, (3, 3), ConvGeometry(padding=(0, 0)), True, gen)
    with pytest.raises(FusionRefused, match="centred"):
        A.add([a, b])
    c = rand_kernel(4, 4, (3, 3), ConvGeometry((2, 2), (1, 1)), True, gen)
    with pytest.raises(FusionRefused, match="strides"):
        A.add([a, c])


def test_dilated_branch_into_large_kernel() -> None:
    """UniRepLKNet-style: a dilated 3x3 (d=2) merged into a 7x7."""
    gen = torch.Generator().manual_seed(4)
    big = rand_kernel(4, 4, (7, 7), ConvGeometry(padding=(3, 3), groups=4), True, gen)
    dil = rand_kernel(4, 4, (3, 3), ConvGeometry(padding=(2, 2), dilation=(2, 2), groups=4), True, gen)
    x = torch.randn(1, 4, 12, 12, generator=gen, dtype=D)
    assert close(A.add([big, dil]).apply(x), big.apply(x) + dil.apply(x))


def test_linear_bn_both_orders_and_layernorm() -> None:
    gen = torch.Generator().manual_seed(5)
    lin = LinearKernel(torch.randn(7, 5, generator=gen, dtype=D), torch.randn(7, generator=gen, dtype=D))
    x = torch.randn(4, 5, generator=gen, dtype=D)
    s7, t7, p7 = rand_bn(7, gen)
    out = A.linear_then_affine(lin, s7, t7)
    assert close(x @ out.weight.t() + out.bias, bn_ref(x @ lin.weight.t() + lin.bias, p7))
    s5, t5, p5 = rand_bn(5, gen)
    out = A.affine_then_linear(s5, t5, lin)
    assert close(x @ out.weight.t() + out.bias, bn_ref(x, p5) @ lin.weight.t() + lin.bias)
    gamma, beta = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    out = A.affine_then_linear(gamma, beta, lin)
    normed = F.layer_norm(x, (5,))
    assert close(normed @ out.weight.t() + out.bias,
                 F.layer_norm(x, (5,), gamma, beta) @ lin.weight.t() + lin.bias)


@pytest.mark.parametrize("stride,pad,groups", [(1, 1, 1), (2, 1, 2), (1, 0, 4)])
def test_conv_to_fc(stride: int, pad: int, groups: int) -> None:
    gen = torch.Generator().manual_seed(6)
    k = rand_kernel(4, 4, (3, 3), ConvGeometry((stride,) * 2, (pad,) * 2, groups=groups), True, gen)
    x = torch.randn(3, 4, 6, 6, generator=gen, dtype=D)
    fc = A.conv_to_fc(k, (4, 6, 6))
    assert close(x.flatten(1) @ fc.weight.t() + fc.bias, k.apply(x).flatten(1))


def test_to_groups_roundtrip() -> None:
    gen = torch.Generator().manual_seed(7)
    k = rand_kernel(8, 8, (3, 3), ConvGeometry(padding=(1, 1), groups=4), True, gen)
    x = torch.randn(1, 8, 6, 6, generator=gen, dtype=D)
    for g in (1, 2, 4):
        assert close(A.to_groups(k, g).apply(x), k.apply(x))
    with pytest.raises(FusionRefused):
        A.to_groups(k, 3)

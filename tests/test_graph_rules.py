"""Transfer rules on spellings other people write: metadata reads, in-place ops, stack+sum,
``add(alpha=)``, leading-dim reshapes around BatchNorm1d, norm affines, BN-and-pad spelled as
``F.pad(y - s) + s``, padding modes, a one-tensor cat; and the branch terms of a region.

Reference: the unfused model in eval mode; fp32 tolerance 1e-5 * max|ref| (repconv/verification.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repconv
from repconv import fuse_with_report
from repconv.blocks.common import randomize_bn_


def count(model: nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class NormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d reads the input's rank and shape before a functional batch_norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected 4D input")
        b, c, h, w = x.shape
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)


class ConvNorm(nn.Module):
    def __init__(self, c: int, k: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, k, 1, k // 2, bias=False), NormAct(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class MetadataReads(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.kxk, self.k1, self.id = ConvNorm(c, 3), ConvNorm(c, 1), NormAct(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.kxk(x) + self.k1(x) + self.id(x))


class InPlace(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.a, self.b = ConvNorm(c, 3), ConvNorm(c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y.add_(self.b(x))
        y.mul_(0.5)
        y += x
        return y.relu_()


class StackSum(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.br = nn.ModuleList([ConvNorm(c, 3) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([b(x) for b in self.br]).mean(0) + torch.add(self.br[0](x), self.br[1](x), alpha=0.3)


class LeViTLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l, self.bn = nn.Linear(16, 12, bias=False), nn.BatchNorm1d(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.l(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class GroupNormThen1x1(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.gn, self.conv = nn.GroupNorm(2, c), nn.Conv2d(c, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.gn(x))


class BNAndPadArith(nn.Module):
    """BN-and-pad spelled with arithmetic: pad the shifted-out value, add the shift back."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.c1, self.bn, self.c3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.c1(x))
        bn = self.bn
        shift = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)
        return self.c3(F.pad(y - shift, (1, 1, 1, 1)) + shift)


class PaddingModes(nn.Module):
    """Reflect padding written three ways: padding_mode=, F.pad(mode=), and after a 1x1-BN."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect")
        self.b = nn.Conv2d(c, c, 3)
        self.c = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1,
                                                                                padding_mode="reflect"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(F.pad(x, (1, 1, 1, 1), mode="reflect")) + self.c(x)


CASES = {
    # name: (model, input shape, Conv2d after, Linear after)
    "metadata-reads": (MetadataReads, (2, 8, 10, 10), 1, 0),
    "in-place": (InPlace, (2, 8, 10, 10), 1, 0),
    "stack-mean-add-alpha": (StackSum, (2, 8, 10, 10), 1, 0),
    "levit-linear-bn1d": (LeViTLinear, (2, 5, 16), 0, 1),
    "groupnorm-affine": (GroupNormThen1x1, (2, 8, 6, 6), 1, 0),
    "bn-and-pad-arith": (BNAndPadArith, (2, 8, 7, 7), 1, 0),
    "padding-modes": (PaddingModes, (2, 8, 7, 7), 1, 0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_spelling_fuses_to_minimal(name: str) -> None:
    factory, shape, convs, linears = CASES[name]
    model = randomize_bn_(factory(), 0).eval()
    x = torch.randn(shape)
    fused, report = fuse_with_report(model, x)
    assert count(fused, nn.Conv2d) == convs and count(fused, nn.Linear) == linears
    assert count(fused, nn.modules.batchnorm._BatchNorm) == 0
    assert not report.left, report.left
    x2 = torch.randn(shape)
    with torch.no_grad():
        assert rel_err(fused(x2), model(x2)) < 1e-5


def test_groupnorm_keeps_only_its_normalization() -> None:
    model = randomize_bn_(GroupNormThen1x1(), 0).eval()
    with torch.no_grad():
        model.gn.weight.uniform_(0.5, 1.5)
        model.gn.bias.uniform_(-1, 1)
    fused, _ = fuse_with_report(model, torch.randn(2, 8, 6, 6))
    (gn,) = [m for m in fused.modules() if isinstance(m, nn.GroupNorm)]
    assert not gn.affine


def test_groupnorm_before_zero_padded_conv_is_left_with_reason() -> None:
    model = nn.Sequential(nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].bias.uniform_(0.5, 1.0)
    fused, report = fuse_with_report(model, torch.randn(1, 8, 6, 6))
    assert [m.affine for m in fused.modules() if isinstance(m, nn.GroupNorm)] == [True]
    assert any("zero-padded" in x.reason or "padding" in x.reason for x in report.left), report.left


def test_single_tensor_cat_is_not_densified() -> None:
    """DenseNet's ``norm(torch.cat([x], 1))``: no C x C conv appears."""

    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(F.relu(self.bn(torch.cat([x], 1))))

    model = randomize_bn_(Dense(), 0).eval()
    fused, report = fuse_with_report(model, torch.randn(2, 8, 6, 6))
    assert count(fused, nn.Conv2d) == 1 and count(fused, nn.BatchNorm2d) == 1
    assert [x.where for x in report.left] == ["bn"]  # left, with its reason


def test_in_place_on_a_view_read_later_is_refused_by_name() -> None:
    class ViewMutation(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            v = y.view(-1)
            y.mul_(2.0)
            return v.sum() + y

    model = randomize_bn_(ViewMutation(), 0).eval()
    x = torch.randn(1, 4, 5, 5)
    fused, report = fuse_with_report(model, x)  # verified: the mutation is kept as written
    assert any("mul_" in x.reason for x in report.left), report.left
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) < 1e-6


def test_branch_terms_sum_to_the_fused_kernel() -> None:
    model = randomize_bn_(MetadataReads(), 0).eval()
    with torch.no_grad():
        model.id.running_var.fill_(1e-4)  # the identity BN dominates: its branch carries the outlier
    fused, report = fuse_with_report(model, torch.randn(2, 8, 10, 10))
    (region,) = report.regions
    conv = fused.get_submodule(region.module_path)
    assert isinstance(conv, nn.Conv2d)
    assert [t.label for t in region.terms] == ["kxk", "k1", "id"]
    weight = sum(t.weight for t in region.terms if t.weight is not None)
    bias = sum(t.bias for t in region.terms)
    assert torch.allclose(weight, conv.weight.double(), rtol=1e-6, atol=1e-6)
    assert torch.allclose(bias, conv.bias.double(), rtol=1e-6, atol=1e-6)
    # the identity BN's term is exactly its folded scale at the centre tap
    bn = model.id
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    centre = region.terms[2].weight[range(8), range(8), 1, 1]
    assert torch.allclose(centre, scale, rtol=1e-12)


def test_terms_after_a_shared_bn_split_the_shift() -> None:
    """QARepVGG-style: branches summed, then one BN: each branch scaled, the BN shift its own term."""

    class SumThenBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k3, self.k1, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.k3(x) + self.k1(x) + x)

    model = randomize_bn_(SumThenBN(), 0).eval()
    fused, report = fuse_with_report(model, torch.randn(1, 4, 6, 6))
    (region,) = report.regions
    labels = [t.label for t in region.terms]
    assert labels == ["k3", "k1", "identity", "bn"]
    conv = fused.get_submodule(region.module_path)
    assert torch.allclose(sum(t.weight for t in region.terms if t.weight is not None), conv.weight.double(),
                          atol=1e-6)
    assert region.terms[-1].weight is None


def test_verification_measures_from_float64_and_allows_the_originals_own_error() -> None:
    """An exact Linear+BN1d fold before a LayerNorm over near-constant tokens: any fp32 evaluation
    is off by ~1e-4 there (the LayerNorm divides by a std of 1e-3), the original's included. Compared
    fp32 with fp32 the fold would look wrong; against float64 it is as good as the original."""

    class FoldThenLayerNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l, self.bn, self.ln = nn.Linear(64, 64), nn.BatchNorm1d(64), nn.LayerNorm(64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.l(x).flatten(0, 1)).reshape(x.shape[0], x.shape[1], 64)
            return self.ln(y)

    model = randomize_bn_(FoldThenLayerNorm(), 0).eval()
    with torch.no_grad():
        model.bn.weight.fill_(1e-3)
        model.bn.bias.fill_(2.0)
    x = torch.randn(2, 16, 64)
    fused, report = fuse_with_report(model, x)
    assert count(fused, nn.BatchNorm1d) == 0
    fp32_pair = repconv.verify(model, fused, x)
    assert not fp32_pair.ok  # the old comparison cries wolf ...
    v = report.verification
    assert v.ok and v.outputs[0].baseline_err > 1e-5  # ... the float64 one sees the original err as much
    # and a real mistake is still caught: one feature's shift off by 1e-3 (that is the tokens' spread)
    with torch.no_grad():
        fused.get_submodule(report.regions[0].module_path).bias[0] += 1e-3
    assert not repconv.verify(model, fused, x, float64_reference=copy.deepcopy(model).double()).ok


def test_scales_and_shifts_alone_never_become_a_conv() -> None:
    """LeViT with one token per head: ``q @ k * scale + bias`` is a per-channel affine of an opaque
    matmul; with nothing to fold into it stays as written (no new depthwise conv)."""

    class ScaledScores(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.randn(8, 1, 1))

        def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return (q @ k * 0.25 + self.bias).softmax(-1)

    model = ScaledScores().eval()
    fused, report = fuse_with_report(model, (torch.randn(2, 8, 1, 16), torch.randn(2, 8, 16, 1)))
    assert not report.regions and count(fused, (nn.Conv2d, nn.Linear)) == 0


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: permute to channels-last, F.layer_norm, permute back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def test_layernorm2d_affine_folds_into_the_following_1x1_conv() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.proj = LayerNorm2d(8), nn.Conv2d(8, 12, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(self.norm(x))

    model = Block().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 8, 5, 5)
    fused, report = fuse_with_report(model, x)
    assert not report.left and count(fused, nn.Conv2d) == 1
    norms = [n for n in fused.graph.nodes if n.target is F.layer_norm]
    assert len(norms) == 1 and norms[0].kwargs.get("weight", norms[0].args[2:3]) is None
    with torch.no_grad():
        x2 = torch.randn(2, 8, 5, 5)
        assert rel_err(fused(x2), model(x2)) < 1e-5


def test_asymmetric_zero_padding_stays_an_explicit_pad_before_one_conv() -> None:
    """TF-style 'same' padding of a stride-2 conv: pad (0, 1, 0, 1), conv, BN -> pad + one conv."""

    class TFSame(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 8, 3, 2, bias=False), nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(F.pad(x, (0, 1, 0, 1))))

    model = randomize_bn_(TFSame(), 0).eval()
    x = torch.randn(2, 4, 10, 10)
    fused, report = fuse_with_report(model, x)
    assert count(fused, nn.Conv2d) == 1 and count(fused, nn.BatchNorm2d) == 0 and not report.left
    pads = [n.args[1] for n in fused.graph.nodes if n.target is F.pad]
    assert pads == [[0, 1, 0, 1]]
    with torch.no_grad():
        x2 = torch.randn(2, 4, 11, 9)  # other sizes too: the pad is explicit, not baked into a kernel
        assert rel_err(fused(x2), model(x2)) < 1e-5


def test_layer_scale_after_permute_folds_into_the_linear_which_stays_a_linear() -> None:
    """torchvision ConvNeXt: Linear on channels-last, permute back, layer scale (C, 1, 1)."""

    class Block(nn.Module):
        def __init__(self, c: int = 16) -> None:
            super().__init__()
            self.dw, self.norm = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.LayerNorm(c)
            self.pw1, self.act, self.pw2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
            self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.pw2(self.act(self.pw1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
            return x + self.layer_scale * y.permute(0, 3, 1, 2)

    model = Block().eval()
    x = torch.randn(2, 16, 8, 8)
    fused, _ = fuse_with_report(model, x)
    assert [type(m).__name__ for m in fused.modules() if isinstance(m, nn.Conv2d | nn.Linear)] == \
        ["Conv2d", "Linear", "Linear"]
    assert "mul" not in fused.code  # the layer scale went into pw2
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) < 1e-5


class TopkHead(nn.Module):
    """A detection-style head: scores -> topk -> gather. fp32 rounding swaps near-tied scores."""

    def __init__(self, c: int = 32, depth: int = 4, k: int = 300):
        super().__init__()
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.SiLU())
                                    for _ in range(depth)])
        self.score, self.k = nn.Conv2d(c, 8, 1), k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        top, idx = self.score(f).flatten(1).topk(self.k, dim=1)
        feats = f.flatten(2).repeat(1, 1, 8).gather(2, idx[:, None].expand(-1, f.shape[1], -1))
        return torch.cat([top[:, None], feats], 1)


def test_order_selecting_head_is_verified_by_the_float64_fold() -> None:
    torch.manual_seed(2)
    model = randomize_bn_(TopkHead(), 2).eval()
    x = torch.randn(1, 32, 32, 32)
    fused, report = fuse_with_report(model, x)
    v = report.verification
    assert not v.direct_ok and v.max_rel > 1e-3  # in fp32, swapped rows
    assert v.ok and v.fold_exact and max(o.max_rel for o in v.float64_fold) < 1e-12
    assert "order-selecting" in v.summary()


def test_the_float64_fold_still_catches_a_real_mistake(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken fold (BN scale applied twice) is wrong in float64 as well: verification fails."""
    from repconv import algebra

    real = algebra.conv_then_affine

    def broken(k: object, scale: torch.Tensor, shift: torch.Tensor) -> object:
        return real(real(k, scale, shift), scale, 0 * shift)

    monkeypatch.setattr("repconv.graph.affine.A.conv_then_affine", broken)
    torch.manual_seed(2)
    model = randomize_bn_(TopkHead(depth=2, k=50), 2).eval()
    with pytest.raises(repconv.VerificationError, match="not exact"):
        fuse_with_report(model, torch.randn(1, 32, 16, 16))

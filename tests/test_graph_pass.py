"""The fx pass on code repconv did not write: other class names, Sequential / ModuleList code,
functional convs with computed weights, BN-and-pad slice assignment, reuse, fallbacks.

Reference = the unfused model in eval mode; fp32 tolerance: max|err| <= 1e-5 * max|ref| (see
repconv/verification.py for why)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repconv
from repconv.blocks.common import randomize_bn_
from repconv.pipeline import FuseInputError, fuse_with_report


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_bn_(model, seed).eval()


def count(model: nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------ third-party-style blocks

class BNPad(nn.Module):
    """DBB-official-style BN whose padded border is written with the BN shift."""

    def __init__(self, c: int, pad: int):
        super().__init__()
        self.bn, self.pad = nn.BatchNorm2d(c), pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(x)
        if self.pad > 0:
            v = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / torch.sqrt(
                self.bn.running_var + self.bn.eps)
            out = F.pad(out, [self.pad] * 4)
            v = v.view(1, -1, 1, 1)
            out[:, :, 0:self.pad, :] = v
            out[:, :, -self.pad:, :] = v
            out[:, :, :, 0:self.pad] = v
            out[:, :, :, -self.pad:] = v
        return out


class IdentityPlusConv1x1(nn.Conv2d):
    def __init__(self, c: int):
        super().__init__(c, c, 1, bias=False)
        nn.init.normal_(self.weight, std=0.1)
        self.register_buffer("eye", torch.eye(c).view(c, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight + self.eye, None, 1, 0)


class ThirdPartyDBB(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3):
        super().__init__()
        self.origin = nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2, bias=False), nn.BatchNorm2d(cout))
        self.avg = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), BNPad(cout, k // 2), nn.AvgPool2d(k, 1, 0),
                                 nn.BatchNorm2d(cout))
        self.one = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.seq = nn.Sequential(IdentityPlusConv1x1(cin), BNPad(cin, k // 2),
                                 nn.Conv2d(cin, cout, k, 1, 0, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.origin(x) + self.avg(x) + self.one(x) + self.seq(x))


class Asym(nn.Module):
    """ACNet-style square + vertical + horizontal, attributes named differently."""

    def __init__(self, c: int, k: int = 3):
        super().__init__()
        self.sq = nn.Conv2d(c, c, k, 1, k // 2, bias=False)
        self.sq_bn = nn.BatchNorm2d(c)
        self.ver = nn.Conv2d(c, c, (k, 1), 1, (k // 2, 0), bias=False)
        self.ver_bn = nn.BatchNorm2d(c)
        self.hor = nn.Conv2d(c, c, (1, k), 1, (0, k // 2), bias=False)
        self.hor_bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sq_bn(self.sq(x)) + self.ver_bn(self.ver(x)) + self.hor_bn(self.hor(x))


class SumOfBranches(nn.Module):
    """MobileOne-style: ModuleList branches summed with Python sum(), strided depthwise."""

    def __init__(self, c: int, n: int = 3, stride: int = 2):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c)) for _ in range(n))
        self.scale = nn.Sequential(nn.Conv2d(c, c, 1, stride, 0, groups=c, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(sum(b(x) for b in self.branches) + self.scale(x))


class RepVGGStyle(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.rbr_dense = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
        self.rbr_1x1 = nn.Sequential(nn.Conv2d(c, c, 1, 1, 0, bias=False), nn.BatchNorm2d(c))
        self.rbr_identity = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.rbr_dense(x) + self.rbr_1x1(x) + self.rbr_identity(x))


class Reused(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(c), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_b(self.conv(F.relu(self.bn_a(self.conv(x)))))


class DataDependent(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a = RepVGGStyle(c)
        self.b = RepVGGStyle(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if y.mean() > 0:  # data-dependent Python: not symbolically traceable
            y = y * 2
        return self.b(y)


def seq_bn_first(c: int) -> nn.Module:
    """Plain Sequential: BN before an unpadded 1x1 conv (exact), then conv-BN."""
    return nn.Sequential(nn.BatchNorm2d(c), nn.Conv2d(c, 2 * c, 1), nn.ReLU(),
                         nn.Conv2d(2 * c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))


CASES = [
    ("dbb-official-style", lambda: ThirdPartyDBB(8, 16), (2, 8, 15, 15), 1),
    ("acnet-style", lambda: Asym(8), (2, 8, 12, 11), 1),
    ("acnet-5x5", lambda: Asym(6, 5), (2, 6, 12, 12), 1),
    ("mobileone-sum", lambda: SumOfBranches(8), (2, 8, 15, 15), 1),
    ("repvgg-style", lambda: RepVGGStyle(8), (2, 8, 10, 10), 1),
    ("conv-reused-twice", lambda: Reused(8), (2, 8, 10, 10), 2),
    ("sequential-bn-first", lambda: seq_bn_first(8), (2, 8, 10, 10), 2),
    ("untraceable-falls-back", lambda: DataDependent(8), (2, 8, 10, 10), 2),
]


@pytest.mark.parametrize("name,factory,shape,convs", CASES, ids=[c[0] for c in CASES])
def test_third_party_collapses_to_minimal(name: str, factory, shape: tuple, convs: int) -> None:
    torch.manual_seed(0)
    model = randomize_bn(factory())
    x = torch.randn(shape)
    fused, report = fuse_with_report(model, x)
    assert count(fused, nn.Conv2d) == convs
    assert count(fused, nn.modules.batchnorm._BatchNorm) == 0
    assert max_rel(fused(x), model(x)) < 1e-5
    assert report.verification is not None and report.verification.ok


def test_helper_third_party_cases() -> None:
    """Independent formulations in the style of each paper's official code (tests/thirdparty)."""
    cases = pytest.importorskip("tests.thirdparty").THIRD_PARTY_CASES
    assert cases
    for name, factory, shape, max_convs in cases:
        torch.manual_seed(0)
        model = factory().eval()
        x = torch.randn(shape)
        fused = repconv.fuse(model, x)
        n = count(fused, nn.Conv2d)
        assert n <= max_convs, f"{name}: {n} layers left, expected <= {max_convs}"
        with torch.no_grad():
            assert max_rel(fused(x), model(x)) < 1e-5, name


def test_input_model_untouched_and_result_in_eval() -> None:
    model = randomize_bn(RepVGGStyle(8)).train()
    state = copy.deepcopy(model.state_dict())
    fused, report = fuse_with_report(model, torch.randn(2, 8, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not fused.training
    assert any("train mode" in n for n in report.notes)


def test_untraceable_part_reported() -> None:
    model = randomize_bn(DataDependent(8))
    _, report = fuse_with_report(model, torch.randn(1, 8, 8, 8))
    assert report.untraced and "DataDependent" in report.untraced[0]


def test_result_pickles_scripts() -> None:
    model = randomize_bn(ThirdPartyDBB(4, 8))
    x = torch.randn(1, 4, 9, 9)
    fused = repconv.fuse(model, x)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert torch.allclose(again(x), fused(x))
    assert torch.allclose(torch.jit.script(fused)(x), fused(x))
    assert pickle.loads(pickle.dumps(fused))(x).shape == fused(x).shape


def test_bn_before_padded_conv_is_refused_with_reason() -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4),
                                       nn.Conv2d(4, 4, 3, padding=1)))
    fused, report = fuse_with_report(model, torch.randn(1, 4, 8, 8))
    assert count(fused, nn.BatchNorm2d) == 1
    assert any("border" in r.reason for r in report.left)


def test_bn_without_running_stats_is_left() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    fused, report = fuse_with_report(model, torch.randn(2, 4, 8, 8))
    assert count(fused, nn.BatchNorm2d) == 1
    assert any("running statistics" in r.reason for r in report.left)


def test_nan_weights_rejected() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    model[0].weight.data[0, 0, 0, 0] = float("nan")
    with pytest.raises(FuseInputError, match="NaN"):
        repconv.fuse(model, torch.randn(1, 3, 8, 8))


def test_wrong_input_shape_names_expected_dims() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(FuseInputError, match=r"C=3"):
        repconv.fuse(model, torch.randn(1, 5, 8, 8))


def test_linear_bn_and_layernorm_into_linear() -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(16, 8), nn.BatchNorm1d(8)
            self.norm, self.proj = nn.LayerNorm(8), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(self.norm(F.gelu(self.bn(self.fc(x)))))

    model = randomize_bn(Head())
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-1, 1)
    x = torch.randn(5, 16)
    fused, report = fuse_with_report(model, x)
    assert count(fused, nn.BatchNorm1d) == 0
    norms = [m for m in fused.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 1 and not norms[0].elementwise_affine
    assert max_rel(fused(x), model(x)) < 1e-5


def test_verification_failure_names_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Corrupt the algebra on purpose: fuse must refuse to return the wrong model."""
    from repconv.algebra import conv as conv_algebra

    real = conv_algebra.conv_then_affine

    def broken(k, scale, shift):  # type: ignore[no-untyped-def]
        out = real(k, scale, shift)
        return type(out)(out.weight, out.bias + 1.0, out.geom)

    monkeypatch.setattr("repconv.graph.affine.A.conv_then_affine", broken)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                       nn.Conv2d(4, 4, 1)))
    with pytest.raises(repconv.VerificationError) as info:
        repconv.fuse(model, torch.randn(1, 3, 8, 8))
    assert info.value.report.first_divergence == "1"
    assert not info.value.report.ok


def test_repmlp_block_merges_local_convs_into_fc() -> None:
    """repconv's RepMLPBlock asks fuse to run its own conversion (reshapes hide the algebra)."""
    from repconv.blocks import RepMLPBlock, randomize_bn_

    model = randomize_bn_(RepMLPBlock(16, 16, 16, 16, 8, 8)).eval()
    x = torch.randn(2, 16, 16, 16)
    fused, report = fuse_with_report(model, x)
    assert count(fused, nn.BatchNorm2d) == 0
    assert count(fused, nn.Conv2d) == 1  # only fc3 (as a 1x1 grouped conv) is left
    assert any("self re-parameterized" in n for n in report.notes)
    assert max_rel(fused(x), model(x)) < 1e-5
    assert all(isinstance(m, nn.Module) for m in model.modules()) and not getattr(model, "deployed", False)


def test_public_api_names_survive_submodule_imports() -> None:
    """Importing every submodule must not shadow the lazily exported functions."""
    import repconv.cli.main  # noqa: F401
    import repconv.export.onnx  # noqa: F401
    import repconv.pipeline  # noqa: F401

    for name in ("fuse", "verify", "export_onnx", "load_model"):
        assert callable(getattr(repconv, name)), name


class ConvNeXtStyle(nn.Module):
    """timm/ConvNeXt-style channels-last block: LayerNorm and Linear on a rank-4 tensor, layer scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


def test_channels_last_layernorm_and_layer_scale_fold_into_linears() -> None:
    model = randomize_bn(ConvNeXtStyle(16))
    x = torch.randn(2, 16, 9, 9)
    fused, report = fuse_with_report(model, x)
    norms = [m for m in fused.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 1 and not norms[0].elementwise_affine  # its affine went into pwconv1
    assert count(fused, nn.Linear) == 2
    assert "mul" not in fused.code  # layer scale folded into pwconv2
    assert len(report.regions) == 2
    assert max_rel(fused(x), model(x)) < 1e-5


def test_in_place_op_on_root_after_region_starts() -> None:
    """The fused conv reads its input where the region began, before a later in-place ReLU on it."""

    class Mutating(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            z = self.relu(x)  # mutates x in place after the conv has read it
            return self.bn(y) + z

    model = randomize_bn(Mutating())
    x = torch.randn(2, 4, 8, 8)
    fused = repconv.fuse(model, x.clone())
    assert count(fused, nn.BatchNorm2d) == 0
    assert max_rel(fused(x.clone()), model(x.clone())) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_fuse_in_their_dtype(dtype: torch.dtype) -> None:
    """The fold runs in fp64 and is cast to the model's dtype; the check allows that dtype's ulps."""
    model = randomize_bn(RepVGGStyle(8)).to(dtype)
    x = torch.randn(2, 8, 10, 10, dtype=dtype)
    fused, report = fuse_with_report(model, x)
    assert next(fused.parameters()).dtype == dtype
    assert report.verification.ok
    assert max_rel(fused(x).double(), model.double()(x.double())) < (1e-10 if dtype == torch.float64 else 2e-2)

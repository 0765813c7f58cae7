"""repconv.export_onnx: the Involution node, its function fallback, native kernel, third-party code."""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repconv
from repconv.export import involution_onnx as inv_onnx
from repconv.export.onnx import (
    ExportCheckError,
    ExportError,
    UnsupportedOperatorError,
    count_custom_nodes,
    export_onnx,
    export_onnx_with_report,
)
from repconv.export.patterns import rewrite_involutions
from repconv.ops import involution

# ------------------------------------------------------------------------------------------------ models


class OpInvolution(nn.Module):
    """Involution through repconv's op: kernel branch + torch.ops.repconv.involution."""

    def __init__(self, channels: int = 8, k: int = 3, stride: int = 2, groups: int = 2) -> None:
        super().__init__()
        self.k, self.stride, self.groups = k, stride, groups
        self.pool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()
        self.reduce = nn.Sequential(nn.Conv2d(channels, channels // 2, 1), nn.BatchNorm2d(channels // 2), nn.ReLU())
        self.span = nn.Conv2d(channels // 2, groups * k * k, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.span(self.reduce(self.pool(x)))
        return involution(x, kernel, self.k, self.stride, 1, self.groups)


class PaperStyleInvolution(nn.Module):
    """Third-party style: the paper's naive module with other attribute names and nn.Unfold."""

    def __init__(self, planes: int, ksize: int, step: int, chans_per_group: int = 4) -> None:
        super().__init__()
        self.ksize, self.step, self.planes = ksize, step, planes
        self.cpg = chans_per_group
        self.n_heads = planes // chans_per_group
        self.squeeze = nn.Sequential(nn.Conv2d(planes, planes // 4, 1, bias=False), nn.BatchNorm2d(planes // 4),
                                     nn.ReLU(inplace=True))
        self.expand = nn.Conv2d(planes // 4, ksize * ksize * self.n_heads, 1)
        self.down = nn.AvgPool2d(step, step) if step > 1 else None
        self.patches = nn.Unfold(ksize, 1, (ksize - 1) // 2, step)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        src = feat if self.down is None else self.down(feat)
        wgt = self.expand(self.squeeze(src))
        b, _, h, w = wgt.shape
        wgt = wgt.view(b, self.n_heads, self.ksize ** 2, h, w).unsqueeze(2)
        cols = self.patches(feat).view(b, self.n_heads, self.cpg, self.ksize ** 2, h, w)
        return (wgt * cols).sum(dim=3).view(b, self.planes, h, w)


class FunctionalInvolution(nn.Module):
    """Look-alike with F.unfold, reshape, operands swapped, torch.sum(..., -3), dilation."""

    def __init__(self, c: int, k: int, groups: int, dil: int) -> None:
        super().__init__()
        self.k, self.g, self.d = k, groups, dil
        self.gen = nn.Conv2d(c, groups * k * k, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        cols = F.unfold(x, self.k, dilation=self.d, padding=self.d * (self.k - 1) // 2)
        cols = cols.reshape(n, self.g, c // self.g, self.k * self.k, h, w)
        wk = self.gen(x).reshape(n, self.g, 1, self.k * self.k, h, w)
        return torch.sum(cols * wk, -3).reshape(n, c, h, w)


class NotInvolution(nn.Module):
    """Unfold-multiply-sum over the wrong axis (channels): must NOT be rewritten."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = nn.Conv2d(4, 9, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        cols = F.unfold(x, 3, padding=1).view(n, 1, c, 9, h, w)
        return (cols * self.gen(x).view(n, 1, 1, 9, h, w)).sum(dim=2)


class LocallyConnected(nn.Module):
    """Same unfold-multiply-sum, but the kernel is a parameter: not involution, must be left alone."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 2, 1, 9, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        cols = F.unfold(x, 3, padding=1).view(n, 2, c // 2, 9, h, w)
        return (cols * self.weight).sum(dim=3).view(n, c, h, w)


def naive_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         PaperStyleInvolution(16, 3, 1), PaperStyleInvolution(16, 5, 2), nn.Conv2d(16, 8, 1))


def op_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), OpInvolution(8, 3, 2, 2),
                         nn.Conv2d(8, 4, 1))


def _randomize(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def _calibrate(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Set BN running statistics from train-mode passes, so a deep untrained net stays finite in eval."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for seed in range(2):
            model(torch.randn(*shape, generator=torch.Generator().manual_seed(100 + seed)))
    return model.eval()


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _run(path, x: torch.Tensor, sess_options=None) -> np.ndarray:
    sess = ort.InferenceSession(str(path), sess_options, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _assert_close(got: np.ndarray, ref: torch.Tensor, tol: float = 1e-4) -> None:
    ref_np = ref.detach().numpy()
    assert got.shape == ref_np.shape
    np.testing.assert_allclose(got, ref_np, rtol=tol, atol=tol * max(1.0, float(np.abs(ref_np).max())))


def _custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == inv_onnx.DOMAIN]


# ------------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def op_export(tmp_path_factory):
    model = _randomize(op_net())
    path = tmp_path_factory.mktemp("op") / "op.onnx"
    report = export_onnx_with_report(model, path, _x(1, 3, 16, 16))
    return model, path, report


def test_involution_node_and_attributes(op_export):
    _, path, report = op_export
    m = onnx.load(str(path))
    nodes = _custom_nodes(m)
    assert len(nodes) == 1 and report.custom_nodes == 1
    node = nodes[0]
    assert node.op_type == "Involution" and len(node.input) == 2 and len(node.output) == 1
    attrs = {a.name: (a.type, a.i) for a in node.attribute}
    assert attrs == {name: (onnx.AttributeProto.INT, v) for name, v in
                     dict(kernel_size=3, stride=2, dilation=1, groups=2, padding=1).items()}
    imports = {o.domain: o.version for o in m.opset_import}
    assert imports == {"": 17, "ai.repconv": 1}
    (fn,) = [f for f in m.functions if f.domain == "ai.repconv" and f.name == "Involution"]
    assert {o.domain: o.version for o in fn.opset_import}[""] == 17
    assert 8 <= m.ir_version <= inv_onnx.IR_VERSION
    onnx.checker.check_model(m, full_check=True)
    # The kernel-generation branch's BN was fused into its conv.
    assert not any(n.op_type == "BatchNormalization" for n in m.graph.node)
    assert report.fused and report.simplified


def test_function_fallback_equals_pytorch(op_export):
    model, path, report = op_export
    x = _x(1, 3, 16, 16)
    with torch.no_grad():
        _assert_close(_run(path, x), model(x))  # a plain session: no registration anywhere
    assert report.checks[0].runtime == "function" and report.checks[0].ok


def test_native_kernel_equals_pytorch(op_export):
    runtime = pytest.importorskip("repconv.runtime", reason="repconv.runtime not in this checkout")
    if not hasattr(runtime, "native_library"):
        pytest.skip("repconv.runtime has no native_library() in this checkout")
    if runtime.native_library() is None:
        pytest.skip("native ORT kernel not built (repconv.runtime.native_library() is None)")
    model, path, report = op_export
    x = _x(2, 3, 16, 16)  # the file has a static batch of 1; build a batch-2 export for the native run
    path2 = path.with_name("op_b2.onnx")
    export_onnx(model, path2, x)
    with torch.no_grad():
        _assert_close(_run(path2, x, runtime.session_options()), model(x))
    assert report.native_available and report.native_used


def test_dynamic_batch(tmp_path):
    model = _randomize(op_net())
    path = tmp_path / "dyn.onnx"
    report = export_onnx_with_report(model, path, _x(1, 3, 16, 16), dynamic_batch=True)
    assert sorted(c.batch for c in report.checks if c.runtime == "function") == [1, 3]
    m = onnx.load(str(path))
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert m.graph.output[0].type.tensor_type.shape.dim[0].dim_param
    for n in (1, 3):
        x = _x(n, 3, 16, 16)
        with torch.no_grad():
            _assert_close(_run(path, x), model(x))


def test_third_party_naive_involution(tmp_path):
    model = _randomize(naive_net())
    x = _x(2, 3, 16, 16)
    rewritten, found = rewrite_involutions(model, (x,))
    assert [(f.where, f.kernel_size, f.stride, f.groups) for f in found] == [("3", 3, 1, 4), ("4", 5, 2, 4)]
    assert not any(isinstance(m, nn.Unfold) for m in rewritten.modules())
    path = tmp_path / "naive.onnx"
    report = export_onnx_with_report(model, path, x)
    m = onnx.load(str(path))
    assert count_custom_nodes(m) == 2 and len(report.involutions) == 2
    attrs = [{a.name: a.i for a in n.attribute} for n in _custom_nodes(m)]
    assert attrs == [dict(kernel_size=3, stride=1, dilation=1, groups=4, padding=1),
                     dict(kernel_size=5, stride=2, dilation=1, groups=4, padding=2)]
    assert not any(n.op_type in ("Im2Col", "Col2Im", "ReduceSum") for n in m.graph.node)
    with torch.no_grad():
        _assert_close(_run(path, x), model(x))


@pytest.mark.parametrize("k,groups,dil", [(3, 1, 2), (5, 4, 1), (3, 8, 1)])
def test_functional_lookalike(tmp_path, k, groups, dil):
    model = FunctionalInvolution(8, k, groups, dil).eval()
    x = _x(1, 8, 12, 12)
    path = tmp_path / "f.onnx"
    report = export_onnx_with_report(model, path, x, dynamic_batch=True)
    assert [(i.kernel_size, i.dilation, i.groups) for i in report.involutions] == [(k, dil, groups)]
    assert count_custom_nodes(onnx.load(str(path))) == 1
    with torch.no_grad():
        _assert_close(_run(path, _x(3, 8, 12, 12)), model(_x(3, 8, 12, 12)))


def test_lookalike_over_wrong_axis_is_left_alone(tmp_path):
    model = NotInvolution().eval()
    x = _x(1, 4, 8, 8)
    assert rewrite_involutions(model, (x,))[1] == []
    path = tmp_path / "n.onnx"
    export_onnx(model, path, x)
    m = onnx.load(str(path))
    assert count_custom_nodes(m) == 0 and not m.functions
    with torch.no_grad():
        _assert_close(_run(path, x), model(x))


def test_fixed_kernel_is_not_involution():
    x = _x(1, 4, 8, 8)
    assert rewrite_involutions(LocallyConnected().eval(), (x,))[1] == []


def test_inplace_first_layer_does_not_corrupt_check(tmp_path):
    model = nn.Sequential(nn.ReLU(inplace=True), PaperStyleInvolution(8, 3, 1)).eval()
    x = _x(1, 8, 8, 8)
    keep = x.clone()
    report = export_onnx_with_report(model, tmp_path / "i.onnx", x)
    assert torch.equal(x, keep) and report.custom_nodes == 1


def test_untraceable_model_rewrites_traceable_parts(tmp_path):
    class Gate(nn.Module):  # data-dependent Python control flow: fx cannot trace the whole model
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.inv = PaperStyleInvolution(16, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.stem(x)
            if float(y.mean()) > 1e9:
                y = y * 2
            return self.inv(y)

    model = _randomize(Gate())
    x = _x(1, 3, 12, 12)
    report = export_onnx_with_report(model, tmp_path / "g.onnx", x)
    assert [i.where for i in report.involutions] == ["inv"]
    assert report.custom_nodes == 1
    with torch.no_grad():
        _assert_close(_run(tmp_path / "g.onnx", x), model(x))


def test_plain_model_has_no_custom_domain(tmp_path):
    model = _randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten(), nn.Linear(8, 5)))
    x = _x(1, 3, 16, 16)
    path = repconv.export_onnx(model, tmp_path / "plain.onnx", x, opset=13)
    m = onnx.load(str(path))
    assert {o.domain for o in m.opset_import} == {""} and not m.functions
    assert {o.version for o in m.opset_import} == {13}
    with torch.no_grad():
        _assert_close(_run(path, x), model(x))


def test_no_simplify_no_fuse_keeps_batchnorm(tmp_path):
    model = _randomize(op_net())
    report = export_onnx_with_report(model, tmp_path / "raw.onnx", _x(1, 3, 16, 16), fuse=False, simplify=False)
    m = onnx.load(str(tmp_path / "raw.onnx"))
    assert not report.fused and not report.simplified
    assert count_custom_nodes(m) == 1
    assert any(n.op_type == "BatchNormalization" for n in m.graph.node) or report.nodes_final > 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script is deprecated, still loadable
def test_torchscript_module_exports(tmp_path):
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    scripted = torch.jit.script(model)
    x = _x(1, 3, 10, 10)
    export_onnx(scripted, tmp_path / "s.onnx", x)
    with torch.no_grad():
        _assert_close(_run(tmp_path / "s.onnx", x), model(x))


def test_caller_model_untouched(tmp_path):
    model = naive_net()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "t.onnx", _x(1, 3, 16, 16))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, nn.Unfold) for m in model.modules())


# ---------------------------------------------------------------------------------------- failures


class _FFT(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft2(x).abs()


class _Noisy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)  # never reproducible: ORT draws other numbers


def test_unsupported_operator_names_op_and_module(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), _FFT()))
    target = tmp_path / "u.onnx"
    with pytest.raises(UnsupportedOperatorError) as info:
        export_onnx(model, target, _x(1, 3, 8, 8))
    msg = str(info.value)
    assert "aten::fft_rfft2" in msg and "1.1" in msg and "_FFT" in msg and "\n" not in msg
    assert info.value.op == "aten::fft_rfft2"
    assert list(tmp_path.iterdir()) == []


def test_mismatch_raises_and_leaves_no_file(tmp_path):
    target = tmp_path / "n.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(ExportCheckError, match="differs from PyTorch"):
        export_onnx(nn.Sequential(nn.Conv2d(3, 4, 1), _Noisy()), target, _x(1, 3, 8, 8), fuse=False)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["n.onnx"]


def test_wrong_input_shape(tmp_path):
    with pytest.raises(ExportError, match="does not accept input"):
        export_onnx(nn.Conv2d(3, 4, 3), tmp_path / "w.onnx", _x(1, 5, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_bad_opset(tmp_path):
    with pytest.raises(ExportError, match="opset"):
        export_onnx(nn.Conv2d(3, 4, 3), tmp_path / "o.onnx", _x(1, 3, 8, 8), opset=99)
    with pytest.raises(ExportError, match="opset >= 13"):
        export_onnx(OpInvolution(8, 3, 1, 2), tmp_path / "o.onnx", _x(1, 8, 8, 8), opset=11)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- model zoo


def _has(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has("repconv.blocks.rednet"), reason="repconv.blocks.rednet not in this checkout")
def test_rednet26_exports_and_matches(tmp_path):
    from repconv.blocks.rednet import rednet26

    model = _calibrate(rednet26(num_classes=10), (2, 3, 64, 64))
    x = _x(1, 3, 64, 64)
    report = export_onnx_with_report(model, tmp_path / "rednet26.onnx", x)
    assert report.custom_nodes == sum(1 for _ in _involution_modules(model))
    assert report.custom_nodes >= 8
    with torch.no_grad():
        _assert_close(_run(tmp_path / "rednet26.onnx", x), model(x))


def _involution_modules(model: nn.Module):
    from repconv.blocks.involution import Involution

    return (m for m in model.modules() if isinstance(m, Involution))


def _third_party_cases() -> list:
    try:
        from tests.thirdparty import THIRD_PARTY_CASES
    except ImportError:
        return []
    return list(THIRD_PARTY_CASES)


@pytest.mark.parametrize("case", _third_party_cases() or [None], ids=lambda c: c[0] if c else "none")
def test_third_party_cases_export(tmp_path, case):
    if case is None:
        pytest.skip("tests/thirdparty.THIRD_PARTY_CASES not in this checkout")
    name, factory, input_shape, _expected_convs = case
    model = _randomize(factory())
    x = _x(*input_shape)
    path = export_onnx(model, tmp_path / f"{name}.onnx", x)
    with torch.no_grad():
        _assert_close(_run(path, x), model(x))

"""per_sample_conv2d (the batch-as-groups conv behind CondConv / WeightNet / D-DW / DRConv) and the
model-level ``repconv.dynamic.to_deploy``."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.fx
import torch.nn.functional as F

from repconv.dynamic import CondConv2d, mixer_tiny, onnx_static_batch, to_deploy
from repconv.dynamic._common import (
    adaptive_avg_pool2d,
    max_pool2d_same,
    per_sample_conv2d,
    per_sample_conv2d_grouped,
    per_sample_conv2d_matmul,
)
from repconv.dynamic.testing import export_dynamic_onnx, max_rel_err, ort_session

torch.fx.wrap("per_sample_conv2d")  # imported by name: wrap here too (what repconv's own modules do)
torch.fx.wrap("max_pool2d_same")

GEOMETRIES = [  # (C, O, groups, kernel, stride, padding, dilation)
    (8, 6, 1, (3, 3), 1, (1, 1), 1),
    (8, 6, 2, (3, 3), 2, (1, 1), 1),
    (8, 8, 8, (5, 5), 1, (2, 2), 1),    # depth-wise
    (8, 16, 8, (3, 3), 2, (2, 2), 2),   # depth multiplier 2
    (6, 4, 1, (1, 1), 1, (0, 0), 1),
    (8, 8, 1, (3, 1), 1, (1, 0), 1),
    (4, 6, 2, (3, 3), 3, (0, 0), 2),    # no padding, stride 3
]

@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: small tensors, and far less sensitive to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def _loop(x, w, b, stride, padding, dilation, groups):
    return torch.cat([F.conv2d(x[i:i + 1], w[i], b, stride, padding, dilation, groups) for i in range(x.shape[0])])


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("batch", [1, 3])
def test_per_sample_conv_forms_match_loop(geom, batch):
    c, o, g, k, s, p, d = geom
    torch.manual_seed(0)
    x, w, b = torch.randn(batch, c, 9, 10), torch.randn(batch, o, c // g, *k), torch.randn(o)
    ref = _loop(x, w, b, s, p, d, g)
    for fn in (per_sample_conv2d_grouped, per_sample_conv2d_matmul):
        assert max_rel_err(ref, fn(x, w, b, (s, s), p, (d, d), g)) < 1e-5, fn.__name__


def test_per_sample_conv_is_one_fx_node():
    class M(torch.nn.Module):
        def forward(self, x, w):
            return per_sample_conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1)

    gm = torch.fx.symbolic_trace(M())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [per_sample_conv2d]


def test_static_batch_context_exports_one_grouped_conv(tmp_path):
    m = CondConv2d(8, 8, 3, num_experts=4).to_deploy()
    x = torch.randn(2, 8, 6, 6)
    with onnx_static_batch():
        data = export_dynamic_onnx(m, x, dynamic_batch=False, use_repconv=False)
    model = onnx.load_from_string(data)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 1 and {a.name: a.i for a in convs[0].attribute}["group"] == 2
    got = ort_session(data).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert max_rel_err(m(x), got) < 1e-5
    # the default (dynamic) export has no Conv: im2col + MatMul
    model = onnx.load_from_string(export_dynamic_onnx(m, x, use_repconv=False))
    assert not [n for n in model.graph.node if n.op_type == "Conv"]


def test_to_deploy_replaces_nested_dynamic_modules():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                            CondConv2d(8, 8, 3, num_experts=4))

        def forward(self, x):
            return self.body(x)

    net = Net().eval()
    d = to_deploy(net)
    assert not any(isinstance(m, CondConv2d | torch.nn.BatchNorm2d) for m in d.modules())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert max_rel_err(net(x), d(x)) < 1e-5
    assert isinstance(net.body[2], CondConv2d)  # the input model is untouched


def test_to_deploy_with_generic_fuse():
    pytest.importorskip("repconv.pipeline")
    m = mixer_tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    d = to_deploy(m, (x,))
    with torch.no_grad():
        assert max_rel_err(m(x), d(x)) < 1e-5


@pytest.mark.parametrize("h, w, k", [(14, 14, 3), (28, 13, 3), (9, 9, 3), (7, 5, 5), (6, 6, 1), (5, 11, 4)])
def test_exportable_adaptive_avg_pool_matches_torch(h, w, k):
    x = torch.randn(2, 3, h, w)
    torch.testing.assert_close(adaptive_avg_pool2d(x, k), F.adaptive_avg_pool2d(x, k))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_separable_max_pool_matches_torch_and_exports_as_maxpool(k):
    x = torch.randn(2, 3, 7, 9)
    torch.testing.assert_close(max_pool2d_same(x, k), F.max_pool2d(x, k, 1, k // 2), rtol=0, atol=0)

    class M(torch.nn.Module):
        def forward(self, x):
            return max_pool2d_same(x, k)

    model = onnx.load_from_string(export_dynamic_onnx(torch.fx.symbolic_trace(M()), x, use_repconv=False))
    assert [n.op_type for n in model.graph.node] == ["MaxPool"]

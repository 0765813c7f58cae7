"""repconv::involution: torch op vs the unfold reference, autograd, fake kernel, ONNX function in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from repconv.export import involution_onnx as inv_onnx
from repconv.ops.involution import involution, involution_output_size, involution_reference


def _inputs(n, c, h, w, k, s, g, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    kernel = torch.randn(n, g * k * k, ho, wo, generator=gen, dtype=dtype)
    return x, kernel


# (N, C, H, W, K, stride, dilation, groups)
CONFIGS = [
    (2, 8, 9, 11, 3, 1, 1, 2),
    (1, 12, 7, 8, 5, 2, 2, 3),
    (2, 4, 5, 5, 1, 2, 1, 1),
    (1, 6, 13, 10, 9, 2, 3, 2),
    (3, 16, 15, 17, 7, 1, 1, 4),
    (2, 16, 57, 57, 7, 2, 1, 1),
    (1, 9, 4, 3, 7, 1, 3, 3),  # padding larger than the image
    (2, 4, 1, 1, 3, 2, 1, 4),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_op_matches_reference(cfg):
    n, c, h, w, k, s, d, g = cfg
    x, kernel = _inputs(n, c, h, w, k, s, g)
    got = involution(x, kernel, k, s, d, g)
    ref = involution_reference(x, kernel, k, s, d, g)
    assert got.shape == (n, c, involution_output_size(h, k, s, d), involution_output_size(w, k, s, d))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_op_direct_matches_wrapper_float32():
    x, kernel = _inputs(2, 8, 10, 9, 3, 1, 2, dtype=torch.float32)
    ref = involution_reference(x, kernel, 3, 1, 1, 2)
    torch.testing.assert_close(torch.ops.repconv.involution(x, kernel, 3, 1, 1, 2), ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 2),
    cg=st.integers(1, 3),
    g=st.integers(1, 3),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    k=st.sampled_from([1, 3, 5, 7, 9]),
    s=st.integers(1, 2),
    d=st.integers(1, 3),
)
def test_op_matches_reference_random(n, cg, g, h, w, k, s, d):
    x, kernel = _inputs(n, cg * g, h, w, k, s, g)
    torch.testing.assert_close(
        involution(x, kernel, k, s, d, g), involution_reference(x, kernel, k, s, d, g), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("cfg", [(2, 4, 6, 7, 3, 1, 1, 2), (1, 6, 7, 5, 5, 2, 2, 3)])
def test_gradcheck(cfg):
    n, c, h, w, k, s, d, g = cfg
    x, kernel = _inputs(n, c, h, w, k, s, g)
    x.requires_grad_(True)
    kernel.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: involution(a, b, k, s, d, g), (x, kernel))


def test_backward_only_x_or_kernel():
    x, kernel = _inputs(1, 4, 5, 5, 3, 1, 2)
    x.requires_grad_(True)
    involution(x, kernel, 3, 1, 1, 2).sum().backward()
    assert x.grad is not None and kernel.grad is None
    ref_x = x.detach().clone().requires_grad_(True)
    involution_reference(ref_x, kernel, 3, 1, 1, 2).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_opcheck():
    if not hasattr(torch.library, "opcheck"):
        pytest.skip("torch.library.opcheck not available in this torch")
    x, kernel = _inputs(2, 6, 7, 6, 3, 2, 3)
    x.requires_grad_(True)
    kernel.requires_grad_(True)
    # aot_dispatch_dynamic is skipped: it compiles through dynamo (tens of seconds) and torch.export
    # below covers the fake kernel with dynamic shapes.
    torch.library.opcheck(
        torch.ops.repconv.involution.default,
        (x, kernel, 3, 2, 1, 3),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gen = torch.nn.Conv2d(8, 2 * 9, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return involution(x, self.gen(x), 3, 1, 1, 2)


def test_fx_and_export():
    m = _Tiny()
    gm = torch.fx.symbolic_trace(m)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.repconv.involution]
    x = torch.randn(2, 8, 10, 10)
    ep = torch.export.export(m, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}})
    assert any(n.target == torch.ops.repconv.involution.default for n in ep.graph.nodes)
    x3 = torch.randn(3, 8, 10, 10)
    torch.testing.assert_close(ep.module()(x3), m(x3))


def test_meta_tensors():
    x = torch.empty(2, 8, 9, 9, device="meta")
    k = torch.empty(2, 18, 5, 5, device="meta")
    assert involution(x, k, 3, 2, 1, 2).shape == (2, 8, 5, 5)


@pytest.mark.parametrize(
    ("xs", "ks", "args", "msg"),
    [
        ((1, 6, 8, 8), (1, 36, 8, 8), (3, 1, 1, 4), "divisible by groups"),
        ((1, 8, 8, 8), (1, 32, 8, 8), (4, 1, 1, 2), "odd"),
        ((1, 8, 8, 8), (1, 18, 8, 7), (3, 1, 1, 2), r"kernel shape must be \(N, G\*K\*K, Ho, Wo\) = \(1, 18, 8, 8\)"),
        ((1, 8, 9, 9), (1, 18, 4, 4), (3, 2, 1, 2), r"\(1, 18, 5, 5\)"),
        ((1, 8, 8), (1, 18, 8, 8), (3, 1, 1, 2), "4-D"),
        ((1, 8, 8, 8), (1, 18, 8, 8), (3, 0, 1, 2), "stride"),
    ],
)
def test_bad_arguments(xs, ks, args, msg):
    with pytest.raises(ValueError, match=msg):
        involution(torch.randn(xs), torch.randn(ks), *args)


def test_dtype_mismatch():
    with pytest.raises(ValueError, match="dtypes differ"):
        involution(torch.randn(1, 2, 4, 4), torch.randn(1, 9, 4, 4, dtype=torch.float64), 3)


def test_direct_op_call_validates():
    with pytest.raises(ValueError, match="kernel shape"):
        torch.ops.repconv.involution(torch.randn(1, 2, 4, 4), torch.randn(1, 9, 4, 3), 3, 1, 1, 1)


# ------------------------------------------------------------------------------------------------
# The ai.repconv::Involution ONNX function, run by a plain onnxruntime.InferenceSession
# ------------------------------------------------------------------------------------------------


def _plain_session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("opset", [13, 17, 21])
@pytest.mark.parametrize("cfg", CONFIGS[:6], ids=lambda c: "x".join(map(str, c)))
def test_onnx_function_matches_torch(cfg, opset):
    n, c, h, w, k, s, d, g = cfg
    model = inv_onnx.involution_model(c, k, s, d, g, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == inv_onnx.IR_VERSION
    (fn,) = model.functions
    assert (fn.domain, fn.name) == (inv_onnx.DOMAIN, inv_onnx.OP_TYPE)
    assert [(o.domain, o.version) for o in fn.opset_import] == [("", opset)]
    x, kernel = _inputs(n, c, h, w, k, s, g, dtype=torch.float32)
    (y,) = _plain_session(model).run(None, {"x": x.numpy(), "kernel": kernel.numpy()})
    np.testing.assert_allclose(y, involution_reference(x, kernel, k, s, d, g).numpy(), rtol=1e-5, atol=1e-5)


def test_onnx_function_dynamic_batch_and_two_nodes():
    """One function serves nodes with different attributes; the batch dim stays symbolic."""
    from onnx import TensorProto, helper

    c, h = 8, 11
    n1 = inv_onnx.make_involution_node("x", "k1", "y1", 3, 1, 1, 2, name="inv_a")
    n2 = inv_onnx.make_involution_node("y1", "k2", "y", 5, 2, 2, 4, name="inv_b")
    graph = helper.make_graph(
        [n1, n2],
        "two",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, h, h]),
            helper.make_tensor_value_info("k1", TensorProto.FLOAT, ["N", 18, h, h]),
            helper.make_tensor_value_info("k2", TensorProto.FLOAT, ["N", 100, 6, 6]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 6, 6])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=inv_onnx.IR_VERSION
    )
    inv_onnx.ensure_involution_function(model)
    inv_onnx.ensure_involution_function(model)  # idempotent
    assert len(model.functions) == 1
    onnx.checker.check_model(model, full_check=True)
    sess = _plain_session(model)
    for n in (1, 3):
        x, k1 = _inputs(n, c, h, h, 3, 1, 2, dtype=torch.float32, seed=n)
        k2 = torch.randn(n, 100, 6, 6)
        (y,) = sess.run(None, {"x": x.numpy(), "k1": k1.numpy(), "k2": k2.numpy()})
        ref = involution_reference(involution_reference(x, k1, 3, 1, 1, 2), k2, 5, 2, 2, 4)
        np.testing.assert_allclose(y, ref.numpy(), rtol=1e-4, atol=1e-4)


def test_onnx_function_rejects_bad_kernel_shape():
    model = inv_onnx.involution_model(8, 3, 1, 1, 2)  # symbolic H, W: only the function can notice
    sess = _plain_session(model)
    x = np.zeros((1, 8, 10, 10), np.float32)
    with pytest.raises(Exception, match="Reshape|reshape"):
        sess.run(None, {"x": x, "kernel": np.zeros((1, 18, 9, 10), np.float32)})


def test_onnx_function_opset_floor():
    with pytest.raises(ValueError, match="opset >= 13"):
        inv_onnx.involution_function(12)
    with pytest.raises(ValueError, match="odd"):
        inv_onnx.make_involution_node("x", "k", "y", 4)


# ------------------------------------------------------------------------------------------------
# every runtime: the function (Loop with an explicit cond) in onnx.reference, the standard-op form
# ------------------------------------------------------------------------------------------------


def _feeds(cfg, batch=None):
    n, c, h, w, k, s, d, g = cfg
    x, kernel = _inputs(batch or n, c, h, w, k, s, g, dtype=torch.float32)
    return {"x": x.numpy(), "kernel": kernel.numpy()}, involution_reference(x, kernel, k, s, d, g).numpy()


def _close(got, ref):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_onnx_function_in_reference_evaluator(cfg):
    """onnx.reference returned wrong outputs (rel. error ~1) when the Loop's cond was omitted."""
    from onnx.reference import ReferenceEvaluator

    n, c, h, w, k, s, d, g = cfg
    feeds, ref = _feeds(cfg)
    (y,) = ReferenceEvaluator(inv_onnx.involution_model(c, k, s, d, g, h, w, opset=18)).run(None, feeds)
    _close(y, ref)


def _standard(cfg, phases=True, batch="N"):
    from repconv.export.forms import expand_involutions

    n, c, h, w, k, s, d, g = cfg
    model = expand_involutions(inv_onnx.involution_model(c, k, s, d, g, h, w, batch=batch, opset=18), phases=phases)
    onnx.checker.check_model(model, full_check=True)
    assert not model.functions and {o.domain for o in model.opset_import} == {""}
    assert {nd.op_type for nd in model.graph.node} <= {"Pad", "Reshape", "Transpose", "Split", "Slice", "Mul", "Add"}
    return model


@pytest.mark.parametrize("phases", [True, False], ids=["phases", "strided"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_standard_form_in_onnxruntime_and_reference(cfg, phases):
    from onnx.reference import ReferenceEvaluator

    model = _standard(cfg, phases)
    for batch in (cfg[0], cfg[0] + 1):  # the batch axis stays symbolic
        feeds, ref = _feeds(cfg, batch)
        _close(_plain_session(model).run(None, feeds)[0], ref)
        _close(ReferenceEvaluator(model).run(None, feeds)[0], ref)


@pytest.mark.thirdparty
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_standard_form_in_openvino_and_tract(cfg, tmp_path):
    from repconv.export import runtimes

    path = tmp_path / "inv.onnx"
    onnx.save(_standard(cfg), str(path))
    for rt in ("openvino", "tract"):
        run = runtimes.load(rt, path)
        for batch in (cfg[0], cfg[0] + 1):
            feeds, ref = _feeds(cfg, batch)
            _close(run(feeds)[0], ref)


def test_standard_form_needs_static_spatial_dims():
    from repconv.export.forms import FormError, expand_involutions

    with pytest.raises(FormError, match="static channels, height and width"):
        expand_involutions(inv_onnx.involution_model(8, 3, 1, 1, 2))  # symbolic H, W

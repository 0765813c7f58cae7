"""The native ai.repconv::Involution kernel for ONNX Runtime (repconv/runtime/csrc).

Skipped when the library is not built (``python -m repconv.runtime.build``). Anything that could
crash the process (bad shapes reaching C++) runs in a subprocess so a crash fails one test instead
of killing pytest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from repconv import runtime
from repconv.export import involution_onnx as inv_onnx
from repconv.ops.involution import involution

LIB = runtime.native_library()
pytestmark = pytest.mark.skipif(
    LIB is None,
    reason="native ORT library not built (or stale): run `python -m repconv.runtime.build` to enable these tests",
)


def _session(model: onnx.ModelProto, *, native: bool = True, **opts):
    return runtime.inference_session(model, native=native, log_severity_level=3, **opts)


def _inputs(n, c, h, w, k, s, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    kernel = torch.randn(n, g * k * k, (h - 1) // s + 1, (w - 1) // s + 1, generator=gen)
    return x, kernel


# (N, C, H, W, K, stride, dilation, groups): widths around the vector sizes (1, 3, 4, 7, 8, 15, 16,
# 17, 33), channel counts that are and are not multiples of the 8-channel block, stride 1-3.
CONFIGS = [
    (1, 64, 56, 56, 7, 1, 1, 4),
    (2, 32, 57, 57, 7, 2, 1, 2),
    (2, 8, 9, 11, 3, 1, 1, 2),
    (1, 12, 7, 8, 5, 2, 2, 3),
    (2, 4, 5, 5, 1, 2, 1, 1),
    (1, 6, 13, 10, 9, 2, 3, 2),
    (1, 17, 3, 1, 3, 1, 1, 1),
    (2, 18, 6, 15, 3, 1, 2, 2),
    (1, 16, 16, 17, 5, 1, 1, 1),
    (1, 9, 20, 33, 7, 3, 1, 3),
    (1, 40, 7, 7, 7, 1, 1, 5),
    (1, 8, 1, 1, 7, 1, 1, 1),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_native_matches_torch(cfg):
    n, c, h, w, k, s, d, g = cfg
    x, kernel = _inputs(n, c, h, w, k, s, g)
    sess = _session(inv_onnx.involution_model(c, k, s, d, g))
    (y,) = sess.run(None, {"x": x.numpy(), "kernel": kernel.numpy()})
    np.testing.assert_allclose(y, involution(x, kernel, k, s, d, g).numpy(), rtol=1e-5, atol=2e-5)


def _op_names(sess, feeds) -> set[str]:
    sess.run(None, feeds)
    path = sess.end_profiling()
    try:
        with open(path) as f:
            return {e["args"]["op_name"] for e in json.load(f) if "op_name" in e.get("args", {})}
    finally:
        os.remove(path)


def test_registered_kernel_wins_over_function():
    model = inv_onnx.involution_model(8, 3, 1, 1, 2, 10, 10, batch=2)
    assert len(model.functions) == 1  # the file carries the fallback; ORT still picks the kernel
    x, kernel = _inputs(2, 8, 10, 10, 3, 1, 2)
    feeds = {"x": x.numpy(), "kernel": kernel.numpy()}
    assert _op_names(_session(model, enable_profiling=True), feeds) == {"Involution"}
    assert "Loop" in _op_names(_session(model, native=False, enable_profiling=True), feeds)


def test_threads_and_dynamic_batch():
    model = inv_onnx.involution_model(16, 7, 2, 1, 2)  # N, H, W symbolic
    outs = []
    for threads in (1, 2):
        sess = _session(model, intra_op_num_threads=threads)
        for n, h in ((1, 15), (3, 23)):
            x, kernel = _inputs(n, 16, h, h, 7, 2, 2, seed=n)
            (y,) = sess.run(None, {"x": x.numpy(), "kernel": kernel.numpy()})
            np.testing.assert_allclose(y, involution(x, kernel, 7, 2, 1, 2).numpy(), rtol=1e-5, atol=2e-5)
            outs.append(y)
    np.testing.assert_array_equal(outs[0], outs[2])  # deterministic across thread counts
    np.testing.assert_array_equal(outs[1], outs[3])


def test_session_options_modes(monkeypatch):
    assert runtime.session_options(intra_op_num_threads=1).intra_op_num_threads == 1
    with pytest.raises(TypeError, match="no attribute"):
        runtime.session_options(not_an_option=1)
    monkeypatch.setenv("REPCONV_NO_NATIVE", "1")
    assert runtime.native_library() is None
    with pytest.raises(runtime.NativeLibraryMissing):
        runtime.session_options(native=True)


def test_build_is_cached():
    from repconv.runtime import build

    before = LIB.stat().st_mtime_ns
    assert build.build(fetch=False) == LIB
    assert LIB.stat().st_mtime_ns == before


_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from repconv import runtime
    from repconv.export import involution_onnx as inv_onnx
    from repconv.ops.involution import involution

    def sess(model):
        return runtime.inference_session(model, native=True, log_severity_level=4)

    def zeros(*shape):
        return np.zeros(shape, np.float32)

    def kernel_shape():
        s = sess(inv_onnx.involution_model(8, 3, 1, 1, 2))
        s.run(None, {"x": zeros(1, 8, 10, 10), "kernel": zeros(1, 18, 9, 10)})

    def groups():
        s = sess(inv_onnx.involution_model("C", 3, 1, 1, 2))
        s.run(None, {"x": zeros(1, 7, 5, 5), "kernel": zeros(1, 18, 5, 5)})

    def rank():
        m = inv_onnx.involution_model(8, 3, 1, 1, 2)
        del m.graph.input[0].type.tensor_type.shape.dim[:]
        del m.graph.output[0].type.tensor_type.shape.dim[:]
        sess(m).run(None, {"x": zeros(8, 5, 5), "kernel": zeros(1, 18, 5, 5)})

    def even_kernel():
        m = inv_onnx.involution_model(8, 3, 1, 1, 2)
        next(a for a in m.graph.node[0].attribute if a.name == "kernel_size").i = 4
        sess(m)

    def static_mismatch():
        m = inv_onnx.involution_model(8, 3, 1, 1, 2, 10, 10, batch=1)
        m.graph.input[1].type.tensor_type.shape.dim[3].dim_value = 7
        # ORT 1.32 ignores a custom op's shape-inference error, so the run must catch it
        sess(m).run(None, {"x": zeros(1, 8, 10, 10), "kernel": zeros(1, 18, 10, 7)})

    def isa():
        for cfg in [(1, 17, 9, 37, 7, 1, 1, 1), (2, 16, 11, 19, 5, 2, 2, 2), (1, 8, 5, 3, 3, 1, 1, 1)]:
            n, c, h, w, k, st, d, g = cfg
            x = torch.randn(n, c, h, w)
            kern = torch.randn(n, g * k * k, (h - 1) // st + 1, (w - 1) // st + 1)
            model = inv_onnx.involution_model(c, k, st, d, g)
            (y,) = sess(model).run(None, {"x": x.numpy(), "kernel": kern.numpy()})
            np.testing.assert_allclose(y, involution(x, kern, k, st, d, g).numpy(), rtol=1e-5, atol=2e-5)

    results = {}
    for name in sys.argv[1:]:
        try:
            globals()[name]()
            results[name] = {"type": None, "msg": "no error"}
        except Exception as e:
            results[name] = {"type": type(e).__name__, "msg": str(e)}
    print(json.dumps(results))
    """
)

BAD_CASES = {
    "kernel_shape": r"kernel shape must be \(N, G\*K\*K, Ho, Wo\) = \(1, 18, 10, 10\)",
    "groups": "not divisible by groups",
    "rank": "must be 4-D",
    "even_kernel": "kernel_size must be odd",
    "static_mismatch": r"got \(1, 18, 10, 7\)",
}


def _child(*cases: str, **env: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *cases],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, f"child crashed (rc={proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bad_input_results() -> dict:
    return _child(*BAD_CASES)  # one process for all cases: a crash in any fails them all


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_raises_python_exception(case, bad_input_results):
    result = bad_input_results[case]
    assert result["type"] is not None, "expected an ONNX Runtime error"
    assert "Involution" in result["msg"]
    assert re.search(BAD_CASES[case], result["msg"]), result["msg"]


@pytest.mark.parametrize("isa", ["base", "v3"])
def test_lower_isa_variants(isa):
    """The portable and AVX2 code paths, forced through REPCONV_NATIVE_ISA in a fresh process."""
    assert _child("isa", REPCONV_NATIVE_ISA=isa) == {"isa": {"type": None, "msg": "no error"}}


def test_output_shape_inference():
    """Output declared without a shape: ORT's inferred shape must come from the custom op."""
    model = inv_onnx.involution_model(8, 3, 2, 1, 2, 9, 9, batch=2)
    del model.graph.output[0].type.tensor_type.shape.dim[:]
    model.graph.output[0].type.tensor_type.ClearField("shape")
    # feed the result to a Shape node so a wrong inferred shape would be visible at run time too
    model.graph.node.append(helper.make_node("Shape", ["y"], ["y_shape"]))
    model.graph.output.append(helper.make_tensor_value_info("y_shape", TensorProto.INT64, [4]))
    x, kernel = _inputs(2, 8, 9, 9, 3, 2, 2)
    y, shape = _session(model).run(None, {"x": x.numpy(), "kernel": kernel.numpy()})
    assert y.shape == (2, 8, 5, 5) and tuple(shape) == (2, 8, 5, 5)


@pytest.mark.parametrize("cfg", CONFIGS[:6], ids=lambda c: "x".join(map(str, c)))
def test_torch_op_native_path_matches_torch_fallback(cfg):
    """CPU float32 torch calls go through the library's C entry point; compare with pure torch."""
    from repconv.ops import involution as _  # noqa: F401 - make sure the op is registered
    from repconv.ops.involution import _forward_flat, _native_kernel

    assert _native_kernel() is not None
    n, c, h, w, k, s, d, g = cfg
    x, kernel = _inputs(n, c, h, w, k, s, g)
    got = torch.ops.repconv.involution(x, kernel, k, s, d, g)
    torch.testing.assert_close(got, _forward_flat(x, kernel, k, s, d, g), rtol=1e-5, atol=2e-5)
    # non-contiguous inputs are made contiguous before the pointer is handed over
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(torch.ops.repconv.involution(xt, kernel, k, s, d, g), got)

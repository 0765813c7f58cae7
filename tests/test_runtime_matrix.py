"""The runtime matrix: every operator family repconv exports, static and dynamic batch, in every runtime.

Each family (repconv/export/families.py) is exported once per batch mode with the defaults (dynamo
exporter, generic target: involution as standard ops) and run in ONNX Runtime and
``onnx.reference`` (both environments) and OpenVINO and tract (the third-party environment),
against the PyTorch model at the export batch size and, for a dynamic batch, at another one.
Error bound: max |err| <= 1e-4 * max |ref| per output.

The onnxruntime form (custom ``ai.repconv::Involution`` node + model-local function) runs in ONNX
Runtime (function and native kernel) and ``onnx.reference``; OpenVINO and tract refuse it - a tested
fact, with the runtimes' own messages.

The TorchScript exporter's file of each family is compared with the dynamo one node for node
(after :mod:`repconv.export.normalize`); where the exporters decompose an op differently the
difference is asserted exactly and the TorchScript file runs through the same runtimes.
"""

from __future__ import annotations

import collections
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import defs, helper, numpy_helper

from repconv.export import runtimes
from repconv.export.families import FAMILIES, INVOLUTION_FAMILIES
from repconv.export.onnx import ExportReport, export_onnx_with_report

TOL = 1e-4
BATCH = 2  # export batch (torch.export specializes a batch of 1)
MODES = ("static", "dynamic")
# families whose two exporters' files differ after normalization, and the op counts that differ
# (dynamo minus TorchScript, TorchScript minus dynamo)
EXPORTER_DIFFERENCES: dict[tuple[str, str], tuple[dict[str, int], dict[str, int]]] = {
    # adaptive_avg_pool2d(x, 1) + flatten: ReduceMean + Reshape vs GlobalAveragePool + Flatten
    ("fused-static", "static"): ({"ReduceMean": 1, "Reshape": 1}, {"GlobalAveragePool": 1, "Flatten": 1}),
    ("fused-static", "dynamic"): ({"ReduceMean": 1, "Reshape": 1}, {"GlobalAveragePool": 1, "Flatten": 1}),
    # GELU's multiplications in another order, LayerNormalization with / without its zero bias
    ("mixer", "static"): ({}, {}),
    # plus: a batch-free Reshape target vs Shape/Slice/Concat, the head Linear as Gemm vs MatMul + Add
    ("mixer", "dynamic"): ({"Reshape": 2, "Gemm": 1}, {"Shape": 1, "Slice": 1, "Concat": 1, "MatMul": 1, "Add": 1,
                                                        "Reshape": 0}),
}

_CACHE: dict[tuple[Any, ...], tuple[Path, ExportReport]] = {}


def _inputs(family: str, batch: int) -> torch.Tensor:
    shape = FAMILIES[family][1]
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))


def _model(family: str) -> torch.nn.Module:
    return FAMILIES[family][0]()


def _export(tmp_root: Path, family: str, mode: str, exporter: str = "dynamo",
            target: str = "generic") -> tuple[Path, ExportReport]:
    key = (family, mode, exporter, target)
    if key not in _CACHE:
        path = tmp_root / f"{family}-{mode}-{exporter}-{target}.onnx"
        report = export_onnx_with_report(_model(family), path, _inputs(family, BATCH), dynamic_batch=mode == "dynamic",
                                         exporter=exporter, target=target)
        _CACHE[key] = (path, report)
    return _CACHE[key]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("matrix")


def _rel_err(ref: torch.Tensor, got: np.ndarray) -> float:
    r = ref.detach().double().numpy()
    assert got.shape == r.shape, f"shape {got.shape} != {r.shape}"
    return float(np.abs(got.astype(np.float64) - r).max() / max(np.abs(r).max(), 1e-30))


def _assert_runs(runtime: str, path: Path, family: str, mode: str) -> None:
    run = runtimes.load(runtime, path)
    model = _model(family)
    for batch in (BATCH, 3) if mode == "dynamic" else (BATCH,):
        x = _inputs(family, batch)
        with torch.no_grad():
            ref = model(x)
        (got,) = run({"input": x.numpy()})
        err = _rel_err(ref, got)
        assert err <= TOL, f"{runtime} on {family} ({mode}, batch {batch}): rel err {err:.2e}"


CASES = [pytest.param(f, m, id=f"{f}-{m}") for f in FAMILIES for m in MODES]


@pytest.mark.parametrize("family,mode", CASES)
def test_default_file_runs_in_onnxruntime_and_reference(tmp_root, family, mode):
    path, report = _export(tmp_root, family, mode)
    m = onnx.load(str(path))
    assert not m.functions and all(not n.domain for n in m.graph.node), "default file: standard ops only"
    assert {o.domain for o in m.opset_import} == {""} and not any(n.op_type == "Loop" for n in m.graph.node)
    assert report.involution_nodes == {"involution": 3, "cot": 1}.get(family, 0)
    for runtime in ("onnxruntime", "reference"):
        _assert_runs(runtime, path, family, mode)


@pytest.mark.thirdparty
@pytest.mark.parametrize("family,mode", CASES)
def test_default_file_runs_in_openvino_and_tract(tmp_root, family, mode):
    paths = [_export(tmp_root, family, mode)[0]]
    if (family, mode) in EXPORTER_DIFFERENCES:  # the TorchScript file is not the same graph: run it too
        paths.append(_export(tmp_root, family, mode, exporter="torchscript")[0])
    for path in paths:
        for runtime in ("openvino", "tract"):
            _assert_runs(runtime, path, family, mode)


# ---------------------------------------------------------------------------------------- onnxruntime form


@pytest.mark.parametrize("family", INVOLUTION_FAMILIES)
def test_onnxruntime_form_runs_in_onnxruntime_and_reference(tmp_root, family):
    path, report = _export(tmp_root, family, "dynamic", target="onnxruntime")
    m = onnx.load(str(path))
    assert report.custom_nodes == report.involution_nodes > 0 and len(m.functions) == 1
    kinds = ["onnxruntime", "reference"] + (["onnxruntime-native"] if runtimes.available("onnxruntime-native") else [])
    for runtime in kinds:
        _assert_runs(runtime, path, family, "dynamic")


@pytest.mark.thirdparty
@pytest.mark.parametrize("runtime,message", [
    ("openvino", "No conversion rule found for operations: ai.repconv.Involution"),
    ("tract", "Unimplemented(Involution)"),
])
def test_onnxruntime_form_is_refused_by_openvino_and_tract(tmp_root, runtime, message):
    """Neither converts a model-local function in a custom domain: the documented reason for the
    generic default. If a runtime starts accepting the file, this fails and the docs need updating."""
    path, _ = _export(tmp_root, "involution", "dynamic", target="onnxruntime")
    with pytest.raises(runtimes.RuntimeRefused) as info:
        runtimes.load(runtime, path)
    assert message in str(info.value) or message in str(info.value.__cause__)


# ---------------------------------------------------------------------------------------- both exporters


def _defaults(op: str, opset: int) -> dict[str, str]:
    try:
        schema = defs.get_schema(op, opset, "")
    except Exception:
        return {}
    return {name: str(helper.get_attribute_value(a.default_value)) for name, a in schema.attributes.items()
            if a.default_value is not None and a.default_value.type}


def _signature(model: onnx.ModelProto) -> list[tuple[Any, ...]]:
    """Nodes in order: op, attributes that differ from the schema default, and where each input comes
    from (a graph input, a producing node's position, or a constant's content) - names do not count."""
    opset = next(o.version for o in model.opset_import if o.domain == "")
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    inputs = {i.name: k for k, i in enumerate(model.graph.input)}
    produced: dict[str, tuple[Any, ...]] = {}
    sig: list[tuple[Any, ...]] = []
    for node in model.graph.node:
        refs = []
        for name in node.input:
            if name in consts:
                a = np.ascontiguousarray(consts[name])
                refs.append(("const", str(a.dtype), a.shape, hashlib.sha1(a.tobytes()).hexdigest()))
            elif name in inputs:
                refs.append(("input", inputs[name]))
            else:
                refs.append(produced.get(name, ("?", name)))
        default = _defaults(node.op_type, opset) if not node.domain else {}
        attrs = tuple(sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute
                             if default.get(a.name) != str(helper.get_attribute_value(a))))
        for k, out in enumerate(node.output):
            produced[out] = ("node", len(sig), k)
        sig.append((node.domain, node.op_type, attrs, tuple(refs)))
    return sig


def _weights(model: onnx.ModelProto) -> list[str]:
    arrays = (numpy_helper.to_array(i) for i in model.graph.initializer)
    return sorted(hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest() for a in arrays
                  if a.size >= 16 and a.any())


@pytest.mark.parametrize("family,mode", CASES)
def test_exporters_write_the_same_graph(tmp_root, family, mode):
    dyn_path, dyn = _export(tmp_root, family, mode)
    ts_path, ts = _export(tmp_root, family, mode, exporter="torchscript")
    assert (dyn.exporter, ts.exporter) == ("dynamo", "torchscript")
    a, b = onnx.load(str(dyn_path)), onnx.load(str(ts_path))
    assert [o.name for o in a.graph.input] == [o.name for o in b.graph.input] == ["input"]
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output] == ["output"]
    assert {o.domain: o.version for o in a.opset_import} == {o.domain: o.version for o in b.opset_import}
    if (family, mode) not in EXPORTER_DIFFERENCES:
        assert _signature(a) == _signature(b)
        return
    # a known decomposition difference: exactly these op counts differ, the weights are the same,
    # and the TorchScript file passes the same runtimes
    assert _signature(a) != _signature(b), "the exporters now agree: drop the entry in EXPORTER_DIFFERENCES"
    ca = collections.Counter(n.op_type for n in a.graph.node)
    cb = collections.Counter(n.op_type for n in b.graph.node)
    only_dyn, only_ts = EXPORTER_DIFFERENCES[(family, mode)]
    assert dict(ca - cb) == {k: v for k, v in only_dyn.items() if v}
    assert dict(cb - ca) == {k: v for k, v in only_ts.items() if v}
    assert _weights(a) == _weights(b)
    for runtime in ("onnxruntime", "reference"):
        _assert_runs(runtime, ts_path, family, mode)

"""Deployment bundle: contents, safety, and its standalone benchmark run in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from repconv.profile.bundle import BundleError, write_bundle
from repconv.profile.report import load_report


def tiny_onnx(path: Path, batch: int | str = "N", channels: int = 4) -> Path:
    """Conv 3->channels + Relu, built directly with onnx.helper (no export needed: fast)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, channels, 8, 8])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_bundle_contents_and_standalone_benchmark(tmp_path: Path) -> None:
    before = tiny_onnx(tmp_path / "before.onnx", channels=8)
    after = tiny_onnx(tmp_path / "after.onnx", channels=4)
    out = write_bundle({"original": before, "fused": after}, tmp_path / "bundle", (1, 3, 8, 8),
                       batch_sizes=[1, 2], model_name="tiny", iters=3, warmup=1, macs={"fused": 1234})
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"original.onnx", "fused.onnx", "bundle.json", "benchmark.py", "repconv_stats.py",
            "repconv_portable.py", "README.md"} <= names
    assert any(n.startswith("native/") and n.endswith(".cc") for n in names), "native op source is shipped"
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["input_shape"] == [1, 3, 8, 8] and manifest["batch_sizes"] == [1, 2]
    assert [m["variant"] for m in manifest["models"]] == ["original", "fused"]
    assert manifest["models"][1]["params"] == 4 * 3 * 3 * 3 and manifest["models"][1]["macs"] == 1234
    readme = (out / "README.md").read_text()
    assert "python3 benchmark.py --json result.json" in readme and "repconv profile --import" in readme

    # The script must run with numpy + onnxruntime only: no repconv (or torch) import in what it ships.
    for name in ("benchmark.py", "repconv_stats.py", "repconv_portable.py"):
        assert not re.search(r"^\s*(from|import)\s+(repconv|torch)\b", (out / name).read_text(), re.M), name
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = tmp_path / "device.json"
    proc = subprocess.run(
        [sys.executable, "-I", str(out / "benchmark.py"), "--json", str(result), "--threads", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(result.read_text())
    report = load_report(result)  # validates the same schema as `repconv profile --json`
    assert {(r.variant, r.batch_size) for r in report.results} == {(v, b) for v in ("original", "fused")
                                                                   for b in (1, 2)}
    assert all(r.samples == 3 and r.runtime == "onnxruntime" and r.threads == 1 for r in report.results)
    assert data["machine"]["onnxruntime"] and data["machine"]["cpu_model"]
    assert [c["candidate"] for c in data["comparisons"]] == ["tiny [fused]", "tiny [fused]"]


def test_benchmark_script_rejects_bad_counts(tmp_path: Path) -> None:
    out = write_bundle(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "b", (1, 3, 8, 8), iters=2)
    proc = subprocess.run([sys.executable, str(out / "benchmark.py"), "--iters", "0"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "must be positive" in proc.stderr


def test_bundle_refuses_to_clobber(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "m.onnx")
    target = write_bundle(model, tmp_path / "b", (1, 3, 8, 8))
    with pytest.raises(BundleError, match="already holds a bundle"):
        write_bundle(model, target, (1, 3, 8, 8))
    write_bundle(model, target, (1, 3, 8, 8), batch_sizes=[4], overwrite=True)
    assert json.loads((target / "bundle.json").read_text())["batch_sizes"] == [4]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="not a repconv bundle"):
        write_bundle(model, other, (1, 3, 8, 8), overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp folder left behind"


@pytest.mark.parametrize("kwargs, message", [
    ({"input_shape": (1, 3, 9, 9)}, "input dimension 2 is 8"),
    ({"input_shape": (1, 3, 8)}, "rank"),
    ({"input_shape": (1, 3, 8, 8), "batch_sizes": [0]}, "positive"),
])
def test_bundle_validates_inputs(tmp_path: Path, kwargs: dict, message: str) -> None:
    model = tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(BundleError, match=message):
        write_bundle(model, tmp_path / "b", **kwargs)


def test_fixed_batch_model_cannot_take_other_batches(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "m.onnx", batch=1)
    with pytest.raises(BundleError, match="fixed to 1"):
        write_bundle(model, tmp_path / "b", (1, 3, 8, 8), batch_sizes=[1, 8])
    with pytest.raises(BundleError, match="no such ONNX file"):
        write_bundle(tmp_path / "nope.onnx", tmp_path / "b", (1, 3, 8, 8))

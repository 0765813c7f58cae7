"""``repconv export``: click runner for behaviour and exit codes, one real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from repconv.cli.main import main

# A user's module, written to a temp dir and imported as 'package.module:factory' (no pickles).
_USER_MODELS = textwrap.dedent('''
    import torch
    from torch import nn
    import torch.nn.functional as F


    class NaiveInvolution(nn.Module):
        def __init__(self, c, k=3, g=2):
            super().__init__()
            self.k, self.g = k, g
            self.make_kernel = nn.Sequential(nn.Conv2d(c, c // 2, 1), nn.BatchNorm2d(c // 2), nn.ReLU(),
                                             nn.Conv2d(c // 2, g * k * k, 1))

        def forward(self, x):
            b, c, h, w = x.shape
            kern = self.make_kernel(x).view(b, self.g, self.k * self.k, h, w).unsqueeze(2)
            cols = F.unfold(x, self.k, padding=self.k // 2).view(b, self.g, c // self.g, self.k * self.k, h, w)
            return (kern * cols).sum(dim=3).view(b, c, h, w)


    class Erfinv(nn.Module):
        def forward(self, x):
            return torch.erfinv(x.tanh() * 0.5)


    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            if x.mean() > 0:
                return y * 2
            return -y


    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return {"logits": y.mean((2, 3)), "aux": (y, y.amax((2, 3)))}


    class Noisy(nn.Module):
        def forward(self, x):
            return x + torch.rand_like(x)


    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), NaiveInvolution(8),
                             nn.Conv2d(8, 4, 1))


    def plain():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())


    def erfinv():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), Erfinv()))


    def branchy():
        torch.manual_seed(0)
        return nn.Sequential(Branchy())


    def two_heads():
        torch.manual_seed(0)
        return TwoHeads()


    def noisy():
        return nn.Sequential(nn.Conv2d(3, 4, 1), Noisy())
''')


@pytest.fixture()
def user_models(tmp_path, monkeypatch) -> Path:
    pkg = tmp_path / "src"
    pkg.mkdir()
    (pkg / "user_models_export.py").write_text(_USER_MODELS)
    monkeypatch.syspath_prepend(str(pkg))
    sys.modules.pop("user_models_export", None)
    return pkg


def _invoke(*args: str):
    return CliRunner().invoke(main, ["export", *args], catch_exceptions=False)


def test_export_prints_report_and_writes_file(tmp_path, user_models):
    out = tmp_path / "out" / "net.onnx"
    res = _invoke("user_models_export:net", "--onnx", str(out), "--input-shape", "1,3,16,16", "--target",
                  "onnxruntime")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for needle in ("exported", "dynamo exporter", "fused: 2 region", "recognised involution", "nodes:",
                   "after onnxsim", "1 x ai.repconv::Involution", "max abs err", "native kernel",
                   "target onnxruntime"):
        assert needle in text, needle
    m = onnx.load(str(out))
    assert sum(n.op_type == "Involution" for n in m.graph.node) == 1
    assert [p.name for p in out.parent.iterdir()] == ["net.onnx"]


def test_default_target_writes_standard_ops(tmp_path, user_models):
    out = tmp_path / "net.onnx"
    res = _invoke("user_models_export:net", "--onnx", str(out), "--input-shape", "1,3,16,16")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "target generic: 1 involution(s) written as standard ops" in text and "custom nodes: none" in text
    m = onnx.load(str(out))
    assert {o.domain for o in m.opset_import} == {""} and not m.functions


def test_export_options(tmp_path, user_models):
    out = tmp_path / "plain.onnx"
    res = _invoke("user_models_export:plain", "--onnx", str(out), "--input-shape", "1,3,8,8", "--opset", "13",
                  "--no-simplify", "--no-fuse", "--rtol", "1e-3", "--atol", "1e-4", "--exporter", "torchscript")
    assert res.exit_code == 0, res.output
    assert "custom nodes: none" in res.output and "simplification off" in res.output
    m = onnx.load(str(out))
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 13)]


def test_inferred_input_shape_is_announced(tmp_path, user_models):
    res = _invoke("user_models_export:plain", "--onnx", str(tmp_path / "p.onnx"))
    assert res.exit_code == 0, res.output
    assert "inferred" in res.output and "1x3x224x224" in res.output


@pytest.mark.parametrize("args,needle", [
    (["user_models_export:net", "--input-shape", "1,5,16,16"], "does not accept input"),
    (["user_models_export:net", "--input-shape", "1,3,abc"], "input shape"),
    (["/nonexistent/model.pt"], "no such file"),
    (["user_models_export:erfinv", "--input-shape", "1,3,8,8"], "prims::erf_inv"),
    (["user_models_export:erfinv", "--input-shape", "1,3,8,8", "--exporter", "torchscript"], "aten::erfinv"),
    (["user_models_export:branchy", "--input-shape", "1,3,8,8"], "data-dependent"),
    (["user_models_export:plain", "--input-shape", "1,3,8,8", "--opset", "99"], "opset"),
])
def test_bad_input_exits_2_without_file(tmp_path, user_models, args, needle):
    out = tmp_path / "bad.onnx"
    res = CliRunner().invoke(main, ["export", *args, "--onnx", str(out)])
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert list(tmp_path.glob("*.onnx")) == [] and list(tmp_path.glob(".*.tmp")) == []


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_unsupported_op_message_names_module(tmp_path, user_models, exporter):
    res = CliRunner().invoke(main, ["export", "user_models_export:erfinv", "--input-shape", "1,3,8,8",
                                    "--onnx", str(tmp_path / "f.onnx"), "--exporter", exporter])
    assert res.exit_code == 2
    line = " ".join(res.output.split())
    assert "erf" in line and "1.1 (Erfinv)" in line
    assert "Torch IR graph" not in res.output  # the exporter's graph dump is kept off the terminal


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_data_dependent_branch_is_refused_with_module_and_line(tmp_path, user_models, exporter):
    out = tmp_path / "b.onnx"
    res = CliRunner().invoke(main, ["export", "user_models_export:branchy", "--input-shape", "1,3,8,8",
                                    "--onnx", str(out), "--exporter", exporter])
    assert res.exit_code == 2, res.output
    line = " ".join(res.output.split())
    assert "data-dependent Python control flow in module 0 (Branchy)" in line
    assert "user_models_export.py:" in line and "if x.mean() > 0:" in line and "--allow-specialize" in line
    assert not out.exists()


def test_allow_specialize_states_it_and_shows_the_other_branch(tmp_path, user_models):
    out = tmp_path / "b.onnx"
    res = _invoke("user_models_export:branchy", "--input-shape", "1,3,8,8", "--onnx", str(out),
                  "--allow-specialize")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "specialized (--allow-specialize): data-dependent control flow in module 0 (Branchy)" in text
    assert "torchscript exporter" in text  # torch.export cannot specialize: the tracer did
    # one of the shifted fresh inputs takes the other branch, and the output says so
    assert "differs from PyTorch on the fresh" in text and "other branch" in text
    import user_models_export

    model = user_models_export.branchy().eval()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # the CLI's example input
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], model(x).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_dict_and_nested_outputs_are_named(tmp_path, user_models, exporter):
    out = tmp_path / "d.onnx"
    res = _invoke("user_models_export:two_heads", "--input-shape", "2,3,8,8", "--onnx", str(out),
                  "--dynamic-batch", "--exporter", exporter)
    assert res.exit_code == 0, res.output
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "aux.0", "aux.1"]
    import user_models_export

    model = user_models_export.two_heads().eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    got = sess.run(None, {"input": x.numpy()})
    for g, r in zip(got, [ref["logits"], *ref["aux"]], strict=True):
        np.testing.assert_allclose(g, r.numpy(), rtol=1e-5, atol=1e-5)


def test_missing_onnx_option_is_usage_error(user_models):
    res = CliRunner().invoke(main, ["export", "user_models_export:plain"])
    assert res.exit_code == 2 and "--onnx" in res.output and "--bundle" in res.output


def test_check_failure_exits_1_and_keeps_old_file(tmp_path, user_models):
    out = tmp_path / "n.onnx"
    out.write_bytes(b"old")
    res = CliRunner().invoke(main, ["export", "user_models_export:noisy", "--input-shape", "1,3,8,8",
                                    "--no-fuse", "--onnx", str(out)])
    assert res.exit_code == 1, res.output
    assert "differs from PyTorch" in res.output
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["n.onnx", "src"]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_real_subprocess_dynamic_batch(tmp_path, user_models, exporter):
    out = tmp_path / "dyn.onnx"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(user_models), os.environ.get("PYTHONPATH", "")]))
    # -W default shows DeprecationWarnings too: torch deprecates the TorchScript exporter (and warns
    # about its own pytree internals); none of that may reach the user's terminal
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-m", "repconv", "export", "user_models_export:net", "--onnx",
         str(out), "--input-shape", "1,3,16,16", "--dynamic-batch", "--exporter", exporter],
        capture_output=True, text=True, env=env, timeout=180, cwd=str(Path(__file__).resolve().parents[1]),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == "" and "Warning" not in proc.stdout, proc.stderr
    assert f"{exporter} exporter" in " ".join(proc.stdout.split())
    sys.path.insert(0, str(user_models))
    try:
        import user_models_export

        model = user_models_export.net().eval()
    finally:
        sys.path.remove(str(user_models))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = torch.randn(n, 3, 16, 16)
        got = sess.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_bundle_carries_the_onnxruntime_form(tmp_path, user_models):
    out, bundle = tmp_path / "net.onnx", tmp_path / "device"
    res = _invoke("user_models_export:net", "--onnx", str(out), "--bundle", str(bundle), "--input-shape", "1,3,16,16")
    assert res.exit_code == 0, res.output
    mine, benched = onnx.load(str(out)), onnx.load(str(bundle / "model.onnx"))
    assert not any(n.domain for n in mine.graph.node)  # --target generic: standard ops
    assert sum(n.op_type == "Involution" for n in benched.graph.node) == 1  # benchmark.py runs ORT + native


def test_bundle_without_onnx_writes_self_contained_folder(tmp_path, user_models):
    bundle = tmp_path / "device"
    res = _invoke("user_models_export:net", "--bundle", str(bundle), "--input-shape", "1,3,16,16")
    assert res.exit_code == 0, res.output
    names = {p.name for p in bundle.iterdir()}
    assert {"model.onnx", "benchmark.py", "README.md", "native"} <= names
    m = onnx.load(str(bundle / "model.onnx"))
    assert sum(n.op_type == "Involution" for n in m.graph.node) == 1
    res = _invoke("user_models_export:net", "--bundle", str(bundle), "--input-shape", "1,3,16,16")
    assert res.exit_code == 2  # an existing bundle is not replaced without --force

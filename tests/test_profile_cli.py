"""`repconv profile` through click's CliRunner: usage errors, one short real run, import/baseline/plot."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from repconv.cli.main import main
from repconv.profile.core import profile_model
from repconv.profile.report import REQUIRED_RESULT_KEYS, load_report, write_report
from repconv.profile.runtimes import ProfileError

FACTORY = "tests.test_profile_cli:tiny_model"
FAST = ["--warmup", "1", "--iters", "5"]


def tiny_model() -> nn.Module:
    """Conv-BN-ReLU with a parallel 1x1 branch: small, and fusion has something to do."""

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k3 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
            self.k1 = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8))
            self.head = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.k3(x) + self.k1(x))
            return self.head(y.mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Tiny()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def invoke(*args: str) -> object:
    return CliRunner().invoke(main, ["profile", *args], catch_exceptions=False)


@pytest.mark.parametrize("args, message", [
    (["--runtime", "tensorrt"], "unknown runtime 'tensorrt'; known: torch, torch-compile, onnxruntime"),
    (["--device", "tpu"], "unknown device 'tpu'; available here: cpu"),
    (["--iters", "0"], "--iters must be positive"),
    (["--iters", "-3"], "--iters must be positive"),
    (["--seconds", "0"], "--seconds must be positive"),
    (["--batch-sizes", "1,0"], "--batch-sizes must be positive"),
    (["--batch-sizes", "1,x"], "not a comma-separated list"),
    (["--threads", "0"], "--threads must be positive"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--iters", "3", "--seconds", "1"], "not both"),
])
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    res = invoke(FACTORY, *args)
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_unknown_runtime_lists_usable_ones() -> None:
    res = invoke(FACTORY, "--runtime", "torch,foo")
    assert res.exit_code == 2
    assert "usable here:" in res.output and "torch" in res.output.split("usable here:")[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_clear_error() -> None:
    res = invoke(FACTORY, "--device", "cuda")
    assert res.exit_code == 2
    assert "--device cuda:" in res.output and "use --device cpu" in res.output


def test_missing_model_and_bad_model() -> None:
    res = invoke()
    assert res.exit_code == 2 and "give MODEL" in res.output
    res = invoke("no_such_module_xyz:factory")
    assert res.exit_code == 2 and "cannot import" in res.output
    res = invoke("missing.onnx")
    assert res.exit_code == 2 and "no such file" in res.output


def test_short_real_run_json_and_baseline(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = invoke(FACTORY, "--input-shape", "1,3,16,16", "--runtime", "torch,onnxruntime", "--batch-sizes", "1,2",
                 *FAST, "--json", str(out))
    assert res.exit_code == 0, res.output
    assert "fused" in res.output and "original" in res.output and "denormals flushed" in res.output
    data = json.loads(out.read_text())
    assert data["machine"]["threads"] >= 1 and data["machine"]["cpu_model"]
    assert data["machine"]["torch"] == torch.__version__
    rows = data["results"]
    assert {(r["runtime"], r["variant"], r["batch_size"]) for r in rows} == {
        (rt, v, b) for rt in ("torch", "onnxruntime") for v in ("original", "fused") for b in (1, 2)}
    for r in rows:
        assert set(REQUIRED_RESULT_KEYS) <= set(r)
        assert r["samples"] == 5 and r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["p99_ms"]
        assert r["throughput"] == pytest.approx(r["batch_size"] / (r["median_ms"] / 1e3))
        assert r["model"] == FACTORY
    fused = next(r for r in rows if r["variant"] == "fused")
    orig = next(r for r in rows if r["variant"] == "original")
    assert fused["params"] < orig["params"] and fused["macs"] < orig["macs"]
    assert len(data["comparisons"]) == 4 and all(c["pairs"] == 5 for c in data["comparisons"])

    # A baseline faster than anything real: every row regresses -> exit 1 with the verdicts shown.
    fast = load_report(out)
    for r in fast.results:
        r.median_ms, r.mad_ms = 1e-6, 0.0
    base = tmp_path / "base.json"
    write_report(fast, base)
    res = invoke(FACTORY, "--input-shape", "1,3,16,16", "--runtime", "torch", *FAST, "--baseline", str(base))
    assert res.exit_code == 1, res.output
    assert "regression" in res.output


def test_import_alone_and_beside_a_run(tmp_path: Path) -> None:
    src = tmp_path / "device.json"
    src.write_text(json.dumps({
        "schema": "repconv.profile/1",
        "machine": {"hostname": "pi", "cpu_model": "Cortex-A72", "threads": 4},
        "results": [{"model": "m", "variant": "fused", "runtime": "onnxruntime", "device": "cpu",
                     "batch_size": 1, "threads": 4, "median_ms": 12.5, "p90_ms": 13.0, "p99_ms": 14.0,
                     "throughput": 80.0, "peak_mem_mb": None}],
    }))
    res = invoke("--import", str(src))
    assert res.exit_code == 0, res.output
    assert "pi / Cortex-A72" in res.output and "12.5" in res.output
    res = invoke(FACTORY, "--input-shape", "1,3,16,16", "--runtime", "torch", "--no-fuse", *FAST,
                 "--import", str(src))
    assert res.exit_code == 0, res.output
    assert "pi / Cortex-A72" in res.output and "local" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    res = invoke("--import", str(bad))
    assert res.exit_code == 2 and "JSON object" in res.output


def test_plot_without_matplotlib_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    res = invoke(FACTORY, "--plot", str(tmp_path / "p.png"))
    assert res.exit_code == 2
    assert "needs matplotlib" in res.output and "pip install matplotlib" in res.output
    assert not (tmp_path / "p.png").exists()


def test_plot_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.png"
    res = invoke(FACTORY, "--input-shape", "1,3,16,16", "--runtime", "torch", "--batch-sizes", "1,2", *FAST,
                 "--plot", str(out))
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_op_attributes_time_to_ops() -> None:
    res = invoke(FACTORY, "--input-shape", "1,3,16,16", "--runtime", "torch,onnxruntime", *FAST, "--per-op",
                 "--top", "3")
    assert res.exit_code == 0, res.output
    assert "per-op" in res.output
    assert "aten::" in res.output  # torch.profiler op names
    assert "Conv" in res.output  # ONNX Runtime op types


def test_onnx_model_runs_on_onnxruntime_only(tmp_path: Path) -> None:
    from repconv.export.onnx import export_onnx

    path = export_onnx(tiny_model(), tmp_path / "tiny.onnx", (torch.randn(1, 3, 16, 16),), dynamic_batch=True)
    res = invoke(str(path), "--runtime", "torch")
    assert res.exit_code == 2 and "onnxruntime only" in res.output
    report = profile_model(path, None, iters=3, warmup=0, batch_sizes=[1, 3])  # shape read from the file
    assert {r.runtime for r in report.results} == {"onnxruntime"}
    assert {r.batch_size for r in report.results} == {1, 3}
    assert report.results[0].params is not None and report.comparisons == []


def test_library_validation() -> None:
    with pytest.raises(ProfileError, match="batch sizes must be positive"):
        profile_model(tiny_model(), (1, 3, 8, 8), batch_sizes=[0])
    with pytest.raises(ProfileError, match="unknown runtime"):
        profile_model(tiny_model(), (1, 3, 8, 8), runtimes=["tvm"])
    model = tiny_model().train()
    report = profile_model(model, (1, 3, 8, 8), runtimes=["torch"], iters=2, warmup=0, fuse=False)
    assert model.training, "the caller's training flag is restored"
    assert [r.variant for r in report.results] == ["original"]


def test_default_runtimes_leave_torch_compile_opt_in() -> None:
    report = profile_model(tiny_model(), (1, 3, 8, 8), iters=2, warmup=0, fuse=False)
    assert {r.runtime for r in report.results} == {"torch", "onnxruntime"}
    assert report.config["runtimes"] == ["torch", "onnxruntime"]
    if "torch-compile" not in " ".join(report.notes):  # no C++ compiler here: nothing to opt into
        pytest.skip("torch-compile is not usable on this machine")
    assert any("--runtime all" in n for n in report.notes)

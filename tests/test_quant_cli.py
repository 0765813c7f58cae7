"""`repconv inspect --quant`, `repconv quantize`, `repconv compare`: CliRunner for the paths, one real
subprocess; on repconv's own models and on models written without repconv's classes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from repconv.blocks import Involution
from repconv.cli.main import main

PLAIN = "tests.cli_models:small_repvgg"  # RepVGG-style blocks in plain nn.Sequential code
DEMO = "repconv.blocks.models:demo_model"  # repconv's RepVGG / ACNet / DBB / ... blocks, 64x64 input
ROOT = Path(__file__).resolve().parents[1]


class InvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.inv = Involution(16, 3, group_channels=8)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.inv(self.stem(x))))


def inv_net() -> nn.Module:
    torch.manual_seed(0)
    return InvNet().eval()


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def npy_dir(path: Path, shape: tuple[int, ...], n: int, seed: int = 0) -> Path:
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(0, n, 4):  # batches of 4 samples per file
        np.save(path / f"b{i}.npy", rng.standard_normal((min(4, n - i), *shape)).astype(np.float32))
    return path


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_inspect_quant_on_repconv_model(runner: CliRunner, tmp_path: Path) -> None:
    calib = npy_dir(tmp_path / "calib", (3, 64, 64), 4)
    report, plot = tmp_path / "r.json", tmp_path / "r.png"
    res = runner.invoke(main, ["inspect", DEMO, "--input-shape", "1,3,64,64", "--quant", "--calib", str(calib),
                               "--report", str(report), "--plot", str(plot)])
    assert res.exit_code == 0, res.output
    assert "INT8 quantization risk" in res.output and "stem.reparam" in res.output
    data = json.loads(report.read_text())
    quant = data["quant"]
    assert quant["samples"] == 4 and len(quant["ranking"]) == len(quant["layers"]) >= 9
    first = quant["layers"][0]
    assert first["rank"] == 1 and first["output_sqnr_db"] == min(lay["output_sqnr_db"] for lay in quant["layers"])
    stem = next(lay for lay in quant["layers"] if lay["layer"] == "stem.reparam")
    assert stem["branches"] == ["stem.conv_kxk", "stem.conv_1x1"] and len(stem["weights"]["absmax"]) == 16
    assert data["regions"] and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_quant_names_layers_as_the_fuse_table(runner: CliRunner, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    res = runner.invoke(main, ["inspect", "tests.cli_models:stem_and_block", "--input-shape", "1,3,16,16", "--quant",
                               "--calib-random", "4", "--report", str(report)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    # the fuse table calls the conv+BN spanning children 0 and 1 "0+1"; the risk table says where "reparam" came from
    fuse_rows = [line for line in res.output.splitlines() if "conv+bn" in line]
    assert len(fuse_rows) == 1 and fuse_rows[0].split("│")[1].strip() == "0+1"
    layers = [line.split("│")[2].strip() for line in res.output.splitlines() if line.count("│") > 8]
    assert sorted(layers) == ["3.reparam", "reparam (0+1)"]
    assert {lay["layer"] for lay in json.loads(report.read_text())["quant"]["layers"]} == {"reparam", "3.reparam"}


def test_quant_tables_fit_80_columns_without_cutting(runner: CliRunner, tmp_path: Path) -> None:
    res = runner.invoke(main, ["inspect", DEMO, "--input-shape", "1,3,64,64", "--quant", "--calib-random", "4"],
                        env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    printed = [line for line in res.output.splitlines() if not line.startswith("WARNING:")]  # stderr: one line
    assert max(len(line) for line in printed) <= 80 and "…" not in res.output
    # the risk table's branch column, folded onto more lines, still names whole branches
    assert re.search(r"<- \S+\.(bn_identity|branch_avg|bn)\b", res.output), res.output


def test_inspect_quant_needs_quant(runner: CliRunner, tmp_path: Path) -> None:
    res = runner.invoke(main, ["inspect", PLAIN, "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 2 and "go with --quant" in res.output and not (tmp_path / "p.png").exists()
    res = runner.invoke(main, ["inspect", PLAIN, "--quant", "--calib", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "no such file or directory" in res.output


def test_quantize_plain_model_from_images(runner: CliRunner, tmp_path: Path) -> None:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out, report = tmp_path / "m.int8.onnx", tmp_path / "q.json"
    res = runner.invoke(main, ["quantize", PLAIN, "--input-shape", "1,3,16,16", "--calib", str(images),
                               "--mean", "0.5", "--std", "0.25", "-o", str(out), "--report", str(report),
                               "--no-latency"])
    assert res.exit_code == 0, res.output
    assert "WARNING" not in res.output and "held-out" in res.output
    data = json.loads(report.read_text())
    assert data["calib_samples"] == 8 and data["holdout_samples"] == 2  # a fifth held out
    assert data["drift"]["sqnr_db"] > 20 and data["latency"] is None and not data["random_calibration"]
    model = onnx.load(out)
    assert {n.op_type for n in model.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}
    from repconv.quant.calib import load_samples
    from tests.cli_models import small_repvgg

    x = load_samples(images, (1, 3, 16, 16), mean=[0.5], std=[0.25])[-1:]  # the last image: held out
    ref = small_repvgg()(torch.from_numpy(x)).detach().numpy()
    assert np.abs(run_onnx(out, x) - ref).max() < 0.1 * np.abs(ref).max()  # INT8: close, not exact


def test_quantize_involution_model_keeps_the_op_in_fp32(runner: CliRunner, tmp_path: Path) -> None:
    out, report = tmp_path / "inv.int8.onnx", tmp_path / "q.json"
    res = runner.invoke(main, ["quantize", "tests.test_quant_cli:inv_net", "--input-shape", "1,3,12,12",
                               "--calib-random", "8", "-o", str(out), "--report", str(report)])
    assert res.exit_code == 0, res.output
    assert "WARNING" in res.output and "random normal inputs" in res.output
    data = json.loads(report.read_text())
    assert data["float_nodes"] and "ai.repconv::Involution" in data["float_nodes"][0]
    assert data["latency"]["fp32_ms"] > 0 and data["latency"]["int8_ms"] > 0
    model = onnx.load(out)
    inv = next(n for n in model.graph.node if n.op_type == "Involution")
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert producers[inv.input[0]] == "DequantizeLinear"  # the data input arrives through QDQ
    assert any(inv.output[0] in n.input and n.op_type == "Relu" for n in model.graph.node)
    x = np.random.default_rng(2).standard_normal((1, 3, 12, 12)).astype(np.float32)
    ref = inv_net()(torch.from_numpy(x)).detach().numpy()
    got = run_onnx(out, x)  # a plain session: the op's model-local function runs it
    assert 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()) > 15


def test_quantize_bad_input_writes_nothing(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"user's file")
    wrong = tmp_path / "w.npy"
    np.save(wrong, np.zeros((4, 3, 8, 8), np.float32))
    cases = [
        (["--calib", str(wrong)], "does not fit the model's samples (N, 3, 16, 16)"),
        (["--calib", str(tmp_path / "nope")], "no such file or directory"),
        (["--calib", str(wrong), "--calib-random", "4"], "not both"),
        ([], "no calibration data"),
        (["--calib-random", "4", "--holdout", "0"], "--holdout must be at least 1"),
    ]
    for extra, needle in cases:
        res = runner.invoke(main, ["quantize", PLAIN, "--input-shape", "1,3,16,16", "-o", str(out), *extra])
        assert res.exit_code == 2 and needle in res.output, (extra, res.output)
        assert "Traceback" not in res.output
    assert out.read_bytes() == b"user's file"

    from repconv.quant import ort_quant

    def crash(model: onnx.ModelProto) -> None:
        raise ort_quant.QuantizeError("the quantized model does not load in ONNX Runtime: simulated abort")

    monkeypatch.setattr(ort_quant, "check_loads", crash)
    res = runner.invoke(main, ["quantize", PLAIN, "--input-shape", "1,3,16,16", "--calib-random", "6",
                               "-o", str(out)])
    assert res.exit_code == 1 and "does not load" in res.output and "nothing written" in res.output
    assert out.read_bytes() == b"user's file"


def test_compare_cli_fp32_int8_and_sensitivity(runner: CliRunner, tmp_path: Path) -> None:
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    assert runner.invoke(main, ["export", PLAIN, "--input-shape", "1,3,16,16", "--onnx", str(fp32)]).exit_code == 0
    inputs = npy_dir(tmp_path / "in", (3, 16, 16), 6)
    assert runner.invoke(main, ["quantize", str(fp32), "--calib", str(inputs), "-o", str(int8),
                                "--no-latency"]).exit_code == 0
    report = tmp_path / "c.json"
    res = runner.invoke(main, ["compare", str(fp32), str(int8), "--per-layer", "--inputs", str(inputs),
                               "--min-sqnr", "15", "--sensitivity", "--report", str(report)])
    assert res.exit_code == 0, res.output
    assert "first diverging layer: none" in res.output and "INT8 sensitivity" in res.output
    data = json.loads(report.read_text())
    assert data["compare"]["ok"] and all(lay["sqnr_db"] > 15 for lay in data["compare"]["layers"])
    sens = data["sensitivity"]["layers"]
    assert {s["module"] for s in sens} == {"0.reparam", "1.reparam"}
    assert sens[0]["sqnr_db"] <= sens[1]["sqnr_db"]
    # a strict tolerance: INT8 departs at the first quantized tensor (conv + ReLU, one QDQ) -> exit 1 naming it
    res = runner.invoke(main, ["compare", str(fp32), str(int8), "--per-layer", "--inputs", str(inputs)])
    assert res.exit_code == 1 and "first diverging layer: node_relu (after 0.reparam)" in res.output
    # PyTorch model against its export: exact
    res = runner.invoke(main, ["compare", PLAIN, str(fp32), "--per-layer", "--random", "2"])
    assert res.exit_code == 0 and "first diverging layer: none" in res.output, res.output


def test_compare_cli_usage(runner: CliRunner, tmp_path: Path) -> None:
    res = runner.invoke(main, ["compare", PLAIN])
    assert res.exit_code == 2 and "give CAND" in res.output
    res = runner.invoke(main, ["compare", PLAIN, str(tmp_path / "none.onnx")])
    assert res.exit_code == 2 and "no such file" in res.output
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    res = runner.invoke(main, ["compare", PLAIN, str(tmp_path / "junk.onnx")])
    assert res.exit_code == 2 and "not a readable ONNX file" in res.output and "Traceback" not in res.output


def test_quantize_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "demo.int8.onnx"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "repconv", "quantize", DEMO, "--input-shape", "1,3,64,64",
                           "--calib-random", "6", "--no-latency", "-o", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" in proc.stderr and "wrote" in proc.stdout
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    assert run_onnx(out, x).shape == (1, 10)

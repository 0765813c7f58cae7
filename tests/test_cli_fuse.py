"""`repconv fuse` / `repconv inspect`: CliRunner for the paths, one real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from repconv.cli.main import main

FACTORY = "tests.cli_models:small_repvgg"


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def test_fuse_factory_with_weights(runner: CliRunner, tmp_path: Path) -> None:
    from tests.cli_models import small_repvgg

    weights = tmp_path / "w.pth"
    model = small_repvgg()
    torch.save(model.state_dict(), weights)
    out, report = tmp_path / "f.pt", tmp_path / "r.json"
    res = runner.invoke(main, ["fuse", FACTORY, "--weights", str(weights), "-o", str(out), "--report", str(report)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "input shape 1x3x224x224 inferred from 0.k3.0 (Conv2d, 3 input channels), the first layer the model " \
        "runs" in text and "verification OK" in text
    data = json.loads(report.read_text())
    assert data["verification"]["ok"] and data["verification"]["max_rel"] < 1e-5
    assert [r["name"] for r in data["regions"]] == ["0", "1"]
    fused = torch.load(out, weights_only=False)
    x = torch.randn(1, 3, 16, 16)
    assert torch.allclose(fused(x), model.eval()(x), rtol=1e-4, atol=1e-5)
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 2


def test_pickled_model_needs_opt_in_and_default_name(runner: CliRunner, tmp_path: Path) -> None:
    from tests.cli_models import small_repvgg

    path = tmp_path / "net.pt"
    torch.save(small_repvgg(), path)
    res = runner.invoke(main, ["fuse", str(path)])
    assert res.exit_code == 2 and "--allow-pickle" in res.output
    assert not (tmp_path / "net.fused.pt").exists()
    res = runner.invoke(main, ["fuse", str(path), "--allow-pickle", "--input-shape", "2,3,16,16"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "net.fused.pt").exists()


def test_torchscript_input_writes_torchscript(runner: CliRunner, tmp_path: Path) -> None:
    from tests.cli_models import small_repvgg

    path = tmp_path / "net.ts"
    scripted = torch.jit.script(small_repvgg())
    torch.jit.save(scripted, str(path))
    res = runner.invoke(main, ["fuse", str(path), "--input-shape", "1,3,16,16"])
    assert res.exit_code == 0, res.output
    assert "verification OK" in res.output
    fused = torch.jit.load(str(tmp_path / "net.fused.pt"))  # TorchScript again: loads without pickle
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(fused(x), scripted(x), rtol=1e-4, atol=1e-5)
    kinds = [m.original_name for m in fused.modules()]
    assert kinds.count("Conv2d") == 2 and "BatchNorm2d" not in kinds


def test_corrupt_file_and_wrong_weights(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    res = runner.invoke(main, ["fuse", str(bad)])
    assert res.exit_code == 2 and "not a readable PyTorch file" in res.output
    wrong = tmp_path / "wrong.pth"
    torch.save({"nope": torch.zeros(1)}, wrong)
    res = runner.invoke(main, ["fuse", FACTORY, "--weights", str(wrong)])
    assert res.exit_code == 2 and "do not match" in res.output
    assert not list(tmp_path.glob("*.fused.pt"))


def test_never_overwrites_input(runner: CliRunner, tmp_path: Path) -> None:
    from tests.cli_models import small_repvgg

    path = tmp_path / "net.pt"
    torch.save(small_repvgg(), path)
    before = path.read_bytes()
    res = runner.invoke(main, ["fuse", str(path), "--allow-pickle", "-o", str(path)])
    assert res.exit_code == 2 and "overwrite" in res.output
    assert path.read_bytes() == before


def test_verification_failure_exit_1_nothing_written(runner: CliRunner, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from repconv.algebra import conv as conv_algebra

    real = conv_algebra.conv_then_affine
    monkeypatch.setattr("repconv.graph.affine.A.conv_then_affine",
                        lambda k, s, t: (lambda o: type(o)(o.weight * 1.5, o.bias, o.geom))(real(k, s, t)))
    out = tmp_path / "f.pt"
    res = runner.invoke(main, ["fuse", FACTORY, "-o", str(out)])
    assert res.exit_code == 1, res.output
    assert "nothing written" in res.output and not out.exists()


def test_inspect_changes_nothing(runner: CliRunner, tmp_path: Path) -> None:
    res = runner.invoke(main, ["inspect", FACTORY])
    assert res.exit_code == 0, res.output
    assert "3 branches" in res.output
    assert not list(Path.cwd().glob("small_repvgg*.pt"))


def test_real_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "f.pt"
    proc = subprocess.run([sys.executable, "-m", "repconv", "fuse", FACTORY, "--input-shape", "1,3,16,16",
                           "-o", str(out)],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    proc = subprocess.run([sys.executable, "-m", "repconv", "fuse", "missing.pt"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_onnx_file_given_to_fuse(runner: CliRunner, tmp_path: Path) -> None:
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"\x08\x07")
    res = runner.invoke(main, ["fuse", str(onnx_file)])
    assert res.exit_code == 2 and "ONNX file" in res.output


def test_tables_fit_80_columns_with_unique_real_names(runner: CliRunner) -> None:
    # CliRunner's output is not a terminal: rich renders it 80 columns wide, as a narrow terminal would
    res = runner.invoke(main, ["inspect", "repconv.blocks.models:demo_model", "--input-shape", "1,3,64,64"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    assert rows == ["stem", "acb", "dbb", "doconv+doconv_bn", "mobileone_dw", "mobileone_pw", "replk", "dbb_dw",
                    "fc1+fc1_bn"]  # DemoNet's attributes; regions spanning siblings name both
    assert "…" not in res.output and "(top)" not in res.output

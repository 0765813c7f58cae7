"""The examples run and say what they claim (small inputs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def _load(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuse_third_party_example(capsys: pytest.CaptureFixture[str]) -> None:
    _load("fuse_third_party").main()
    out = capsys.readouterr().out
    assert out.count("4 branches   -> 3x3 conv") == 2 and "linear+bn" in out
    assert "cosine 1.0000000" in out


def test_export_rednet_example(capsys: pytest.CaptureFixture[str]) -> None:
    _load("export_rednet").main(size=32)
    out = capsys.readouterr().out
    assert "9 ai.repconv::Involution" in out
    err = float(out.split("plain ONNX Runtime: max |err| ")[1].split()[0])
    assert err < 1e-4

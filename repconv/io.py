"""Loading user models safely, and guessing their input shape.

A model spec is one of:
* a file written by ``torch.save(model)`` (a pickled module: needs ``allow_pickle=True``, because
  unpickling runs arbitrary code from the file),
* a file written by ``torch.save(model.state_dict())`` together with a factory (see below),
* a TorchScript file (``torch.jit.save``), loaded without unpickling Python code,
* ``package.module:factory`` - a callable returning an ``nn.Module``; ``weights`` then names a
  state-dict file loaded with ``weights_only=True``.
"""

from __future__ import annotations

import importlib
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


class ModelLoadError(ValueError):
    """The model spec cannot be turned into a module; the message is one line for the user."""


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' (or 1x3x224x224) -> (1, 3, 224, 224)."""
    sep = "," if "," in text or "x" not in text else "x"
    parts = [p.strip() for p in text.split(sep)]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ModelLoadError(f"input shape {text!r} is not a comma-separated list of integers") from None
    if not shape or any(d <= 0 for d in shape):
        raise ModelLoadError(f"input shape {text!r} must have positive dimensions")
    return shape


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def _load_factory(spec: str, weights: str | None) -> nn.Module:
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelLoadError(f"cannot import {mod_name!r}: {e}") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelLoadError(f"{mod_name!r} has no attribute {attr!r}")
    try:
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    except Exception as e:  # the user's factory failed: report it in one line
        raise ModelLoadError(f"factory {spec!r} failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    if weights:
        state = _torch_load(Path(weights), weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelLoadError(f"{weights} does not hold a state dict")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:3])
            raise ModelLoadError(f"weights {weights} do not match {spec}: {detail[:300]}") from None
    return model


def _torch_load(path: Path, *, weights_only: bool) -> object:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not a model file")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:
        msg = str(e)
        if weights_only and "Unsupported global" in msg:
            raise ModelLoadError(
                f"{path} holds a pickled Python object; loading it runs code from the file. "
                "If you trust it, pass --allow-pickle (Python: allow_pickle=True)") from None
        detail = [ln.strip() for ln in msg.splitlines() if "error" in ln.lower() or "unsupported" in ln.lower()]
        first = (detail or msg.strip().splitlines() or [type(e).__name__])[-1]
        raise ModelLoadError(f"{path} is not a readable PyTorch file: {first[:200]}") from None


def load_model(spec: str | os.PathLike, *, weights: str | None = None, allow_pickle: bool = False) -> nn.Module:
    """Load a model for fusing/exporting/profiling. Raises :class:`ModelLoadError` on bad input."""
    text = str(spec)
    path = Path(text)
    if not path.exists() and ":" in text and not text.endswith((".pt", ".pth", ".ts")):
        return _load_factory(text, weights)
    if not path.exists():
        raise ModelLoadError(f"{text}: no such file (and not a 'package.module:factory' spec)")
    if path.suffix.lower() == ".onnx":
        raise ModelLoadError(f"{path} is an ONNX file: this needs the PyTorch model (repconv profile takes .onnx)")
    if weights:
        raise ModelLoadError("--weights goes with a 'package.module:factory' spec, not a model file")
    if path.is_file() and _is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise ModelLoadError(f"{path}: broken TorchScript file: {str(e).splitlines()[0][:200]}") from None
    obj = _torch_load(path, weights_only=not allow_pickle)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        raise ModelLoadError(f"{path} holds a state dict, not a model: give 'package.module:factory' "
                             f"and --weights {path}")
    raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not an nn.Module")


def infer_input_shape(model: nn.Module, spatial: Sequence[int] = (224, 224)) -> tuple[int, ...]:
    """Guess a single-sample input shape from the first conv / linear layer."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (1, m.in_channels, *spatial)
        if isinstance(m, nn.Conv1d):
            return (1, m.in_channels, spatial[0])
        if isinstance(m, nn.Linear):
            return (1, m.in_features)
    raise ModelLoadError("cannot infer the input shape (no Conv/Linear layer found): pass --input-shape")

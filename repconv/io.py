"""Loading user models safely, and guessing their input shape.

A model spec is one of:
* a file written by ``torch.save(model)`` (a pickled module: needs ``allow_pickle=True``, because
  unpickling runs arbitrary code from the file),
* a file written by ``torch.save(model.state_dict())`` together with a factory (see below),
* a TorchScript file (``torch.jit.save``), loaded without unpickling Python code,
* ``package.module:factory`` - a callable returning an ``nn.Module``; ``weights`` then names a
  state-dict file loaded with ``weights_only=True``.

Loading always tries ``weights_only=True`` first; with ``allow_pickle`` a file that needs more is
unpickled, and ``on_unpickle`` (the CLI's warning) is told so before it happens.
"""

from __future__ import annotations

import importlib
import os
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from repconv.util import eval_mode, first_line


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


def _load_factory(spec: str, weights: str | None, allow_pickle: bool,
                  on_unpickle: Callable[[str], None] | None) -> nn.Module:
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelLoadError(f"cannot import {mod_name!r}: {e}") from None
    except Exception as e:  # the user's module raised while being imported
        raise ModelLoadError(f"importing {mod_name!r} raised {type(e).__name__}: {first_line(e)}") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelLoadError(f"{mod_name!r} has no attribute {attr!r}")
    try:
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    except Exception as e:  # the user's factory failed: report it in one line
        raise ModelLoadError(f"factory {spec!r} failed: {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    if weights:
        state = _torch_load(Path(weights), allow_pickle, on_unpickle)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if isinstance(state, nn.Module):
            state = state.state_dict()
        if not isinstance(state, dict):
            raise ModelLoadError(f"{weights} does not hold a state dict")
        problem = _state_dict_mismatch(model, state)
        if problem:
            raise ModelLoadError(f"weights {weights} do not match {spec}: {problem}")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ModelLoadError(f"weights {weights} do not match {spec}: {first_line(e)}") from None
    return model


def _state_dict_mismatch(model: nn.Module, state: dict) -> str | None:
    """What keeps ``state`` from loading into ``model``, in one short line (None if it fits)."""
    own = model.state_dict()

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    parts = [f"{len(missing)} missing ({some(missing)})" if missing else "",
             f"{len(unexpected)} unexpected ({some(unexpected)})" if unexpected else "",
             f"{len(shapes)} of another shape ({some(shapes)})" if shapes else ""]
    parts = [p for p in parts if p]
    return f"keys: {'; '.join(parts)}" if parts else None


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_MAIN_ATTRIBUTE = re.compile(r"Can't get attribute '(\w+)' on <module '__main__'")


def _from_main(path: Path, name: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path} was saved from a script run as __main__: the pickle refers to __main__.{name}, which only "
        f"that script defines. Move {name} into a module (e.g. mynets.py), import it from there and save "
        f"again, or save model.state_dict() and load it with 'mynets:factory' --weights {path}")


def _torch_load(path: Path, allow_pickle: bool, on_unpickle: Callable[[str], None] | None) -> object:
    """``torch.load`` with ``weights_only=True``; a pickle that needs more only with ``allow_pickle``."""
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not a model file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unsupported = _UNSUPPORTED_GLOBAL.search(str(e))
        if unsupported is None:
            raise _unreadable(path, e) from None
        name = unsupported.group(1)
    if name.startswith("__main__."):
        raise _from_main(path, name.partition(".")[2])
    if not allow_pickle:
        raise ModelLoadError(
            f"{path} holds a pickled Python object ({name}); loading it runs code from the file. "
            "If you trust it, pass --allow-pickle (Python: allow_pickle=True)")
    if on_unpickle is not None:
        on_unpickle(f"--allow-pickle: unpickling {path} runs code from the file; use it only on files you trust")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except AttributeError as e:
        main = _MAIN_ATTRIBUTE.search(str(e))
        if main:
            raise _from_main(path, main.group(1)) from None
        raise _unreadable(path, e) from None
    except ImportError as e:
        raise ModelLoadError(f"{path} needs a module that cannot be imported here: {first_line(e)}") from None
    except Exception as e:
        raise _unreadable(path, e) from None


def _unreadable(path: Path, e: Exception) -> ModelLoadError:
    msg = str(e)
    detail = [ln.strip() for ln in msg.splitlines() if "error" in ln.lower() or "unsupported" in ln.lower()]
    first = (detail or msg.strip().splitlines() or [type(e).__name__])[-1]
    return ModelLoadError(f"{path} is not a readable PyTorch file: {first[:200]}")


def load_model(spec: str | os.PathLike, *, weights: str | None = None, allow_pickle: bool = False,
               on_unpickle: Callable[[str], None] | None = None) -> nn.Module:
    """Load a model for fusing/exporting/profiling. Raises :class:`ModelLoadError` on bad input.

    ``on_unpickle(message)`` is called just before a file is unpickled with code execution allowed
    (``allow_pickle=True`` and the file needs it); the CLI prints it as a warning."""
    text = str(spec)
    path = Path(text)
    if not path.exists() and ":" in text and not text.endswith((".pt", ".pth", ".ts")):
        return _load_factory(text, weights, allow_pickle, on_unpickle)
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
            raise ModelLoadError(f"{path}: broken TorchScript file: {first_line(e)}") from None
    obj = _torch_load(path, allow_pickle, on_unpickle)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        raise ModelLoadError(f"{path} holds a state dict, not a model: give 'package.module:factory' "
                             f"and --weights {path}")
    raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not an nn.Module")


# --------------------------------------------------------------------------- the first layer and input shape

FIRST_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Layer:
    """A conv / linear layer of a model, by its module path."""

    name: str
    module: nn.Module

    def describe(self) -> str:
        m = self.module
        n = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        unit = "input features" if isinstance(m, nn.Linear) else "input channels"
        return f"{self.name or '(model)'} ({type(m).__name__}, {n} {unit})"

    def expects(self) -> str:
        m = self.module
        if isinstance(m, nn.Linear):
            return f"(..., {m.in_features} features)"
        dims = {nn.Conv1d: "L", nn.Conv2d: "H, W", nn.Conv3d: "D, H, W"}[type(m)]
        return f"(N, C={m.in_channels}, {dims})"

    def input_shape(self, spatial: Sequence[int]) -> tuple[int, ...]:
        m = self.module
        if isinstance(m, nn.Linear):
            return (1, m.in_features)
        if isinstance(m, nn.Conv3d):  # a short clip: 224^3 voxels would be a needlessly huge probe
            return (1, m.in_channels, 16, *(s // 2 for s in spatial))
        return (1, m.in_channels, *spatial[:1 if isinstance(m, nn.Conv1d) else 2])


@dataclass(frozen=True)
class ShapeGuess:
    """An inferred input shape and what it was inferred from (said to the user)."""

    shape: tuple[int, ...]
    layer: Layer
    how: str  # "the first layer the model runs", ...

    def describe(self) -> str:
        return f"inferred from {self.layer.describe()}, {self.how}"


class _Reached(BaseException):  # BaseException: a model's own `except Exception` must not swallow it
    def __init__(self, name: str) -> None:
        self.name = name


def first_layer_run(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Layer | None:
    """The first conv / linear the model's forward reaches on ``inputs`` (stops there: cheap), or None
    when the forward fails or ends before any (or the model is TorchScript, which has no hooks)."""
    if isinstance(model, torch.jit.ScriptModule):
        return None
    layers = {name: m for name, m in model.named_modules() if type(m) in FIRST_LAYER_TYPES}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: object) -> None:
            raise _Reached(name)
        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in layers.items()]
    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs)
    except _Reached as r:
        return Layer(r.name, layers[r.name])
    except Exception:
        return None
    finally:
        for h in handles:
            h.remove()
    return None


def _torchscript_first_layer(model: torch.jit.ScriptModule) -> Layer | None:
    """The first conv / linear op of a TorchScript graph, by the parameter its weight is read from."""
    convs = {"aten::conv1d": nn.Conv1d, "aten::conv2d": nn.Conv2d, "aten::conv3d": nn.Conv3d,
             "aten::_convolution": None, "aten::linear": nn.Linear}
    state = model.state_dict()
    for node in model.inlined_graph.nodes():
        if node.kind() not in convs:
            continue
        producer, path = list(node.inputs())[1].node(), []
        while producer.kind() == "prim::GetAttr":
            path.append(producer.s("name"))
            producer = list(producer.inputs())[0].node()
        weight = state.get(".".join(reversed(path)))
        if weight is None:
            continue
        name = ".".join(reversed(path[1:]))
        if node.kind() == "aten::linear":
            layer: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
        else:  # channels in = weight dim 1 x groups; the rank of the kernel gives Conv1d/2d/3d
            cls = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}.get(weight.dim())
            if cls is None:
                continue
            groups = list(node.inputs())[-1 if node.kind() != "aten::_convolution" else 8].toIValue()
            groups = groups if isinstance(groups, int) else 1
            layer = cls(weight.shape[1] * groups, weight.shape[0], 1, groups=groups, device="meta")
        return Layer(name, layer)
    return None


def guess_input_shape(model: nn.Module, spatial: Sequence[int] = (224, 224)) -> ShapeGuess:
    """Guess a single-sample input shape from the first conv / linear layer the model runs.

    Execution order, not registration order: the forward is run on a probe input up to the first
    conv / linear it reaches (hooks stop it there). TorchScript: the first conv / linear in its graph.
    A model whose forward cannot be probed falls back to the first registered layer (and says so)."""
    if isinstance(model, torch.jit.ScriptModule):
        layer = _torchscript_first_layer(model)
        if layer is None:
            raise ModelLoadError("cannot infer the input shape (no conv / linear in the TorchScript graph): "
                                 "pass --input-shape")
        return ShapeGuess(layer.input_shape(spatial), layer, "the first conv/linear in its TorchScript graph")
    registered = [Layer(n, m) for n, m in model.named_modules() if type(m) in FIRST_LAYER_TYPES]
    if not registered:
        raise ModelLoadError("cannot infer the input shape (no Conv/Linear layer found): pass --input-shape")
    guess = registered[0]
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype, device = (param.dtype, param.device) if param is not None else (torch.float32, torch.device("cpu"))
    for _ in range(3):  # the probe reached another layer: try its shape (a stem may reshape first)
        try:
            probe = torch.zeros(guess.input_shape(spatial), dtype=dtype, device=device)
        except RuntimeError:
            break
        reached = first_layer_run(model, (probe,))
        if reached is None:
            break
        if reached.name == guess.name:
            return ShapeGuess(guess.input_shape(spatial), guess, "the first layer the model runs")
        guess = reached
    if guess is not registered[0]:
        return ShapeGuess(guess.input_shape(spatial), guess, "the first layer the model runs")
    return ShapeGuess(guess.input_shape(spatial), guess,
                      "the first registered layer (a probe forward did not reach any conv/linear)")


def infer_input_shape(model: nn.Module, spatial: Sequence[int] = (224, 224)) -> tuple[int, ...]:
    """:func:`guess_input_shape`'s shape."""
    return guess_input_shape(model, spatial).shape

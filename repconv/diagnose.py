"""Why a model did not run on the given inputs, as one line that names the real cause.

Each cause has its own fix, so each gets its own message:
* out of memory - with the input's size (make it smaller);
* dtype - the model's parameters and the input differ (``--dtype`` sets the dtype the CLI runs in);
* shape - a size / shape error: the first layer the model runs and the dims it expects, and the
  module where it failed;
* anything else - the user's forward raised: its exception, and where in the user's code.
"""

from __future__ import annotations

import math
import os
import re
import traceback
from collections.abc import Sequence

import torch
from torch import nn

from repconv.io import Layer, _torchscript_first_layer, first_layer_run
from repconv.util import eval_mode, first_line

_OOM = re.compile(r"out of memory|can't allocate memory|not enough memory|failed to allocate|"
                  r"DefaultCPUAllocator: can't", re.I)
_DTYPE = re.compile(r"dtype|scalar type|\bHalf\b|BFloat16|c10::|Input type \(|FloatTensor|HalfTensor|"
                    r"not implemented for '", re.I)
_SHAPE = re.compile(r"shape|size|channels|dimension|cannot be multiplied|expected .*input|out of range|"
                    r"padded input|kernel size|groups|rank", re.I)
_TORCH_DIR = os.path.dirname(torch.__file__)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - unreachable


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def describe_inputs(inputs: Sequence[torch.Tensor]) -> str:
    """'(1, 3, 224, 224) float32, 588.0 KiB' - each tensor's shape and dtype, and their total size."""
    parts = [f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs]
    size = sum(t.numel() * t.element_size() for t in inputs)
    return f"{', '.join(parts)}, {fmt_bytes(size)}"


def is_out_of_memory(e: BaseException) -> bool:
    """MemoryError, torch.OutOfMemoryError (CUDA) or an allocator failure."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and bool(_OOM.search(str(e))))


def out_of_memory_message(inputs: Sequence[torch.Tensor] | str) -> str:
    what = inputs if isinstance(inputs, str) else describe_inputs(inputs)
    return f"out of memory running the model on input {what}: try a smaller --input-shape (batch or image size)"


def _floating_params(model: nn.Module) -> dict[torch.dtype, str]:
    """Floating dtype -> the first parameter / buffer of that dtype."""
    found: dict[torch.dtype, str] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point():
            found.setdefault(t.dtype, name)
    return found


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_message(model: nn.Module, inputs: Sequence[torch.Tensor], e: BaseException) -> str:
    params = _floating_params(model)
    given = {t.dtype for t in inputs if t.is_floating_point()}
    detail = first_line(e)
    if len(params) == 1 and given and next(iter(params)) not in given:
        own = _name(next(iter(params)))
        theirs = ", ".join(sorted(_name(d) for d in given))
        return (f"dtype mismatch: the model's parameters are {own} but the input is {theirs}: pass --dtype {own} "
                f"to run it as it is, or --dtype {theirs} to convert it ({detail})")
    if len(params) > 1:
        mix = ", ".join(f"{_name(d)} ({n})" for d, n in params.items())
        return f"dtype mismatch: the model mixes {mix}: pass --dtype float32 to convert it to one dtype ({detail})"
    if "not implemented for" in detail:
        return (f"an op has no {', '.join(sorted(_name(d) for d in given))} kernel here ({detail}): "
                "pass --dtype float32")
    return f"dtype error on input {describe_inputs(inputs)}: {detail} (--dtype sets the dtype the model runs in)"


def _where_it_failed(model: nn.Module, inputs: Sequence[torch.Tensor]) -> str | None:
    """Re-run the model with a stack of the modules running; the innermost one when it raises."""
    if isinstance(model, torch.jit.ScriptModule):
        return None
    stack: list[str] = []
    failed: list[str] = []
    handles = []
    for name, m in model.named_modules():
        def pre(_m: nn.Module, _a: object, name: str = name) -> None:
            stack.append(name)

        def post(_m: nn.Module, _a: object, _o: object) -> None:
            if stack:
                stack.pop()
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with eval_mode(model), torch.no_grad():
            model(*(t.clone() for t in inputs))
    except Exception:
        failed = [n for n in stack if n]
    finally:
        for h in handles:
            h.remove()
    if not failed:
        return None
    inner = failed[-1]
    return f"{inner} ({type(model.get_submodule(inner)).__name__})"


def _user_frame(e: BaseException) -> str | None:
    """'mynets.py:12 in forward': the innermost frame of the traceback outside torch, after the caller's."""
    frames = traceback.extract_tb(e.__traceback__)[1:]
    for fr in reversed(frames):
        if not fr.filename.startswith(_TORCH_DIR) and not fr.filename.startswith("<"):
            path = fr.filename
            try:
                rel = os.path.relpath(path)
                path = rel if not rel.startswith("..") else path
            except ValueError:
                pass
            return f"{path}:{fr.lineno} in {fr.name}"
    return None


def describe_forward_failure(model: nn.Module, inputs: Sequence[torch.Tensor], error: BaseException) -> str:
    """One line naming why ``model(*inputs)`` raised ``error`` (caught by the caller of the forward).

    Diagnosing a shape or user error re-runs the forward once with hooks (to name the module)."""
    inputs = tuple(inputs)
    if is_out_of_memory(error):
        return out_of_memory_message(inputs)
    detail = first_line(error)
    if _DTYPE.search(detail):
        return _dtype_message(model, inputs, error)
    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
    where = _where_it_failed(model, inputs)
    if _SHAPE.search(detail):
        first: Layer | None = (_torchscript_first_layer(model) if isinstance(model, torch.jit.ScriptModule)
                               else first_layer_run(model, inputs))
        if first is None and not isinstance(model, torch.jit.ScriptModule):
            first = next((Layer(n, m) for n, m in model.named_modules()
                          if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))), None)
        expects = f"; its first layer {first.describe()} expects {first.expects()}" if first else ""
        at = f" in {where}" if where else ""
        return f"model does not accept input {shapes}{expects} ({type(error).__name__}{at}: {detail})"
    places = [p for p in (f"in {where}" if where else None, _user_frame(error)) if p]
    at = f" ({', '.join(places)})" if places else ""
    return f"the model's forward raised {type(error).__name__}: {detail}{at}"

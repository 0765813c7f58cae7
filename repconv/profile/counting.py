"""Parameter and multiply-accumulate counts, so latency can be read against the work done."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_onnx_parameters(path: str | Path) -> int:
    """Elements in the initializers of an ONNX file (what the deployed model stores)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return sum(math.prod(t.dims) for t in proto.graph.initializer)


def _involution_flops(x_shape: Any, kernel_shape: Any, kernel_size: Any = None, *args: Any,
                      out_shape: Any = None, **kwargs: Any) -> int:
    # Each output element is a sum of K*K products (one per kernel tap).
    n, c, ho, wo = out_shape
    k = int(kernel_size if kernel_size is not None else kwargs.get("kernel_size", 1))
    return 2 * n * c * ho * wo * k * k


def _flop_counter_macs(model: nn.Module, example: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    mapping: dict[Any, Any] = {}
    try:
        import repconv.ops  # noqa: F401  (registers torch.ops.repconv.*)

        mapping[torch.ops.repconv.involution] = _involution_flops
    except (ImportError, AttributeError, RuntimeError):
        pass
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter, torch.inference_mode():
        model(example)
    return counter.get_total_flops() // 2  # the counter reports 2 FLOPs per multiply-add


def _hook_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Fallback: conv / linear layers only, via forward hooks."""
    total = 0

    def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal total
        if not isinstance(output, torch.Tensor):
            return
        if isinstance(mod, nn.modules.conv._ConvNd):
            per_out = (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
            total += output.numel() * per_out
        elif isinstance(mod, nn.Linear):
            total += output.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return total


def count_macs(model: nn.Module, example: torch.Tensor) -> int | None:
    """Multiply-accumulates of one forward pass on ``example`` (None if the model can't be counted).

    torch.utils.flop_counter sees every aten op (convs, matmuls, attention, ...) plus repconv's
    involution; forward hooks on conv/linear are the fallback for models it cannot run under."""
    try:
        return int(_flop_counter_macs(model, example))
    except Exception:
        pass
    try:
        return int(_hook_macs(model, example))
    except Exception:
        return None

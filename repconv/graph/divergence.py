"""Name the first layer where a fused model departs from its original."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from repconv import verification
from repconv.verification import compare_outputs

from .tracing import module_path, trace


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.outputs: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.outputs[n.name] = out.detach().clone()
        return out


@torch.no_grad()
def first_divergence(model: nn.Module, fused: nn.Module, inputs: tuple[torch.Tensor, ...], rtol: float,
                      atol: float) -> str | None:
    """Name the first layer (in the original's program order) whose output differs."""
    if not isinstance(fused, fx.GraphModule):
        for name, child in model.named_children():
            sub = getattr(fused, name, None)
            if sub is None:
                continue
            captured: list[tuple] = []

            def record(_m: nn.Module, args: tuple, kwargs: dict, c: list[tuple] = captured) -> None:
                # a call with keyword or non-tensor arguments cannot be replayed positionally: skipped
                if not c and not kwargs and args and all(isinstance(a, torch.Tensor) for a in args):
                    c.append(tuple(a.detach().clone() for a in args))

            h = child.register_forward_pre_hook(record, with_kwargs=True)
            try:
                model(*(t.clone() for t in inputs))
            finally:
                h.remove()
            if captured and not verification.verify(child, sub, captured[0], rtol=rtol, atol=atol).ok:
                inner = first_divergence(child, sub, captured[0], rtol, atol)
                return f"{name}.{inner}" if inner else name
        return None
    try:
        orig = trace(copy.deepcopy(model).eval())
    except Exception:
        return None
    a, b = _Recorder(orig), _Recorder(fused)
    a.run(*(t.clone() for t in inputs))
    b.run(*(t.clone() for t in inputs))
    replaced = fused.meta.get("repconv_replaced", {})
    fused_out = {replaced.get(k, k): t for k, t in b.outputs.items()}
    for node in orig.graph.nodes:
        ra, rb = a.outputs.get(node.name), fused_out.get(node.name)
        if ra is None or rb is None or ra.shape != rb.shape:
            continue
        stats = compare_outputs(ra, rb)[0]
        if not stats.finite or stats.max_abs > atol + max(rtol, stats.rtol_floor) * stats.ref_max:
            return module_path(node)
    return None

"""Graph capture: torch.fx symbolic tracing that also records in-place slice assignment.

Official re-parameterization code writes padding borders with ``out[:, :, 0:p, :] = v`` (DBB's
BN-and-pad layer); stock fx proxies refuse item assignment, so the tracer records it as an
``operator.setitem`` node (fx treats that as side-effectful and keeps it in program order).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn


class _MutableProxy(fx.Proxy):
    def __setitem__(self, key: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class RepTracer(fx.Tracer):
    """fx tracer with item assignment; standard torch.nn modules stay leaves."""

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _MutableProxy(node, self)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        # fx finds a parameter's name by scanning every named parameter on each access (quadratic:
        # tens of seconds on GhostNetV3's functional branches); one map by identity instead
        named = root.named_parameters() if isinstance(root, nn.Module) else ()
        self._param_names = {id(p): n for n, p in named}
        self._buffer_names = {id(b): n for n, b in root.named_buffers()} if isinstance(root, nn.Module) else {}
        return super().trace(root, concrete_args)

    def create_arg(self, a: Any) -> Any:
        # same lookups by identity for tensors passed as arguments (running_mean into F.batch_norm)
        if isinstance(a, torch.Tensor) and not isinstance(a, fx.Proxy):
            name = self._param_names.get(id(a)) if isinstance(a, nn.Parameter) else self._buffer_names.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        name = self._param_names.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if name is None:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; raises whatever fx raises for untraceable code."""
    tracer = RepTracer()
    graph = tracer.trace(model)
    for node in graph.nodes:
        # string annotations (``from __future__ import annotations``) break GraphModule pickling
        if isinstance(node.type, str):
            node.type = None
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


_PURE_METHODS = {"detach", "view", "reshape", "permute", "transpose", "contiguous", "clone", "to", "float",
                 "double", "half", "unsqueeze", "squeeze", "flatten", "expand", "repeat", "t", "sum", "mean",
                 "mul", "add", "sub", "div", "sqrt", "rsqrt", "pow", "neg", "abs", "exp", "sigmoid", "softmax",
                 "__getitem__", "size", "dim", "reciprocal", "type_as", "view_as", "reshape_as", "expand_as"}


def _node_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a) or a)
    return out


def fold_constants(gm: fx.GraphModule) -> dict[fx.Node, Any]:
    """Evaluate every node that depends only on parameters, buffers and literals.

    Third-party blocks build their weights in forward (identity + weight, DO-Conv's einsum, BN
    shift for padding); knowing those values lets the pass treat ``F.conv2d(x, w(params))`` as a
    conv. Nothing is rewritten here, values are only returned.
    """
    consts: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj: Any = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            consts[node] = obj.detach() if isinstance(obj, torch.Tensor) else obj
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        if node.op == "call_function" and node.target is operator.setitem:
            continue
        if node.op == "call_method" and node.target not in _PURE_METHODS:
            continue
        inputs = _node_args(node)
        if not inputs or not all(a in consts for a in inputs):
            continue
        args = fx.node.map_arg(node.args, lambda a: consts[a])
        kwargs = fx.node.map_arg(node.kwargs, lambda a: consts[a])
        try:
            with torch.no_grad():
                if node.op == "call_function":
                    consts[node] = node.target(*args, **kwargs)
                else:
                    consts[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        except Exception:  # not evaluable without inputs after all: leave it to the graph
            continue
    return consts


def module_path(node: fx.Node) -> str:
    """Best human name for where a node comes from: its module, or the innermost module on the stack."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        return path[0] if isinstance(path, tuple) else str(path)
    return node.name

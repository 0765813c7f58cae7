"""Transfer rules: how each linear op extends an :class:`~repconv.graph.affine.Affine` value.

One rule per op family, registered for all its spellings at once (the module, the functional
form, the Tensor method and the aten overloads that TorchScript / torch.export graphs use), with
arguments bound by name so a rule reads like the algebra it applies::

    @transfer(functions=[F.conv2d, aten.convolution.default, ...], modules=[nn.Conv2d])
    def conv(op: Op) -> Affine: ...

A rule raises :class:`NotAffine` when the op is not linear in its tensor input (its output is then
an opaque root) and :class:`~repconv.algebra.FusionRefused` with a reason when it is linear but
cannot be expressed exactly (the reason goes into the report).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.fx as fx
from torch import nn

from ..semantics import pure_name

if TYPE_CHECKING:
    from ..affine import Affine


class NotAffine(Exception):
    """The op is not linear in its tensor input: its output is an opaque root."""


class GraphState(Protocol):
    """What a rule may read or record of the running analysis (``regions.Analysis`` provides it)."""

    consts: dict[fx.Node, Any]
    modules: dict[str, nn.Module]
    values: dict[fx.Node, Affine | None]
    stacks: dict[fx.Node, tuple[list[Affine], int]]

    def const(self, x: Any) -> Any: ...
    def static(self, x: Any) -> Any: ...
    def invalidate(self, target: fx.Node, reason: str) -> None: ...


Rule = Callable[["Op"], "Affine | None"]
Spelling = Any | tuple[Any, Sequence[str]]  # a target, or (target, parameter names) for builtins

_FUNCTIONS: dict[Any, tuple[Rule, tuple[str, ...]]] = {}
_METHODS: dict[str, tuple[Rule, tuple[str, ...]]] = {}
_MODULES: list[tuple[type, Rule]] = []


def _params(target: Any) -> tuple[str, ...]:
    if isinstance(target, torch._ops.OpOverload):
        return tuple(a.name for a in target._schema.arguments)
    try:
        return tuple(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        raise TypeError(f"{target} has no signature: register it as (target, parameter names)") from None


def transfer(functions: Iterable[Spelling] = (), methods: Iterable[str | tuple[str, Sequence[str]]] = (),
             modules: Iterable[type] = ()) -> Callable[[Rule], Rule]:
    """Register ``rule`` for every spelling. Methods take their parameters after ``input`` (self)."""
    def register(rule: Rule) -> Rule:
        for f in functions:
            target, params = f if isinstance(f, tuple) else (f, _params(f))
            _FUNCTIONS[target] = (rule, tuple(params))
        for m in methods:
            name, params = m if isinstance(m, tuple) else (m, ())
            _METHODS[name] = (rule, ("input", *params))
        for t in modules:
            _MODULES.append((t, rule))
        return rule
    return register


def rule_for(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[Rule, tuple[str, ...]] | None:
    if node.op == "call_function":
        try:
            return _FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHODS.get(pure_name(str(node.target)))
    if node.op == "call_module":
        m = modules.get(str(node.target))
        for t, rule in _MODULES:
            if isinstance(m, t):
                return rule, ("input",)
    return None


_SELF = {"self": "input"}  # aten's name for the first operand


class Op:
    """One node as a rule sees it: arguments by name, tensor values, constants."""

    def __init__(self, an: GraphState, node: fx.Node, get: Callable[[fx.Node], Affine], params: tuple[str, ...]):
        self.an, self.node, self.get, self.params = an, node, get, params
        args = node.args
        if params and params[-1].startswith("*"):  # x.view(b, c, -1): the rest is one tuple
            n = len(params) - 1
            args = (*args[:n], tuple(args[n:])) if len(args) > n else args
            params = (*params[:n], params[-1][1:])
        if len(args) > len(params):
            raise NotAffine
        self.args: dict[str, Any] = {_SELF.get(p, p): a for p, a in zip(params, args, strict=False)}
        for k, a in node.kwargs.items():
            self.args[_SELF.get(k, k)] = a

    @property
    def module(self) -> nn.Module:
        return self.an.modules[str(self.node.target)]

    def has(self, name: str) -> bool:
        return name in self.args

    def raw(self, name: str, default: Any = None) -> Any:
        return self.args.get(name, default)

    def is_tensor(self, name: str) -> bool:
        a = self.args.get(name)
        return isinstance(a, fx.Node) and a not in self.an.consts

    def tensor(self, name: str = "input") -> Affine:
        """The value of a tensor operand (NotAffine when it is not a traced tensor)."""
        a = self.args.get(name)
        if not isinstance(a, fx.Node) or a in self.an.consts:
            raise NotAffine
        return self.get(a)

    def const(self, name: str, default: Any = None) -> Any:
        """A constant operand (parameters, buffers, literals and what is computed from them only)."""
        return self.an.const(self.args.get(name, default))

    def static(self, name: str, default: Any = None) -> Any:
        """A geometry operand as a Python value; one computed from the input's shape at run time
        (SE blocks: ``avg_pool2d(x, x.size(3))``) is no constant of the model: the op is opaque."""
        return self.an.static(self.args.get(name, default))

    def out_shape(self) -> tuple[int, ...] | None:
        shape = getattr(self.node.meta.get("tensor_meta"), "shape", None)
        return tuple(int(d) for d in shape) if shape is not None else None

    def set_arg(self, name: str, value: Any) -> None:
        """Rewrite one operand of the node (the LayerNorm affine strip)."""
        node = self.node
        for i, p in enumerate(self.params):
            if _SELF.get(p, p) != name:
                continue
            if i < len(node.args):
                node.update_arg(i, value)
            else:
                node.update_kwarg(p, value)
            return
        raise KeyError(name)

# the rule modules register themselves on import
from . import arith, conv, layout, linear, norm, pad  # noqa: E402,F401

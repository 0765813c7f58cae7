"""What a traced op means for the pass beyond its arithmetic: metadata reads and in-place mutation.

* A metadata read (``x.shape``, ``x.ndim``, ``x.size()``, ``torch._assert(x.ndim == 4)``, the
  second operand of ``reshape_as``) needs a tensor of the right shape, not its values: it does not
  make the tensor a region boundary. After the rewrite it reads a tensor of the same shape.
* An in-place op (``y.add_(t)``, ``h.relu_()``, ``F.relu(x, inplace=True)``, ``nn.ReLU(inplace=True)``)
  changes the tensor every later op reads. :func:`functionalize` makes that explicit: later readers
  of the mutated tensor read the in-place op's result instead (what they saw at run time), so each
  node is one value again. Where a view of the tensor is read later, that is impossible to express
  per node; :func:`functionalize` then names the op, and the graph is left unfused.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

aten = torch.ops.aten

_META_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad", "is_sparse"}
_META_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "get_device", "is_contiguous",
                 "is_floating_point", "element_size", "new_zeros", "new_ones", "new_empty", "new_full"}
_META_FUNCTIONS = {len, torch.numel, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
                   torch.is_floating_point, aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}
# methods whose *second* operand only lends its shape / dtype
_META_SECOND = {"reshape_as", "view_as", "expand_as", "type_as"}

# ops that return a view of (or the very same tensor as) their first operand
_ALIAS_METHODS = {"view", "reshape", "permute", "transpose", "t", "flatten", "unflatten", "unsqueeze", "squeeze",
                  "expand", "narrow", "select", "detach", "view_as", "reshape_as", "expand_as", "as_strided",
                  "movedim", "contiguous", "to", "type_as", "__getitem__", "split", "chunk", "unbind", "T", "mT"}
_ALIAS_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                    torch.narrow, torch.select, torch.detach, torch.movedim, torch.split, torch.chunk, torch.unbind,
                    operator.getitem, torch.t}
_ALIAS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Flatten, nn.Unflatten)


def is_metadata_use(user: fx.Node, node: fx.Node) -> bool:
    """``user`` reads only the shape / rank / dtype of ``node`` (never its values)."""
    if user.op == "call_function" and user.target is getattr:
        return user.args[0] is node and user.args[1] in _META_ATTRS
    if user.op == "call_method":
        if user.target in _META_METHODS:
            return user.args[0] is node and node not in user.args[1:] and node not in user.kwargs.values()
        if user.target in _META_SECOND:
            return user.args[0] is not node and len(user.args) > 1 and user.args[1] is node
    if user.op == "call_function" and user.target in _META_FUNCTIONS:
        return user.args[:1] == (node,) and node not in user.args[1:]
    return False


def value_users(node: fx.Node) -> list[fx.Node]:
    """Users that read ``node``'s values (metadata reads excluded)."""
    return [u for u in node.users if not is_metadata_use(u, node)]


# --------------------------------------------------------------------------- in-place ops

def _inplace_target(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The tensor an in-place op mutates, or None when ``node`` is not in-place."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_method":
        name = str(node.target)
        if name.endswith("_") and not name.startswith("_") and name != "requires_grad_":
            return first
    elif node.op == "call_function":
        if node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
            return first
        if node.kwargs.get("inplace") is True:
            return first
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and getattr(torch, name, None) is node.target:
            return first  # torch.relu_(x), torch.sigmoid_(x)
        if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
            return first
    elif node.op == "call_module":
        m = modules.get(str(node.target))
        if m is not None and getattr(m, "inplace", False) is True and type(m).__module__.startswith("torch.nn"):
            return first
    return None


def _is_alias(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_method":
        return node.target in _ALIAS_METHODS
    if node.op == "call_function":
        return node.target in _ALIAS_FUNCTIONS
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _ALIAS_MODULES)
    return False


def _aliases(node: fx.Node, modules: dict[str, nn.Module]) -> set[fx.Node]:
    """``node``, what it is a view of, and every view of those (the tensors sharing its storage)."""
    base = node
    while _is_alias(base, modules) and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    found, stack = {base}, [base]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in found and _is_alias(u, modules) and u.args and u.args[0] is n:
                found.add(u)
                stack.append(u)
    return found


def functionalize(gm: fx.GraphModule) -> list[tuple[fx.Node, str]]:
    """Redirect every reader of a tensor after an in-place op on it to the op's result.

    Returns the in-place ops that cannot be made explicit (a view of the mutated tensor is read
    later, or the tensor is a parameter), with the reason; the caller then leaves the graph as is.
    """
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    problems: list[tuple[fx.Node, str]] = []
    for node in list(gm.graph.nodes):
        target = _inplace_target(node, modules)
        if target is None or target.op == "get_attr":
            if target is not None:
                problems.append((node, f"in-place {_op_label(node)} on a parameter or buffer"))
            continue
        later = [u for u in target.users if order[u] > order[node]]
        # views taken before the op share the mutated storage; later ones are taken of the result
        others = {a for a in _aliases(target, modules) - {target} if order[a] < order[node]}
        if any(order[u] > order[node] for a in others for u in a.users if u is not node):
            problems.append((node, f"in-place {_op_label(node)} on a tensor whose view is read later"))
            continue
        for u in later:
            u.replace_input_with(target, node)
    return problems


def _op_label(node: fx.Node) -> str:
    return str(node.target) if node.op != "call_function" else getattr(node.target, "__name__", str(node.target))


def pure_name(name: str) -> str:
    """``add_`` -> ``add``: the pure twin an in-place method computes (after functionalization)."""
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name

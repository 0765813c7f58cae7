"""Recognise involution written by someone else and replace it with ``repconv::involution``.

The paper's reference module (and most look-alikes: RedNet ports, I-D-DW conv, CoTNet's local
aggregation) computes the aggregation with a K*K-times larger ``unfold`` buffer::

    cols = unfold(x, K, dilation, padding, stride)          # (N, C*K*K, Ho*Wo)
    cols = cols.view(N, G, C//G, K*K, Ho, Wo)
    w    = kernel.view(N, G, K*K, Ho, Wo).unsqueeze(2)      # (N, G, 1, K*K, Ho, Wo)
    out  = (w * cols).sum(dim=3).view(N, C, Ho, Wo)

Exported as is, that becomes Im2Col-like Reshape/Mul/ReduceSum chains that ORT runs slowly and no
runtime recognises. This pass finds the computation in the torch.fx graph by its *dataflow and
shapes* (ShapeProp on the example inputs), never by class or attribute names, so any spelling works:
``nn.Unfold`` or ``F.unfold``, ``view``/``reshape``/``unsqueeze``/``None``-indexing, either operand
order of the multiply, ``sum(dim=3)``/``sum(-3)``/``torch.sum``, 5-D layouts without a group axis
(G = 1 or G = C). What is checked, so that the rewrite is exact:

* the unfold has square kernel/stride/dilation, odd K and the op's "same" padding d*(K-1)//2;
* the unfold side is reached from the unfold output through row-major reshapes only and has shape
  (N, *chan, K*K, Ho, Wo) with prod(chan) = C: the flat index c*K*K + k and y*Wo + x survive;
* the other multiplicand has the same rank, the batch and the last three dims, and its channel dims
  are a non-broadcast prefix followed by 1s: that prefix is the group axis (channel c -> group
  c // (C/G)), so it is the involution kernel (N, G, K*K, Ho, Wo) up to a reshape;
* the sum reduces exactly the K*K axis, and row-major reshapes then lead to (N, C, Ho, Wo).

After rewriting, the new graph is run on the example inputs and compared with the original; a
mismatch (or an untraceable model) leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import math
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import repconv.ops  # noqa: F401 - registers torch.ops.repconv.involution
from repconv.util import tensor_leaves

__all__ = ["InvolutionMatch", "find_involutions", "rewrite_involutions"]


@dataclass(frozen=True)
class InvolutionMatch:
    """One recognised unfold-multiply-sum aggregation."""

    where: str  # module path (best effort) of the code that computed it; "" = the model's own forward
    kernel_size: int
    stride: int
    dilation: int
    groups: int
    channels: int


# Ops that only re-index a tensor in row-major order (so flat element order is preserved).
_RESHAPE_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "flatten", "unflatten", "contiguous"}
_RESHAPE_FUNCTIONS: set[Callable[..., Any]] = {
    torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten, torch.unflatten,
}
_MUL_FUNCTIONS: set[Callable[..., Any]] = {operator.mul, torch.mul}
_SUM_FUNCTIONS: set[Callable[..., Any]] = {torch.sum}


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _is_reshape(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _RESHAPE_METHODS:
        return True
    if node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS:
        return True
    # x[:, :, None] (pure unsqueeze by indexing) is common in "clean" re-implementations.
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        idx = node.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        full = slice(None)
        return all(i is None or i == full or i is Ellipsis for i in idx) and _shape(node) is not None
    return False


def _pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (int(v[0]), int(v[1]))
    return None


def _is_unfold(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target is F.unfold
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Unfold)


def _unfold_params(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, int, int, int, int] | None:
    """(input, K, dilation, padding, stride) of an unfold node with square parameters, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, nn.Unfold) or len(node.args) != 1:
            return None
        raw = (mod.kernel_size, mod.dilation, mod.padding, mod.stride)
        inp = node.args[0]
    elif node.op == "call_function" and node.target is F.unfold:
        names = ("input", "kernel_size", "dilation", "padding", "stride")
        defaults = {"dilation": 1, "padding": 0, "stride": 1}
        bound = dict(zip(names, node.args, strict=False))
        bound.update(node.kwargs)
        if "input" not in bound or "kernel_size" not in bound:
            return None
        inp = bound["input"]
        raw = tuple(bound.get(n, defaults.get(n)) for n in names[1:])
    else:
        return None
    pairs = [_pair(v) for v in raw]
    if not isinstance(inp, fx.Node) or any(p is None or p[0] != p[1] for p in pairs):
        return None
    k, d, p, s = (pair[0] for pair in pairs)  # type: ignore[index]
    return inp, k, d, p, s


def _sum_dims(node: fx.Node) -> tuple[fx.Node, tuple[int, ...], bool] | None:
    """(input, dims, keepdim) of a sum node."""
    if node.op == "call_method" and node.target == "sum":
        pass
    elif node.op == "call_function" and node.target in _SUM_FUNCTIONS:
        pass
    else:
        return None
    args = list(node.args)
    src = args[0] if args else node.kwargs.get("input")
    dim = args[1] if len(args) > 1 else node.kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
    if not isinstance(src, fx.Node) or dim is None or not isinstance(keepdim, bool):
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim) if isinstance(dim, (tuple, list)) else None
    if dims is None or not all(isinstance(i, int) for i in dims):
        return None
    return src, dims, keepdim


def _reshape_chain_down(node: fx.Node) -> list[fx.Node]:
    """Nodes reachable from ``node`` through single-user reshape steps (``node`` first)."""
    chain = [node]
    while True:
        users = list(chain[-1].users)
        if len(users) != 1 or not _is_reshape(users[0]):
            return chain
        chain.append(users[0])


def _reshape_source(node: fx.Node) -> fx.Node:
    """Walk a reshape chain upwards to the first tensor with the same elements in the same order."""
    while _is_reshape(node) and isinstance(node.args[0], fx.Node) and _shape(node.args[0]) is not None:
        node = node.args[0]
    return node


def _depends_on_input(node: fx.Node) -> bool:
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if cur.op == "placeholder":
            return True
        fx.node.map_arg((cur.args, cur.kwargs), lambda a: todo.append(a) or a)
    return False


@dataclass
class _Found:
    x: fx.Node
    kernel_src: fx.Node
    output: fx.Node
    match: InvolutionMatch


def _where(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":  # the unfold module itself: report the block that owns it
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        return str(last[0] if isinstance(last, tuple) else last)
    return ""


def _match_at(gm: fx.GraphModule, unfold: fx.Node) -> _Found | None:
    params = _unfold_params(gm, unfold)
    if params is None:
        return None
    x, k, d, p, s = params
    xs, us = _shape(x), _shape(unfold)
    if xs is None or us is None or len(xs) != 4 or k % 2 == 0 or p != d * (k - 1) // 2:
        return None
    n, c, h, w = xs
    kk = k * k
    ho = (h + 2 * p - d * (k - 1) - 1) // s + 1
    wo = (w + 2 * p - d * (k - 1) - 1) // s + 1
    if us != (n, c * kk, ho * wo):
        return None

    # Unfold side: reshapes down to a multiply whose operand looks like (N, *chan, KK, Ho, Wo).
    for a in _reshape_chain_down(unfold):
        for mul in list(a.users):
            if not (mul.op == "call_function" and mul.target in _MUL_FUNCTIONS) and not (
                mul.op == "call_method" and mul.target == "mul"
            ):
                continue
            if len(mul.args) != 2 or mul.kwargs:
                continue
            b = mul.args[1] if mul.args[0] is a else mul.args[0]
            if b is a or not isinstance(b, fx.Node):
                continue
            found = _check_operands(a, b, mul, n, c, kk, ho, wo)
            if found is None:
                continue
            groups, out = found
            if not _depends_on_input(b):
                # A fixed kernel (a parameter) is a locally-connected layer, not involution; with
                # N == 1 it would also pass the shape test and then break a dynamic batch.
                continue
            match = InvolutionMatch(_where(gm, unfold), k, s, d, groups, c)
            return _Found(x=x, kernel_src=_reshape_source(b), output=out, match=match)
    return None


def _check_operands(
    a: fx.Node, b: fx.Node, mul: fx.Node, n: int, c: int, kk: int, ho: int, wo: int
) -> tuple[int, fx.Node] | None:
    sa, sb, sm = _shape(a), _shape(b), _shape(mul)
    if sa is None or sb is None or sm != sa or len(sa) < 5 or len(sb) != len(sa):
        return None
    chan, tail = sa[1:-3], sa[-3:]
    if sa[0] != n or tail != (kk, ho, wo) or math.prod(chan) != c:
        return None
    if sb[0] != n or sb[-3:] != tail:
        return None
    bchan = sb[1:-3]
    # Kernel channel dims: a prefix equal to the data's, then 1s (broadcast over channels in a group).
    split = 0
    while split < len(chan) and bchan[split] == chan[split] and bchan[split] != 1:
        split += 1
    if any(v != 1 for v in bchan[split:]):
        return None
    groups = math.prod(bchan[:split]) if split else 1
    if c % groups:
        return None
    # The reduction over the K*K axis, then reshapes to (N, C, Ho, Wo).
    kk_axis = len(sa) - 3
    users = list(mul.users)
    if len(users) != 1:
        return None
    summed = _sum_dims(users[0])
    if summed is None or summed[0] is not mul:
        return None
    dims = tuple(dd % len(sa) for dd in summed[1])
    if dims != (kk_axis,):
        return None
    for node in _reshape_chain_down(users[0]):
        if _shape(node) == (n, c, ho, wo):
            return groups, node
    return None


def find_involutions(gm: fx.GraphModule) -> list[_Found]:
    """Matches in a graph that already carries ShapeProp's ``tensor_meta``."""
    found: list[_Found] = []
    for node in gm.graph.nodes:
        f = _match_at(gm, node)
        if f is not None:
            found.append(f)
    return found


def _replace(gm: fx.GraphModule, found: Sequence[_Found]) -> None:
    g = gm.graph
    replaced: dict[fx.Node, fx.Node] = {}  # an output already rewritten may feed the next match
    for f in found:
        m = f.match
        want = (_shape(f.x)[0], m.groups * m.kernel_size**2, *_shape(f.output)[2:])  # type: ignore[index]
        x = replaced.get(f.x, f.x)
        with g.inserting_before(f.output):
            kernel = replaced.get(f.kernel_src, f.kernel_src)
            if _shape(kernel) != want:
                # -1 keeps the batch axis free for dynamic-batch export.
                kernel = g.call_function(torch.reshape, (kernel, (-1, *want[1:])))
            new = g.call_function(
                torch.ops.repconv.involution.default,
                (x, kernel, m.kernel_size, m.stride, m.dilation, m.groups),
            )
        new.meta.update(f.output.meta)
        f.output.replace_all_uses_with(new)
        replaced[f.output] = new
    g.eliminate_dead_code()
    g.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _trace(model: nn.Module) -> fx.GraphModule:
    try:  # the fusion pass's tracer also records DBB-style slice assignment
        from repconv.graph.tracing import trace
    except ImportError:  # pragma: no cover - graph package absent
        return fx.symbolic_trace(model)
    return trace(model)


def _outputs_close(a: Any, b: Any) -> bool:
    fa = tensor_leaves(a)
    fb = tensor_leaves(b)
    if len(fa) != len(fb):
        return False
    for ta, tb in zip(fa, fb, strict=True):
        if ta.shape != tb.shape:
            return False
        scale = float(ta.abs().max()) if ta.numel() else 0.0
        if ta.numel() and float((ta - tb).abs().max()) > 1e-4 * max(scale, 1.0):
            return False
    return True


def _clone(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)


def _rewrite_one(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[nn.Module, list[InvolutionMatch]] | None:
    """Trace ``module`` and rewrite it; None when it cannot be traced (caller descends instead)."""
    try:
        gm = _trace(module)
    except Exception:
        return None
    if not any(_is_unfold(gm, n) for n in gm.graph.nodes):
        return module, []  # nothing to look for: skip the shape-propagation forward pass
    if kwargs:  # ShapeProp feeds placeholders positionally; keyword calls are rare for blocks
        return None
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints a traceback before raising
            ShapeProp(gm).propagate(*_clone(args))
    except Exception:
        return None
    found = find_involutions(gm)
    if not found:
        return module, []
    _replace(gm, found)
    with torch.no_grad():
        try:
            ok = _outputs_close(module(*_clone(args)), gm(*_clone(args)))
        except Exception:
            ok = False
    if not ok:
        warnings.warn(
            f"involution pattern in {type(module).__name__} rewritten but outputs differ; left as is",
            stacklevel=3,
        )
        return module, []
    return gm, [f.match for f in found]


def rewrite_involutions(
    model: nn.Module, example_inputs: Sequence[torch.Tensor]
) -> tuple[nn.Module, list[InvolutionMatch]]:
    """Return ``(model', matches)`` with every recognised unfold-involution replaced by the op.

    ``model`` is not modified. If the whole model traces, the result is a ``GraphModule``; otherwise
    each submodule is tried top-down (inputs captured by hooks during one forward pass) and the ones
    that trace are swapped in place in a copy. Models with nothing to rewrite come back unchanged.
    """
    if isinstance(model, torch.jit.ScriptModule):
        return model, []
    args = tuple(example_inputs)
    with torch.no_grad():
        whole = _rewrite_one(model, args, {})
    if whole is not None:
        return whole
    return _rewrite_submodules(model, args)


def _rewrite_submodules(model: nn.Module, args: tuple[Any, ...]) -> tuple[nn.Module, list[InvolutionMatch]]:
    calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {}
    names = {id(m): name for name, m in model.named_modules()}
    handles = []

    def hook(mod: nn.Module, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
        # Copies: later in-place ops (ReLU(inplace=True)) must not change what the block saw.
        calls.setdefault(names.get(id(mod), ""), []).append((_clone(a), kw))

    for m in model.modules():
        if m is not model:
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args)
    except Exception:
        return model, []
    finally:
        for h in handles:
            h.remove()

    work = copy.deepcopy(model)
    matches: list[InvolutionMatch] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            path = f"{prefix}{child_name}"
            seen = calls.get(path, [])
            # A module run more than once may see other shapes; the rewrite bakes the traced ones.
            if len(seen) == 1:
                a, kw = seen[0]
                with torch.no_grad():
                    res = _rewrite_one(child, a, kw)
                if res is not None:
                    new, found = res
                    if found:
                        setattr(parent, child_name, new)
                        matches.extend(
                            dataclasses.replace(m, where=f"{path}.{m.where}" if m.where else path) for m in found
                        )
                    continue
            visit(child, f"{path}.")

    visit(work, "")
    return (work, matches) if matches else (model, [])

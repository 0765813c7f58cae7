"""Capture: fuse code ``torch.fx`` cannot trace, by what a real forward actually does.

A module fx can trace is traced with the arguments it was really called with (tensors become the
graph's inputs, every other argument - ``None``, flags, sizes - the constant it had), so its graph
keeps the module's own signature and a parent may go on calling it positionally or by keyword.

A module fx cannot trace (data-dependent Python, layer outputs routed by index as in ultralytics,
an iterated list argument, ...) is run once per recorded call with hooks on every submodule. The
submodules it calls itself (not from inside another submodule) - wherever they sit in the module
tree: an ``nn.Sequential`` that is never called as a whole just holds them - are fused in turn, each
with the inputs it actually got, and checked on every call it received before it replaces the
original in a shallow copy of the parent. A replacement keeps the plain attributes the parent's code
may read (ultralytics' ``f`` / ``i``, timm's ``resolution``). A submodule the example never calls
stays as it is, and the report says so.

No torch.export tier: on the 11 real-library models fx cannot trace (timm efficientvit_m0 and
tiny_vit, ultralytics YOLOv8/9/10/11/12/26 and RT-DETR), fusing ``torch.export``'s aten graph reached
exactly the aten conv / matmul / batch-norm counts this capture reaches, for 1.3-5.4 s more per model
(the export alone takes longer than the whole capture), with a shape-specialized graph and no module
structure or attributes left.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import keyword
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from repconv.graph import FuseReport, Refusal, rewrite
from repconv.graph.tracing import RepTracer
from repconv.util import first_line
from repconv.verification import VerifyReport, compare_outputs

_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_PRESERVED = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")
_CONSTANT_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.memory_format,
                   torch.layout, slice, type(Ellipsis))


@dataclass
class Call:
    """One real call of a module: its arguments (copies) and, once it returned, its output (a copy)."""

    args: tuple
    kwargs: dict[str, Any]
    output: Any = None

    def fresh(self) -> tuple[tuple, dict[str, Any]]:
        """Copies to run with: a module may modify its inputs in place."""
        return _clone(self.args), _clone(self.kwargs)


@dataclass
class Capture:
    """Where results go, and the tolerance a fused submodule must meet on each of its calls."""

    report: FuseReport
    rtol: float
    atol: float
    unused_reported: set[int] = field(default_factory=set)  # a nested recording meets them again


def fuse_calls(module: nn.Module, calls: list[Call], cap: Capture, prefix: str) -> nn.Module:
    """``module`` fused for ``calls`` (at least one): a GraphModule when fx traces it, a shallow copy
    with its called submodules fused when it does not, or ``module`` itself when nothing fuses."""
    where = prefix or type(module).__name__
    try:
        gm = trace_call(module, calls)
        with _quiet():
            ShapeProp(gm).propagate(*_positional(gm, calls[0]))
    except Exception as e:  # data-dependent Python: fuse the parts it calls
        cap.report.untraced.append(f"{where}: {type(e).__name__}: {first_line(e, 120)}")
        return fuse_parts(module, calls, cap, prefix)
    sub = FuseReport()
    fused = rewrite(gm, sub, prefix)
    if not sub.regions:
        _merge(cap.report, sub)
        return module
    # one graph for several calls (shaped by the first, by module state at trace time): it must compute
    # each of them. A single call is the pipeline's verification's to judge (a wrong rule surfaces there)
    bad = None if len(calls) == 1 else next((i for i, c in enumerate(calls) if not _matches(fused, c, cap)), None)
    if bad is not None:
        cap.report.notes.append(f"{where}: fused graph differs from the original on its call {bad + 1} of "
                                f"{len(calls)}: fused its parts instead")
        return fuse_parts(module, calls, cap, prefix)
    _merge(cap.report, sub)
    keep_attributes(module, fused)
    return fused


def fuse_parts(module: nn.Module, calls: list[Call], cap: Capture, prefix: str,
               extra: dict[int, list[Call]] | None = None) -> nn.Module:
    """Run ``module`` on ``calls`` and fuse the submodules it calls itself (see the module docstring).
    ``extra``: calls a parent made directly to some of our submodules (they must fit those too)."""
    rec = record(module, calls)
    for mid, more in (extra or {}).items():
        if mid in rec.paths:
            rec.top.setdefault(mid, []).extend(more)
    rec.report_unused(cap, prefix)
    work = _shell(module)
    shells: dict[str, nn.Module] = {"": work}
    frontier = sorted(rec.top, key=lambda m: rec.depth(m))
    done: set[int] = set()
    for mid in frontier:
        if mid in done:
            continue
        sub = rec.modules[mid]
        path = rec.paths[mid][0]
        full = _join(prefix, path)
        inner = [d for d in frontier if d != mid and d not in done and rec.is_below(d, mid)]
        if not _worth_fusing(sub):
            _report_unreached_bn(sub, full, cap.report, where=prefix or type(module).__name__)
            continue
        if inner:  # called both as a whole and piecewise from our own code: fuse its parts, for both
            done.update(inner)
            new = fuse_parts(sub, rec.top[mid], cap, full, {d: rec.top[d] for d in inner})
        else:
            new = fuse_calls(sub, rec.top[mid], cap, full)
        done.add(mid)
        if new is not sub:
            for p in rec.paths[mid]:
                _place(shells, p, new)
    return work if len(shells) > 1 or work._modules != module._modules else module


# --------------------------------------------------------------------------- recording

@dataclass
class Recording:
    modules: dict[int, nn.Module]
    paths: dict[int, list[str]]  # every path of a (possibly shared) submodule, first = canonical
    top: dict[int, list[Call]]  # calls made by the recorded module's own code
    called: set[int]

    def __post_init__(self) -> None:
        self._ids = {p: mid for mid, ps in self.paths.items() for p in ps}

    def depth(self, mid: int) -> int:
        return self.paths[mid][0].count(".")

    def is_below(self, mid: int, ancestor: int) -> bool:
        return any(p.startswith(a + ".") for p in self.paths[mid] for a in self.paths[ancestor])

    def report_unused(self, cap: Capture, prefix: str) -> None:
        """Name the largest never-called subtrees that hold parameters or buffers (not the insides of
        torch.nn layers: ``MultiheadAttention`` reads its ``out_proj`` weights without calling it)."""
        reached = {p for mid in self.called for p in self.paths[mid]}
        reached_below = {p.rpartition(".")[0] for p in reached}
        while True:
            more = {p.rpartition(".")[0] for p in reached_below if p} - reached_below
            if not more:
                break
            reached_below |= more
        for mid, m in self.modules.items():
            path = self.paths[mid][0]
            parent = path.rpartition(".")[0]
            if (mid in self.called or path in reached_below or not _holds_state(m) or mid in cap.unused_reported
                    or (parent and parent not in reached and parent not in reached_below)
                    or (parent and _is_torch_layer(self.modules[self._ids[parent]]))):
                continue
            cap.unused_reported.add(mid)
            cap.report.notes.append(f"{_join(prefix, path)}: never called by the example inputs: kept as it is")


def record(module: nn.Module, calls: list[Call]) -> Recording:
    """Run ``module`` on each call; record every call its own code makes to a submodule."""
    modules: dict[int, nn.Module] = {}
    paths: dict[int, list[str]] = {}
    for path, m in module.named_modules(remove_duplicate=False):
        if path and not isinstance(m, torch.jit.ScriptModule):
            modules.setdefault(id(m), m)
            paths.setdefault(id(m), []).append(path)
    top: dict[int, list[Call]] = {}
    called: set[int] = set()
    stack: list[bool] = []

    def before(m: nn.Module, args: tuple, kwargs: dict) -> None:
        outermost = not stack
        if outermost:
            top.setdefault(id(m), []).append(Call(_clone(args), _clone(kwargs)))
        stack.append(outermost)
        called.add(id(m))

    def after(m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
        if stack.pop():
            top[id(m)][-1].output = _clone(out)

    handles = []
    try:
        for m in modules.values():
            handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(m.register_forward_hook(after, with_kwargs=True, always_call=True))
        with torch.no_grad():
            for c in calls:
                args, kwargs = c.fresh()
                module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return Recording(modules, paths, top, called)


# --------------------------------------------------------------------------- tracing one call signature

class _Unsupported(TypeError):
    pass


class _CallTracer(RepTracer):
    """Traces ``forward`` with the arguments of a recorded call: one placeholder per parameter of the
    signature (so the graph is called like the module), tensors read from them, every other value
    the recorded constant."""

    def __init__(self, call: Call | None = None):  # no call: a plain tracer (GraphModule unpickling)
        super().__init__()
        self.call = call
        self._names: dict[int, str] | None = None

    # fx finds a parameter's or buffer's name by scanning the whole root on each use: quadratic in model
    # size (25 s of 27 for timm's ghostnetv3_050); one table does the same
    def create_arg(self, a: Any) -> Any:
        if self._names is not None and isinstance(a, torch.Tensor) and id(a) in self._names:
            return self.create_node("get_attr", self._names[id(a)], (), {})
        return super().create_arg(a)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._names is None or not isinstance(attr_val, torch.Tensor):
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        name = self._names.get(id(attr_val))
        if name is None or (not isinstance(attr_val, nn.Parameter) and not self.proxy_buffer_attributes):
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def create_args_for_root(self, root_fn: Callable, is_module: bool, concrete_args: Any = None) -> tuple:
        if self.call is None:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        names: dict[int, str] = {}
        for n, t in [*self.root.named_buffers(), *self.root.named_parameters()]:
            names.setdefault(id(t), n)
        self._names = names
        sig = inspect.signature(inspect.unwrap(root_fn))
        params = list(sig.parameters.values())
        if not is_module or not params:
            raise _Unsupported("not a module forward")
        bound = sig.bind(self.root, *self.call.args, **self.call.kwargs)
        placeholders = []
        for p in params[1:]:
            if p.kind is p.KEYWORD_ONLY:  # an fx graph's inputs are positional (ShapeProp feeds them so)
                raise _Unsupported(f"keyword-only parameter {p.name}")
            name = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
            default = () if p.default is p.empty else (p.default,)
            proxy = self.create_proxy("placeholder", name, default, {})
            placeholders.append(proxy)
            if p.name in bound.arguments:
                if p.kind is p.VAR_KEYWORD and bound.arguments[p.name]:
                    raise _Unsupported(f"values passed through **{p.name}")
                bound.arguments[p.name] = _substitute(bound.arguments[p.name], proxy)
        args, kwargs = bound.args, bound.kwargs

        def call(*_: Any) -> Any:
            return root_fn(*args, **kwargs)

        return call, [self.root, *placeholders]


def trace_call(module: nn.Module, calls: list[Call]) -> fx.GraphModule:
    """fx graph of ``module.forward`` for the recorded ``calls``, which must agree on everything but
    tensor values (a flag that differs between calls would need two graphs)."""
    first = calls[0]
    for i, c in enumerate(calls[1:], 2):
        if not _same_signature(first, c):
            raise _Unsupported(f"call {i} passes different non-tensor arguments than call 1")
    if not any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves((first.args, first.kwargs))):
        raise _Unsupported("called without tensor arguments")
    tracer = _CallTracer(first)
    graph = tracer.trace(module)
    for node in graph.nodes:
        if isinstance(node.type, str):  # string annotations break GraphModule pickling
            node.type = None
    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    for node in gm.graph.nodes:
        if node.op == "placeholder" and not _is_identifier(str(node.target).lstrip("*")):
            raise _Unsupported(f"parameter name {node.target!r}")
    return gm


def _substitute(value: Any, proxy: fx.Proxy) -> Any:
    """``value`` with each tensor read from ``proxy`` (``proxy[i]`` for containers); other values stay."""
    if isinstance(value, torch.Tensor):
        return proxy
    if not _has_tensor(value):
        _check_constant(value)
        return value
    if isinstance(value, tuple | list):
        items = [_substitute(v, proxy[i]) if _has_tensor(v) else _constant(v) for i, v in enumerate(value)]
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return type(value)((k, _substitute(v, proxy[k]) if _has_tensor(v) else _constant(v))
                           for k, v in value.items())
    raise _Unsupported(f"tensors inside a {type(value).__name__} argument")


def _constant(value: Any) -> Any:
    _check_constant(value)
    return value


def _check_constant(value: Any) -> None:
    if isinstance(value, _CONSTANT_TYPES) or (isinstance(value, torch.Size)):
        return
    if isinstance(value, tuple | list):
        for v in value:
            _check_constant(v)
        return
    if isinstance(value, dict):
        for v in value.values():
            _check_constant(v)
        return
    raise _Unsupported(f"argument of type {type(value).__name__}")


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, tuple | list):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def _same_signature(a: Call, b: Call) -> bool:
    la, sa = pytree.tree_flatten((a.args, a.kwargs))
    lb, sb = pytree.tree_flatten((b.args, b.kwargs))
    if sa != sb:
        return False
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if not isinstance(x, torch.Tensor) and (type(x) is not type(y) or not _equal(x, y)):
            return False
    return True


def _equal(x: Any, y: Any) -> bool:
    try:
        return bool(x == y)
    except Exception:
        return x is y


def _positional(gm: fx.GraphModule, call: Call) -> list[Any]:
    """The call's values in placeholder order (what ``ShapeProp.propagate`` takes)."""
    sig = inspect.signature(gm.forward)
    bound = sig.bind(*_clone(call.args), **_clone(call.kwargs))
    out: list[Any] = []
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            out.extend(bound.arguments.get(p.name, ()))
        elif p.kind is not p.VAR_KEYWORD:
            out.append(bound.arguments.get(p.name, p.default))
    return out


def _is_identifier(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name)


# --------------------------------------------------------------------------- replacing

def keep_attributes(original: nn.Module, replacement: nn.Module) -> None:
    """Copy the plain attributes a parent's code may read (ultralytics' ``f``, ``i``, ``type``;
    timm's ``resolution``) from ``original`` onto its replacement; never its modules, parameters,
    buffers or bound methods, and nothing the replacement defines itself."""
    own = vars(replacement)
    kept = {}
    for name, value in vars(original).items():
        if name in _MODULE_INTERNALS or name in own or name.startswith("__"):
            continue
        if isinstance(getattr(type(replacement), name, None), property):
            continue
        if inspect.ismethod(value) and value.__self__ is original:
            continue
        own[name] = kept[name] = value
    if isinstance(replacement, fx.GraphModule) and kept:  # fx keeps these through deepcopy
        replacement.meta.setdefault(_PRESERVED, {}).update(kept)


def _shell(module: nn.Module) -> nn.Module:
    """A shallow copy with its own child table: replacing a child leaves ``module`` alone."""
    shell = copy.copy(module)
    shell._modules = dict(module._modules)
    return shell


def _place(shells: dict[str, nn.Module], path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` under the root shell, shelling every module on the way."""
    parts = path.split(".")
    parent = shells[""]
    for i in range(len(parts) - 1):
        key = ".".join(parts[: i + 1])
        if key not in shells:
            shells[key] = _shell(parent._modules[parts[i]])
            parent._modules[parts[i]] = shells[key]
        parent = shells[key]
    parent._modules[parts[-1]] = new


# --------------------------------------------------------------------------- helpers

def _worth_fusing(m: nn.Module) -> bool:
    """A module with state, and code of its own or a Sequential (a torch.nn layer alone has nothing to fuse)."""
    return _holds_state(m) and (isinstance(m, nn.Sequential) or not _is_torch_layer(m))


def _is_torch_layer(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torch.nn.")


def _holds_state(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None or next(m.buffers(), None) is not None


def _report_unreached_bn(m: nn.Module, path: str, report: FuseReport, where: str) -> None:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        report.left.append(Refusal(path, f"BatchNorm called from code fx cannot trace ({where})"))


def _matches(fused: nn.Module, call: Call, cap: Capture) -> bool:
    args, kwargs = call.fresh()
    try:
        with torch.no_grad():
            out = fused(*args, **kwargs)
        return VerifyReport(compare_outputs(call.output, out), cap.rtol, cap.atol).ok
    except Exception:
        return False


def _merge(into: FuseReport, sub: FuseReport) -> None:
    into.regions += sub.regions
    into.left += sub.left
    into.untraced += sub.untraced
    into.notes += sub.notes


def _clone(tree: Any) -> Any:
    return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tree)


def _join(prefix: str, path: str) -> str:
    return ".".join(p for p in (prefix, path) if p)


def _quiet() -> contextlib.AbstractContextManager:
    """ShapeProp prints the traceback of a failing node itself; the caller reports it in one line."""
    return contextlib.redirect_stderr(io.StringIO())

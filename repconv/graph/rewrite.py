"""Rewrite a traced graph: every multi-op linear region becomes one conv / linear module."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .regions import CONV_FUNCTIONS, LINEAR_FUNCTIONS, Analysis, analyze, region_outputs
from .report import FuseReport, Refusal, Region
from .tracing import fold_constants, module_path


def rewrite(gm: fx.GraphModule, report: FuseReport, prefix: str = "") -> fx.GraphModule:
    """Replace every multi-op linear region of ``gm`` (shapes propagated) with one module."""
    consts = fold_constants(gm)
    an = analyze(gm, consts)
    modules = dict(gm.named_modules())
    removable_setitems: set[fx.Node] = set()
    taken: set[str] = set(modules)
    renames: list[tuple[fx.Node, str]] = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    # a region's root may itself be an earlier region's output (conv+BN feeding several branches):
    # read the replacement, never the original node (it would stay alive, its BN-and-pad border
    # fills already erased)
    replaced: dict[fx.Node, fx.Node] = {}
    for node in region_outputs(an):
        v = an.values[node]
        # F.conv2d(x, f(params)): bake it (a lone crop / pool / pad stays what it is)
        computed_weight = (node.op == "call_function" and node in v.sources
                           and node.target in CONV_FUNCTIONS | LINEAR_FUNCTIONS)
        if v.root is node or (v.sources <= {node} and not v.root_fixes and not computed_weight):
            _report_left(an, node, report, prefix)
            continue
        region = Region(node, v)
        region.ops = [_op_name(n, modules) for n in _ordered(gm, v.sources)]
        region.block = _join(prefix, _block_of(v.sources, modules))
        region.params_before = _params_of(v.sources, modules, consts)
        dtype, device = _dtype_device(node, v.sources, modules, consts)
        new_mod: nn.Module = v.kernel.to_module(dtype=dtype, device=device)
        region.params_after = sum(p.numel() for p in new_mod.parameters())
        region.target = _unique(_block_of(v.sources, modules), taken)
        gm.add_submodule(region.target, new_mod)
        for fix in v.root_fixes:
            fix(gm)
        # computed where the region's first op ran: an in-place op on the root after that point
        # (a later ReLU(inplace=True)) must not leak into the fused conv's input
        first = min(v.sources, key=order.__getitem__)
        with gm.graph.inserting_before(first):
            new = gm.graph.call_module(region.target, (replaced.get(v.root, v.root),))
        new.meta = dict(node.meta)
        renames.append((new, node.name))
        for fill in [u for u in node.users if u in v.extra and u.target is operator.setitem]:
            gm.graph.erase_node(fill)  # border fills already folded into the new conv's padding
        node.replace_all_uses_with(new)
        replaced[node] = new
        removable_setitems |= {n for n in v.extra if n.op == "call_function" and n.target is operator.setitem}
        report.regions.append(region)
    for node, reason in an.refusals.items():
        report.left.append(Refusal(_join(prefix, module_path(node)), reason))
    _dce(gm, removable_setitems)
    # remember which original node each new one replaces, so divergence reports line up
    gm.meta.setdefault("repconv_replaced", {}).update({new.name: name for new, name in renames})
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _report_left(an: Analysis, node: fx.Node, report: FuseReport, prefix: str) -> None:
    reason = an.blocked.get(node)
    if reason and node.op in ("call_module", "call_function"):
        report.left.append(Refusal(_join(prefix, module_path(node)), reason))


def _dce(gm: fx.GraphModule, removable_setitems: set[fx.Node]) -> None:
    """Dead-code elimination that also drops slice assignments into otherwise dead tensors."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node.op in ("placeholder", "output"):
                continue
            if node.users and all(u in removable_setitems and u.args[0] is node for u in node.users):
                for u in list(node.users):
                    gm.graph.erase_node(u)
                changed = True
            if node.users:
                continue
            if node.op == "call_function" and node.target is operator.setitem:
                continue
            if node.op == "call_module" and getattr(gm.get_submodule(node.target), "_is_impure", False):
                continue
            gm.graph.erase_node(node)
            changed = True


# --------------------------------------------------------------------------- bookkeeping

def _ordered(gm: fx.GraphModule, nodes: frozenset[fx.Node]) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n in nodes]


def _op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def _block_of(sources: frozenset[fx.Node], modules: dict[str, nn.Module]) -> str:
    paths = []
    for n in sources:
        p = module_path(n) if n.op != "call_module" else str(n.target).rpartition(".")[0]
        if n.op != "call_module" and p == n.name:
            p = ""
        paths.append(p.split(".") if p else [])
    common: list[str] = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _unique(block: str, taken: set[str]) -> str:
    base = f"{block}.reparam" if block else "reparam"
    name, i = base, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


def _join(prefix: str, path: str) -> str:
    return ".".join(p for p in (prefix, path) if p)


def _params_of(sources: frozenset[fx.Node], modules: dict[str, nn.Module], consts: dict[fx.Node, Any]) -> int:
    """Parameters the region's ops read: their modules' and those reached through constant folding."""
    params: dict[int, int] = {}
    named = {name: p for name, p in next(iter(modules.values())).named_parameters()} if modules else {}
    for n in sources:
        if n.op == "call_module":
            params.update({id(p): p.numel() for p in modules[n.target].parameters()})
        stack = [a for a in _inputs(n) if a in consts]
        while stack:
            a = stack.pop()
            if a.op == "get_attr" and a.target in named:
                params[id(named[a.target])] = named[a.target].numel()
            stack.extend(x for x in _inputs(a) if x in consts)
    return sum(params.values())


def _inputs(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a) or a)
    return out


def _dtype_device(node: fx.Node, sources: frozenset[fx.Node], modules: dict[str, nn.Module],
                  consts: dict[fx.Node, Any]) -> tuple[torch.dtype, torch.device]:
    """The region output's dtype, and the device its parameters live on."""
    dtype = getattr(node.meta.get("tensor_meta"), "dtype", torch.float32)
    for n in sources:
        if n.op == "call_module":
            for p in modules[n.target].parameters():
                return dtype, p.device
        for a in _inputs(n):  # functional ops: weights come from constant-folded parameters
            if isinstance(consts.get(a), torch.Tensor):
                return dtype, consts[a].device
    return dtype, torch.device("cpu")




def fuse_traceable(module: nn.Module, inputs: tuple[torch.Tensor, ...], *, rtol: float = 1e-5,
                   atol: float = 1e-6) -> fx.GraphModule:
    """The graph pass alone on an fx-traceable eval-mode module, verified on ``inputs``: for callers
    below the pipeline (the dynamic operators' deploy forms fold their conv-BNs with it)."""
    import copy

    from torch.fx.passes.shape_prop import ShapeProp

    from repconv import verification

    from .tracing import trace

    gm = trace(module)
    ShapeProp(gm).propagate(*(t.clone() for t in inputs))
    fused = copy.deepcopy(rewrite(gm, FuseReport()))
    result = verification.verify(module, fused, [inputs], rtol=rtol, atol=atol)
    if not result.ok:
        raise verification.VerificationError(result)
    return fused

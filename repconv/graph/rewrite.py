"""Rewrite a traced graph: every multi-op linear region becomes one conv / linear module."""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from repconv import algebra as A
from repconv.algebra import ConvKernel, FusionRefused, LinearKernel

from .affine import Affine
from .regions import CONV_FUNCTIONS, LINEAR_FUNCTIONS, Analysis, analyze, metadata_stand_in, region_outputs
from .report import BranchTerm, FuseReport, Refusal, Region
from .semantics import functionalize, is_metadata_use
from .tracing import fold_constants, module_path


def rewrite(gm: fx.GraphModule, report: FuseReport, prefix: str = "") -> fx.GraphModule:
    """Replace every multi-op linear region of ``gm`` (shapes propagated) with one module."""
    problems = functionalize(gm)
    if problems:  # a mutation the graph cannot express per node: fusing around it could be wrong
        for node, reason in problems:
            report.left.append(Refusal(_join(prefix, module_path(node)), f"{reason}: this graph is left unfused"))
        return gm
    consts = fold_constants(gm)
    an = analyze(gm, consts)
    modules = dict(gm.named_modules())
    named_params = dict(gm.named_parameters())
    removable_setitems: set[fx.Node] = set()
    taken: set[str] = set(modules)
    renames: list[tuple[fx.Node, str]] = []
    nodes_in_order = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes_in_order)}
    # a region's root may itself be an earlier region's output (conv+BN feeding several branches):
    # read the replacement, never the original node (it would stay alive, its BN-and-pad border
    # fills already erased)
    replaced: dict[fx.Node, fx.Node] = {}
    for node in region_outputs(an):
        v = an.values[node]
        # F.conv2d(x, f(params)): bake it (a lone crop / pool / pad stays what it is)
        computed_weight = (node.op == "call_function" and node in v.sources
                           and node.target in CONV_FUNCTIONS + LINEAR_FUNCTIONS)
        if v.root is node or (len(v.sources) < 2 and not v.root_fixes and not computed_weight) \
                or not any(_weighted(n, modules) for n in v.sources):
            # one op, or only per-channel scales and shifts (a BN, ``x * s + b``): already as cheap
            # as one conv would be, and a dense one where they act on features
            _report_left(an, node, v, report, prefix)
            continue
        region = Region(node, v)
        region.ops = [_op_name(n, modules) for n in _ordered(gm, v.sources)]
        region.block = _join(prefix, _block_of(v.sources, modules))
        region.params_before = _params_of(v.sources, modules, consts, named_params)
        dtype, device = _dtype_device(node, v.sources, modules, consts)
        # a channels-last Linear whose output was permuted (ConvNeXt's layer scale after the permute)
        # stays a Linear followed by the permute, not a 1x1 conv of the permuted (wider) input
        linear_then_permute = v.root_perm is not None and _is_linear_region(v, modules)
        kernel = _as_linear(v.kernel) if linear_then_permute else v.kernel
        new_mod: nn.Module = kernel.to_module(dtype=dtype, device=device)
        region.params_after = sum(p.numel() for p in new_mod.parameters())
        region.target = _unique(_block_of(v.sources, modules), taken)
        region.module_path = _join(prefix, region.target)
        region.term_source = functools.partial(_branch_terms, v, prefix, modules, nodes_in_order)
        gm.add_submodule(region.target, new_mod)
        for fix in v.root_fixes:
            fix(gm)
        # computed where the region's first op ran: an in-place op on the root after that point
        # (a later ReLU(inplace=True)) must not leak into the fused conv's input
        first = min(v.sources, key=order.__getitem__)
        root = replaced.get(v.root, v.root)
        with gm.graph.inserting_before(first):
            if linear_then_permute:
                new = gm.graph.call_method("permute", (gm.graph.call_module(region.target, (root,)), *v.root_perm))
            else:
                read = gm.graph.call_method("permute", (root, *v.root_perm)) if v.root_perm else root
                if v.pre_pad:  # an asymmetric zero padding stays an explicit pad before the one conv
                    read = gm.graph.call_function(F.pad, (read, list(v.pre_pad)))
                new = gm.graph.call_module(region.target, (read,))
        new.meta = dict(node.meta)
        renames.append((new, node.name))
        for fill in [u for u in node.users if u in v.extra and u.target is operator.setitem]:
            gm.graph.erase_node(fill)  # border fills already folded into the new conv's padding
        _redirect_metadata(node, v, new, root)
        node.replace_all_uses_with(new)
        replaced[node] = new
        removable_setitems |= {n for n in v.extra if n.op == "call_function" and n.target is operator.setitem}
        report.regions.append(region)
    for node, reason in (an.refusals | an.cost_cuts).items():
        report.left.append(Refusal(_join(prefix, module_path(node)), reason))
    _dce(gm, removable_setitems)
    # remember which original node each new one replaces, so divergence reports line up
    gm.meta.setdefault("repconv_replaced", {}).update({new.name: name for new, name in renames})
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _redirect_metadata(out: fx.Node, v: Affine, new: fx.Node, root: fx.Node) -> None:
    """Shape reads of nodes the region absorbed now read the fused output or the root (same shape)."""
    inside = v.sources | v.extra
    for s in inside - {out}:
        for u in list(s.users):
            if u in inside or not is_metadata_use(u, s):
                continue
            stand_in = metadata_stand_in(u, s, out, v.root)
            if stand_in is not None:
                u.replace_input_with(s, new if stand_in is out else root)


def _branch_terms(v: Affine, prefix: str, modules: dict[str, nn.Module], order: list[fx.Node]) -> list[BranchTerm]:
    """The region's kernel split by original branch, each aligned to the fused kernel's geometry."""
    if not v.terms:
        return []
    final = v.kernel
    out = []
    for t in v.terms:
        try:
            k = t.kernel
            if isinstance(final, ConvKernel):
                if not isinstance(k, ConvKernel):
                    return []
                k = A.align([k, final])[0]
        except FusionRefused:  # this branch alone has no exact form (the sum has)
            return []
        if k.weight.shape != final.weight.shape:
            return []
        nodes = [n for n in order if n in t.nodes and n is not v.root]
        # functional ops at the top level have no module: they do not name a branch
        paths = list(dict.fromkeys(p for p in (module_path(n) for n in nodes) if p not in {n.name for n in nodes}))
        paths = paths or [n.name for n in nodes]
        label = (_common_path(paths) or "+".join(paths)) if nodes else "identity"
        out.append(BranchTerm(_join(prefix, label), [_op_name(n, modules) for n in nodes],
                              None if t.shift_only else k.weight, k.bias))
    return out


def _common_path(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _report_left(an: Analysis, node: fx.Node, v: Affine, report: FuseReport, prefix: str) -> None:
    """A lone linear op that stays as it is (a BatchNorm between non-linear ops, an unabsorbed norm
    affine): the report says why."""
    if not (_is_batch_norm(node, an.modules) or v.root_fixes):
        return  # a lone conv / linear / pool is already what fusion produces
    reason = an.blocked.get(node)
    if reason is None and not v.root_fixes:
        if v.root in an.forced and v.root.op != "placeholder":
            reason = "its input is also read elsewhere: folding it into the layer before would compute that twice"
        else:
            reason = "no conv / linear next to it to fold into (its neighbours are not linear)"
    elif reason is None:
        reason = "the normalization's affine has no conv / linear after it to fold into"
    report.left.append(Refusal(_join(prefix, module_path(node)), reason))


_WEIGHTED_MODULES = (nn.Conv2d, nn.Linear, nn.AvgPool2d)


def _is_linear_region(v: Affine, modules: dict[str, nn.Module]) -> bool:
    """The region's weighted ops are all Linear (matmuls), and its kernel a plain 1x1 channel mix."""
    k = v.kernel
    if not isinstance(k, ConvKernel) or k.kernel_size != (1, 1) or k.geom.groups != 1 or any(k.geom.padding) \
            or k.geom.stride != (1, 1):
        return False
    weighted = [n for n in v.sources if _weighted(n, modules)]
    return bool(weighted) and all(
        isinstance(modules.get(str(n.target)), nn.Linear) if n.op == "call_module" else n.target in LINEAR_FUNCTIONS
        for n in weighted)


def _as_linear(k: ConvKernel) -> LinearKernel:
    return LinearKernel(k.weight[:, :, 0, 0], k.bias)


def _weighted(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A conv / linear / pooling: an op that costs multiply-adds, which a region replaces."""
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _WEIGHTED_MODULES)
    name = getattr(node.target, "__name__", str(node.target))
    return node.target in CONV_FUNCTIONS + LINEAR_FUNCTIONS or any(k in name for k in ("avg_pool", "matmul", "mm"))


def _is_batch_norm(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), nn.modules.batchnorm._BatchNorm)
    return node.op == "call_function" and "batch_norm" in getattr(node.target, "__name__", str(node.target))


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


def _params_of(sources: frozenset[fx.Node], modules: dict[str, nn.Module], consts: dict[fx.Node, Any],
               named: dict[str, nn.Parameter]) -> int:
    """Parameters the region's ops read: their modules' and those reached through constant folding."""
    params: dict[int, int] = {}
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

"""``repconv.fuse``: trace, find linear regions, rewrite them, verify."""

from __future__ import annotations

import contextlib
import copy
import io
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from repconv import verification
from repconv.algebra import ConvKernel
from repconv.io import ModelLoadError, infer_input_shape
from repconv.util import eval_mode, first_line
from repconv.verification import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    Inputs,
    VerificationError,
    VerifyReport,
    as_tuple,
    compare_outputs,
)

from .regions import CONV_FUNCTIONS, LINEAR_FUNCTIONS, Analysis, Refusal, Region, analyze, region_outputs
from .tracing import fold_constants, module_path, trace


class FuseInputError(ValueError):
    """The model or its inputs cannot be fused (NaN weights, wrong input shape, ...)."""


@dataclass
class FuseReport:
    regions: list[Region] = field(default_factory=list)
    left: list[Refusal] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verification: VerifyReport | None = None
    params_before: int = 0
    params_after: int = 0
    input_shapes: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "regions": [{"block": r.block, "kind": region_kind(r), "branches": r.branches, "ops": r.ops,
                         "result": region_result(r), "params_before": r.params_before,
                         "params_after": r.params_after} for r in self.regions],
            "left": [{"where": x.where, "reason": x.reason} for x in self.left],
            "untraced": self.untraced, "notes": self.notes,
            "params_before": self.params_before, "params_after": self.params_after,
            "input_shapes": self.input_shapes,
            "verification": self.verification.to_dict() if self.verification else None,
        }


def fuse(model: nn.Module, example_inputs: Inputs | None = None, *, verify: bool = True,
         rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL) -> nn.Module:
    """Return a NEW eval-mode module with every exactly-fusable linear region collapsed into one
    conv / linear. ``model`` is left untouched. Raises :class:`repconv.VerificationError` if the
    result does not match (``verify=True``)."""
    return fuse_with_report(model, example_inputs, verify=verify, rtol=rtol, atol=atol)[0]


def fuse_with_report(model: nn.Module, example_inputs: Inputs | None = None, *, verify: bool = True,
                     rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                     samples: Sequence[Inputs] = (), seed: int = 0) -> tuple[nn.Module, FuseReport]:
    """:func:`fuse` plus a :class:`FuseReport` of what was fused, what was left and why."""
    if not isinstance(model, nn.Module):
        raise FuseInputError(f"expected an nn.Module, got {type(model).__name__}")
    _check_finite(model)
    report = FuseReport()
    # a copy: the pass runs the model, which may modify its input in place
    inputs = tuple(t.clone() for t in _example_inputs(model, example_inputs, seed))
    report.input_shapes = [list(t.shape) for t in inputs]
    if model.training:
        report.notes.append("model was in train mode: fused an eval-mode copy (BN uses running statistics)")
    with eval_mode(model), torch.no_grad():
        # dynamic operators (CondConv, PSConv, ...) first take their inference form
        from repconv.dynamic import deploy_rewrites

        if isinstance(model, torch.jit.ScriptModule):
            source: nn.Module = _from_torchscript(model, inputs)
            report.notes.append("TorchScript model: converted to an fx graph of aten ops first")
        else:
            source, swapped = deploy_rewrites(model)
            if swapped:
                report.notes.append("deploy rewrites: " + ", ".join(swapped))
            source = _self_reparameterize(source, source is not model, report)
        # the pass never mutates the modules it reads; the deepcopy at the end detaches the result
        # from the user's model while copying only what survived fusion
        fused = copy.deepcopy(_fuse_module(source, inputs, report, prefix=""))
    fused.eval()
    report.params_before = sum(p.numel() for p in model.parameters())
    report.params_after = sum(p.numel() for p in fused.parameters())
    if verify:
        gen = torch.Generator().manual_seed(seed + 1)
        checks = [inputs] + [tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)
                                   if t.is_floating_point() else t for t in inputs) for _ in range(2)]
        checks += [as_tuple(s) for s in samples]
        with eval_mode(model):
            result = verification.verify(model, fused, checks, rtol=rtol, atol=atol)
            if not result.ok:
                result.first_divergence = _first_divergence(model, fused, inputs, rtol, atol)
        report.verification = result
        if not result.ok:
            raise VerificationError(result)
    return fused, report



# --------------------------------------------------------------------------- the pass

def _from_torchscript(model: torch.jit.ScriptModule, inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """A scripted model as an fx graph (torch's TorchScript -> ExportedProgram converter)."""
    import logging
    import warnings

    from torch._export.converter import TS2EPConverter

    export_log = logging.getLogger("torch._export")
    level = export_log.level
    try:
        export_log.setLevel(logging.ERROR)  # shape-specialisation chatter, not the user's problem
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = TS2EPConverter(model, inputs).convert().module()
    except Exception as e:
        raise FuseInputError(f"cannot convert the TorchScript model to a graph: {first_line(e)}") from None
    finally:
        export_log.setLevel(level)
    for node in list(gm.graph.nodes):  # export's input guards: checks only, and not scriptable
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
    gm.meta["repconv_pretraced"] = True
    return gm


def _fuse_module(work: nn.Module, inputs: tuple[torch.Tensor, ...], report: FuseReport, prefix: str) -> nn.Module:
    try:
        gm = work if isinstance(work, fx.GraphModule) and work.meta.get("repconv_pretraced") else trace(work)
    except Exception as e:  # data-dependent Python: fall back to the largest traceable children
        report.untraced.append(f"{prefix or type(work).__name__}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        return _fuse_children(work, inputs, report, prefix)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints tracebacks itself
            ShapeProp(gm).propagate(*inputs)  # one real forward: also proves the inputs fit
    except Exception as e:
        _check_runs(work, inputs)  # a user error (wrong shape) is reported as such
        report.untraced.append(f"{prefix or type(work).__name__}: shape propagation failed: {str(e)[:120]}")
        return _fuse_children(work, inputs, report, prefix)
    return rewrite(gm, report, prefix)


def _self_reparameterize(model: nn.Module, owned: bool, report: FuseReport) -> nn.Module:
    """Blocks that declare ``fuse_by_reparameterize`` (repconv's RepMLP: reshapes the fx pass cannot
    see through) convert themselves first, on a copy."""
    names = [n for n, m in model.named_modules() if getattr(m, "fuse_by_reparameterize", False)]
    if not names:
        return model
    work = model if owned else copy.deepcopy(model)
    for name in names:
        work.get_submodule(name).reparameterize()
    report.notes.append("self re-parameterized: " + ", ".join(n or "(top)" for n in names))
    return work


def _fuse_children(module: nn.Module, inputs: tuple[torch.Tensor, ...], report: FuseReport, prefix: str) -> nn.Module:
    # a shell sharing the children, so replacing them leaves the user's module alone; containers
    # (ModuleList / ModuleDict: never called themselves) are shelled too and their items fused
    work = _shell(module)
    targets: list[tuple[nn.Module, str, nn.Module, str]] = []  # (parent shell, name, child, path)

    def collect(parent: nn.Module, path: str) -> None:
        for name, child in list(parent.named_children()):
            child_path = f"{path}.{name}" if path else name
            if isinstance(child, nn.ModuleList | nn.ModuleDict):
                shell = _shell(child)
                setattr(parent, name, shell)
                collect(shell, child_path)
            elif list(child.children()) or not type(child).__module__.startswith("torch.nn"):
                targets.append((parent, name, child, child_path))  # built-in leaves: nothing to fuse

    collect(work, prefix)
    captured: dict[int, tuple[torch.Tensor, ...]] = {}
    hooks = []
    for i, (_, _, child, _) in enumerate(targets):
        def hook(_m: nn.Module, args: tuple, i: int = i) -> None:
            if i not in captured and all(isinstance(a, torch.Tensor) for a in args):
                captured[i] = tuple(a.detach().clone() for a in args)
        hooks.append(child.register_forward_pre_hook(hook))
    try:
        _check_runs(work, inputs)
    finally:
        for h in hooks:
            h.remove()
    for i, (parent, name, child, path) in enumerate(targets):
        if i in captured:
            setattr(parent, name, _fuse_module(child, captured[i], report, path))
    return work


def _shell(module: nn.Module) -> nn.Module:
    shell = copy.copy(module)
    shell._modules = dict(module._modules)
    return shell


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


def region_kind(r: Region) -> str:
    """Short human label: conv+bn, bn+conv, linear+bn, or 'N branches'."""
    core = [_short(op) for op in r.ops]
    core = [c for c in core if c]
    if r.branches > 1:
        return f"{r.branches} branches"
    compact: list[str] = []
    for c in core:
        if not compact or compact[-1] != c:
            compact.append(c)
    return "+".join(compact) or "affine"


def region_result(r: Region) -> str:
    k = r.value.kernel
    if isinstance(k, ConvKernel):
        kh, kw = k.kernel_size
        g = f", groups {k.geom.groups}" if k.geom.groups > 1 else ""
        return f"{kh}x{kw} conv{g}"
    return "linear"


def _short(op: str) -> str:
    low = op.lower()
    for key, label in (("batchnorm", "bn"), ("batch_norm", "bn"), ("conv", "conv"), ("linear", "linear"),
                       ("layernorm", "ln"), ("avg_pool", "avgpool"), ("avgpool", "avgpool"), ("pad", "pad"),
                       ("cat", "concat")):
        if key in low:
            return label
    return ""


# --------------------------------------------------------------------------- checks and inputs

def _check_finite(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FuseInputError(f"{name} contains NaN or Inf: refusing to fuse a broken model")


def _example_inputs(model: nn.Module, example_inputs: Inputs | None, seed: int) -> tuple[torch.Tensor, ...]:
    if example_inputs is not None:
        try:
            return as_tuple(example_inputs)
        except TypeError as e:
            raise FuseInputError(str(e)) from None
    try:
        shape = infer_input_shape(model)
    except ModelLoadError as e:
        raise FuseInputError(str(e)) from None
    p = next(model.parameters(), None)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype if p.is_floating_point() else torch.float32)
    return (x,)


def _check_runs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Run the model once; a failure is the user's input not fitting it."""
    try:
        model(*inputs)
    except Exception as e:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        try:
            expected = f"; its first layer expects {_expected_dims(model)}"
        except ModelLoadError:
            expected = ""
        raise FuseInputError(f"model does not accept input {shapes}{expected} ({first_line(e)})") from None


def _expected_dims(model: nn.Module) -> str:
    shape = infer_input_shape(model)
    if len(shape) == 4:
        return f"(N, C={shape[1]}, H, W)"
    if len(shape) == 3:
        return f"(N, C={shape[1]}, L)"
    return f"(N, {shape[1]} features)"


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
def _first_divergence(model: nn.Module, fused: nn.Module, inputs: tuple[torch.Tensor, ...], rtol: float,
                      atol: float) -> str | None:
    """Name the first layer (in the original's program order) whose output differs."""
    if not isinstance(fused, fx.GraphModule):
        for name, child in model.named_children():
            sub = getattr(fused, name, None)
            if sub is None:
                continue
            captured: list[tuple] = []
            h = child.register_forward_pre_hook(lambda _m, a, c=captured: c.append(a) if not c else None)
            try:
                model(*(t.clone() for t in inputs))
            finally:
                h.remove()
            if captured and not verification.verify(child, sub, captured[0], rtol=rtol, atol=atol).ok:
                inner = _first_divergence(child, sub, captured[0], rtol, atol)
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

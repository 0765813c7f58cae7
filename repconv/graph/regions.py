"""Find maximal linear regions in a traced graph and rewrite each as one conv / linear.

The analysis walks nodes in program order and gives each an :class:`Affine` value (see
affine.py) through the transfer rule registered for its op (rules/). A value with a non-identity
kernel that some user cannot absorb is a region output: it is replaced by a single module
computing ``kernel(root)``. A value absorbed by two users (or also read directly) would be computed
twice, so it is materialized instead and the analysis re-run ("forced" roots) until stable.
Metadata reads (``x.shape``, ``x.ndim``) are not reads of the value (semantics.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from repconv import algebra as A
from repconv.algebra import FusionRefused

from . import affine as V
from .affine import Affine, identity_of, shape_of
from .rules import NotAffine, Op, rule_for
from .rules.conv import CONV_FUNCTIONS
from .rules.linear import LINEAR_FUNCTIONS
from .semantics import is_metadata_use, value_users


class Analysis:
    """One pass of value propagation over ``gm``."""

    def __init__(self, gm: fx.GraphModule, consts: dict[fx.Node, Any], forced: set[fx.Node]):
        self.gm = gm
        self.consts = consts
        self.forced = forced
        self.invalidated: set[fx.Node] = set()  # forced during this run by a slice assignment
        self.modules = dict(gm.named_modules())
        self.values: dict[fx.Node, Affine | None] = {}
        self.absorbed: dict[fx.Node, set[fx.Node]] = {}
        self.refusals: dict[fx.Node, str] = {}  # the node itself could not be expressed
        self.blocked: dict[fx.Node, str] = {}  # a consumer could not absorb this node's value
        self.stacks: dict[fx.Node, tuple[list[Affine], int]] = {}  # torch.stack nodes: (members, dim)
        self.cost_cuts: dict[fx.Node, str] = {}  # merges / compositions cut because they cost more

    # -- value access ------------------------------------------------------------------------
    def _consumable(self, node: fx.Node) -> Affine | None:
        v = self.values.get(node)
        if v is None:
            return None
        if not v.is_identity and node in self.forced:
            return identity_of(node)
        return v

    def const(self, x: Any) -> Any:
        """A constant operand; one computed from the input (CondConv's per-sample weight) makes the op opaque."""
        if isinstance(x, fx.Node):
            if x not in self.consts:
                raise NotAffine
            return self.consts[x]
        if isinstance(x, list | tuple) and any(isinstance(a, fx.Node) for a in x):
            return type(x)(self.const(a) for a in x)
        return x

    def static(self, x: Any) -> Any:
        found: list[fx.Node] = []
        fx.node.map_arg(x, lambda a: found.append(a) or a)
        if any(a not in self.consts for a in found):
            raise NotAffine
        return fx.node.map_arg(x, lambda a: self.consts[a])

    def invalidate(self, target: fx.Node, reason: str) -> None:
        """``target`` was mutated (a slice assignment): it can only be read as it is, a forced root."""
        v = self.values.get(target)
        if v is not None and not v.is_identity:
            self.refusals[target] = reason
            self.forced.add(target)
            self.invalidated.add(target)
            self.values[target] = identity_of(target)

    def run(self) -> Analysis:
        for node in self.gm.graph.nodes:
            if node in self.consts or node.op in ("output", "get_attr"):
                self.values[node] = None
                continue
            self.values[node] = self._visit(node)
        return self

    def _visit(self, node: fx.Node) -> Affine | None:
        inputs = [a for a in _tensor_inputs(node) if a not in self.consts]
        if node.op == "placeholder" or not inputs:
            return identity_of(node)
        found = rule_for(node, self.modules)
        if found is None:
            return identity_of(node)
        rule, params = found
        # 1st try: extend the inputs' values; 2nd: treat the inputs as fresh roots
        first_error: str | None = None
        for fresh in (False, True):
            used: dict[fx.Node, Affine] = {}

            def get(a: fx.Node, used: dict[fx.Node, Affine] = used, fresh: bool = fresh) -> Affine:
                v = identity_of(a) if fresh else self._consumable(a)
                if v is None:
                    raise NotAffine
                used[a] = v
                return v

            try:
                result = rule(Op(self, node, get, params))
            except (NotAffine, V.DifferentRoots):  # nothing to report: an ordinary op or residual add
                return identity_of(node)
            except FusionRefused as e:
                if not fresh:
                    for a, v in used.items():
                        if not v.is_identity:
                            self.blocked.setdefault(a, str(e))
                elif first_error is None:
                    first_error = str(e)
                continue
            if result is None:  # bookkeeping node (slice assignment) with no value of its own
                return None
            for a, v in used.items():
                if not v.is_identity:
                    self.absorbed.setdefault(a, set()).add(node)
            return result
        if first_error:
            self.refusals[node] = first_error
        return identity_of(node)


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a) or a)
    return out


def analyze(gm: fx.GraphModule, consts: dict[fx.Node, Any], max_rounds: int = 20) -> Analysis:
    """Propagate values, forcing multiply-used intermediate values to be materialized."""
    forced: set[fx.Node] = set()
    # Slice assignments that could not be folded force their tensor for the next round only: the
    # refusal may be an artefact of this round (a BN-and-pad fill compared with a bias composed
    # through a root that is forced in the same round). Refused twice, the forcing is permanent.
    last_invalid: set[fx.Node] = set()
    seen_invalid: set[fx.Node] = set()
    cuts: dict[fx.Node, str] = {}
    for _ in range(max_rounds):
        an = Analysis(gm, consts, forced | last_invalid).run()
        cuts.update(an.cost_cuts)
        an.cost_cuts = cuts
        new = set(forced) | (an.invalidated & seen_invalid)
        seen_invalid |= an.invalidated
        for node, v in an.values.items():
            if v is None or v.is_identity or node in new:
                continue
            absorbers = an.absorbed.get(node, set())
            direct = [u for u in value_users(node) if u not in absorbers and u not in v.extra]
            if len(absorbers) > 1 or (absorbers and direct):
                new.add(node)
        for node in region_outputs(an):
            v = an.values[node]
            if v.view_start is not None:  # leading dims not back to the root's: end before the reshapes
                new.add(v.view_start)
            if v.root_perm is not None and node in v.extra:
                # the region would end on the permute itself: permuting the (wider) root first buys
                # nothing, so it ends before it
                new.add(node.args[0])
            fused_macs, parts = region_macs(an, node), original_macs(an, v.sources)
            if v.expensive and fused_macs > parts:
                # cut before each composition / merge that grew the kernel: its inputs become roots
                new |= {a for c in v.expensive for a in _tensor_inputs(c) if a not in an.consts}
                for c in v.expensive:
                    cuts.setdefault(c, f"exact merge cut for cost: one fused kernel would cost "
                                       f"{fused_macs / max(parts, 1):.1f}x the multiply-adds of its parts")
            new |= _unanswerable_metadata(node, v)
        if new == forced and an.invalidated == last_invalid:
            return an
        forced, last_invalid = new, set(an.invalidated)
    return an


def _unanswerable_metadata(out: fx.Node, v: Affine) -> set[fx.Node]:
    """Absorbed nodes whose shape is read outside the region: after the rewrite the read goes to the
    region's output or root when that has the same shape (rank-only reads: always); otherwise the
    node must stay materialized."""
    inside = v.sources | v.extra
    bad = set()
    for s in inside - {out}:
        for u in s.users:
            if u in inside or not is_metadata_use(u, s):
                continue
            if metadata_stand_in(u, s, out, v.root) is None:
                bad.add(s)
    return bad


def metadata_stand_in(user: fx.Node, node: fx.Node, out: fx.Node, root: fx.Node) -> fx.Node | None:
    """A node with the shape (or, for rank / dtype reads, the rank) ``user`` reads from ``node``."""
    shape = shape_of(node)
    for cand in (out, root):
        if shape is not None and shape_of(cand) == shape:
            return cand
    rank_only = (user.op == "call_function" and user.args[1:2] in (("ndim",), ("dtype",), ("device",))) or (
        user.op == "call_method" and user.target in ("dim", "ndimension"))
    if rank_only and shape is not None and len(shape_of(out) or ()) == len(shape):
        return out
    return None


def region_outputs(an: Analysis) -> list[fx.Node]:
    outs = []
    for node, v in an.values.items():
        if v is None or v.is_identity:
            continue
        absorbers = an.absorbed.get(node, set())
        if any(u not in absorbers and u not in v.extra for u in value_users(node)):
            outs.append(node)
    return outs


def _spatial(node: fx.Node) -> int:
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    if shape is None:
        return 1
    n = 1
    for d in list(shape)[2:] if len(shape) == 4 else list(shape)[:-1]:
        n *= int(d)
    return n


def region_macs(an: Analysis, node: fx.Node) -> int:
    """Multiply-adds of the single module that would replace the region ending at ``node``."""
    k = an.values[node].kernel
    return V.macs(k) * _spatial(node) if k is not None else 0


def original_macs(an: Analysis, sources: frozenset[fx.Node]) -> int:
    """Multiply-adds of the original ops (convs, linears, pools; elementwise ops count 1 per element)."""
    total = 0
    for n in sources:
        shape = getattr(n.meta.get("tensor_meta"), "shape", None)
        numel = 1
        for d in shape or ():
            numel *= int(d)
        batch = int(shape[0]) if shape is not None and len(shape) else 1
        per_item = numel // max(batch, 1)
        if n.op == "call_module":
            m = an.modules[n.target]
            if isinstance(m, nn.Conv2d | nn.Linear):
                total += m.weight.numel() * _spatial(n)
                continue
            if isinstance(m, nn.AvgPool2d):
                kh, kw = A.conv._pair(m.kernel_size)
                total += per_item * kh * kw
                continue
        if n.op == "call_function" and n.target in CONV_FUNCTIONS + LINEAR_FUNCTIONS:
            w = an.consts.get(n.args[1]) if isinstance(n.args[1], fx.Node) else None
            if isinstance(w, torch.Tensor):
                total += w.numel() * _spatial(n)
                continue
        total += per_item
    return total

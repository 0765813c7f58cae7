"""Find maximal linear regions in a traced graph and rewrite each as one conv / linear.

The analysis walks nodes in program order and gives each an :class:`Affine` value (see
affine.py). A value with a non-identity kernel that some user cannot absorb is a region output:
it is replaced by a single module computing ``kernel(root)``. A value absorbed by two users (or
also read directly) would be computed twice, so it is materialized instead and the analysis
re-run ("forced" roots) until stable.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from repconv import algebra as A
from repconv.algebra import ConvKernel, FusionRefused, LinearKernel

from . import affine as V
from .affine import Affine, identity_of


class NotAffine(Exception):
    """The op is not linear in its tensor input: its output is an opaque root."""


aten = torch.ops.aten
# Python-level ops and their aten twins (graphs converted from TorchScript / torch.export use aten)
_ADD = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add.Scalar}
_SUB = {operator.sub, operator.isub, torch.sub, aten.sub.Tensor, aten.sub.Scalar}
_MUL = {operator.mul, operator.imul, torch.mul, aten.mul.Tensor, aten.mul.Scalar}
_DIV = {operator.truediv, operator.itruediv, torch.div, aten.div.Tensor, aten.div.Scalar}
_CAT = {torch.cat, torch.concat, aten.cat.default}
_PASS_FUNCS = {F.dropout, F.dropout2d, F.dropout1d, torch.clone, aten.dropout.default, aten.clone.default}
CONV_FUNCTIONS = {F.conv2d, torch.conv2d, aten.conv2d.default}
LINEAR_FUNCTIONS = {F.linear, aten.linear.default}
_AVG_POOL = {F.avg_pool2d, aten.avg_pool2d.default}
_PASS_METHODS = {"contiguous", "clone"}
_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def _conv_kernel_of(weight: torch.Tensor, bias: torch.Tensor | None, stride: Any, padding: Any, dilation: Any,
                    groups: int, padding_mode: str = "zeros") -> ConvKernel:
    w = _f64(weight)
    if w.dim() != 4:
        raise NotAffine
    b = _f64(bias) if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # 'same': symmetric only for odd effective kernel sizes
            d = A.conv._pair(dilation)
            eff = [d[i] * (w.shape[2 + i] - 1) for i in range(2)]
            if any(e % 2 for e in eff) or A.conv._pair(stride) != (1, 1):
                raise FusionRefused("padding='same' with an even effective kernel pads asymmetrically")
            padding = (eff[0] // 2, eff[1] // 2)
    geom = A.ConvGeometry(A.conv._pair(stride), A.conv._pair(padding), A.conv._pair(dilation), int(groups),
                          padding_mode)
    return ConvKernel(w, b, geom)


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

    # -- value access ------------------------------------------------------------------------
    def _consumable(self, node: fx.Node) -> Affine | None:
        v = self.values.get(node)
        if v is None:
            return None
        if not v.is_identity and node in self.forced:
            return identity_of(node)
        return v

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
                result = self._transfer(node, get)
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

    # -- op dispatch ---------------------------------------------------------------------------
    def _const(self, x: Any) -> Any:
        if not isinstance(x, fx.Node):
            return x
        if x not in self.consts:  # computed from the input (CondConv's per-sample weight): opaque op
            raise NotAffine
        return self.consts[x]

    def _arg(self, node: fx.Node, i: int, name: str, default: Any = None) -> Any:
        if len(node.args) > i:
            return node.args[i]
        return node.kwargs.get(name, default)

    def _static(self, node: fx.Node, i: int, name: str, default: Any = None) -> Any:
        """A geometry argument (kernel size, stride, padding) as a Python value. One computed from
        the input's shape at run time (SE blocks: ``avg_pool2d(x, x.size(3))``) is not a constant
        of the model: the op is then opaque."""
        arg = self._arg(node, i, name, default)
        found: list[fx.Node] = []
        fx.node.map_arg(arg, lambda a: found.append(a) or a)
        if any(a not in self.consts for a in found):
            raise NotAffine
        return fx.node.map_arg(arg, lambda a: self.consts[a])

    def _transfer(self, node: fx.Node, get: Callable[[fx.Node], Affine]) -> Affine | None:
        if node.op == "call_module":
            return self._module(node, self.modules[node.target], get)
        if node.op == "call_method":
            return self._method(node, get)
        if node.op == "call_function":
            return self._function(node, get)
        raise NotAffine

    def _module(self, node: fx.Node, m: nn.Module, get: Callable[[fx.Node], Affine]) -> Affine:
        x = node.args[0] if node.args else None
        if not isinstance(x, fx.Node) or len(node.args) != 1 or node.kwargs:
            raise NotAffine
        if isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward:
            k = ConvKernel.of(m)
            k = ConvKernel(_f64(k.weight), _f64(k.bias), k.geom)
            return V.through_conv(node, get(x), k)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m).forward in _BN_FORWARDS:
            if m.training:
                raise NotAffine
            if m.running_mean is None:
                raise FusionRefused("BatchNorm without running statistics normalizes with batch stats: left as is")
            scale, shift = A.bn_module_scale_shift(m)
            return V.through_channel_affine(node, get(x), scale, shift, axis="dim1")
        if type(m) is nn.Linear:
            return V.through_linear(node, get(x), LinearKernel(_f64(m.weight), _bias(m.bias, m.weight.shape[0])))
        if type(m) is nn.AvgPool2d:
            v = get(x)
            pool = A.avg_pool(v.out_channels, m.kernel_size, m.stride, m.padding, count_include_pad=m.count_include_pad,
                              ceil_mode=m.ceil_mode, divisor_override=m.divisor_override)
            return V.through_conv(node, v, pool)
        if isinstance(m, _PASS_MODULES):
            return V.passthrough(node, get(x))
        if type(m) in (nn.ZeroPad2d, nn.ConstantPad2d) and getattr(m, "value", 0.0) == 0.0:
            return self._zero_pad(node, get(x), m.padding)
        if type(m) is nn.LayerNorm and m.elementwise_affine and m.weight is not None:
            return self._layer_norm_affine(node, m)
        raise NotAffine

    def _layer_norm_affine(self, node: fx.Node, m: nn.LayerNorm) -> Affine:
        """LayerNorm = normalize, then (gamma, beta) on the last dim. The affine part may fold into
        a following Linear; the node itself then runs a LayerNorm without affine."""
        if len(m.normalized_shape) != 1:
            raise NotAffine
        root = identity_of(node)
        if root is None:
            raise NotAffine
        gamma = _f64(m.weight)
        beta = _f64(m.bias) if m.bias is not None else torch.zeros_like(gamma)

        def strip(gm: fx.GraphModule, node: fx.Node = node, m: nn.LayerNorm = m) -> None:
            plain = nn.LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=False)
            name = f"{node.target}_noaffine".replace(".", "_")
            gm.add_submodule(name, plain)
            node.target = name

        v = V.through_channel_affine(node, root, gamma, beta, axis="last")
        return Affine(**{**v.__dict__, "sources": frozenset(), "root_fixes": (strip,),
                         "extra": frozenset({node})})

    def _zero_pad(self, node: fx.Node, v: Affine, pad: Any) -> Affine:
        pad = tuple(pad) if not isinstance(pad, int) else (pad,) * 4
        if len(pad) != 4 or pad[0] != pad[1] or pad[2] != pad[3] or min(pad) < 0:
            raise FusionRefused("asymmetric or non-2-D zero padding")
        return V.through_zero_pad(node, v, (pad[2], pad[0]))

    def _method(self, node: fx.Node, get: Callable[[fx.Node], Affine]) -> Affine:
        name = node.target
        if name in _PASS_METHODS and len(node.args) == 1:
            return V.passthrough(node, get(node.args[0]))
        if name in ("add", "add_", "sub", "sub_") and len(node.args) == 2 and "alpha" not in node.kwargs:
            return self._add(node, [node.args[0], node.args[1]], [1.0, 1.0 if name.startswith("add") else -1.0], get)
        if name in ("mul", "mul_", "div", "div_") and len(node.args) == 2:
            return self._scale(node, node.args[0], node.args[1], name.startswith("div"), get)
        raise NotAffine

    def _function(self, node: fx.Node, get: Callable[[fx.Node], Affine]) -> Affine | None:
        f = node.target
        args = node.args
        if f in _ADD and len(args) == 2 and "alpha" not in node.kwargs:
            return self._add(node, list(args), [1.0, 1.0], get)
        if f in _SUB and len(args) == 2 and "alpha" not in node.kwargs:
            return self._add(node, list(args), [1.0, -1.0], get)
        if f in _MUL and len(args) == 2:
            return self._scale(node, args[0], args[1], False, get)
        if f in _DIV and len(args) == 2 and not node.kwargs:
            return self._scale(node, args[0], args[1], True, get)
        if f in (operator.neg, torch.neg):
            v = get(args[0])
            one = torch.ones(1, dtype=torch.float64)
            return V.through_channel_affine(node, v, -one, 0 * one)
        if f in _CAT:
            tensors = self._arg(node, 0, "tensors")
            dim = self._arg(node, 1, "dim", 0)
            values = [get(t) for t in tensors] if all(isinstance(t, fx.Node) for t in tensors) else None
            if not values:
                raise NotAffine
            return V.through_concat(node, values, dim)
        if f in _PASS_FUNCS:
            training = self._arg(node, 2, "training", True) if f not in (torch.clone, aten.clone.default) else False
            if training:
                raise NotAffine
            return V.passthrough(node, get(args[0]))
        if f in CONV_FUNCTIONS:
            x = args[0]
            w = self._const(self._arg(node, 1, "weight"))
            if not isinstance(x, fx.Node) or not isinstance(w, torch.Tensor):
                raise NotAffine
            k = _conv_kernel_of(w, self._const(self._arg(node, 2, "bias")), self._static(node, 3, "stride", 1),
                                self._static(node, 4, "padding", 0), self._static(node, 5, "dilation", 1),
                                self._static(node, 6, "groups", 1))
            return V.through_conv(node, get(x), k)
        if f in LINEAR_FUNCTIONS:
            w = self._const(self._arg(node, 1, "weight"))
            if not isinstance(w, torch.Tensor):
                raise NotAffine
            b = self._const(self._arg(node, 2, "bias"))
            return V.through_linear(node, get(args[0]), LinearKernel(_f64(w), _bias(b, w.shape[0])))
        if f in (F.batch_norm, aten.batch_norm.default):
            if f is F.batch_norm:  # (x, mean, var, weight, bias, training, momentum, eps)
                rm, rv = self._const(self._arg(node, 1, "running_mean")), self._const(self._arg(node, 2, "running_var"))
                w, b = self._const(self._arg(node, 3, "weight")), self._const(self._arg(node, 4, "bias"))
            else:  # aten: (x, weight, bias, mean, var, training, momentum, eps, cudnn_enabled)
                w, b = self._const(self._arg(node, 1, "weight")), self._const(self._arg(node, 2, "bias"))
                rm, rv = self._const(self._arg(node, 3, "running_mean")), self._const(self._arg(node, 4, "running_var"))
            if self._arg(node, 5, "training", False) or not isinstance(rm, torch.Tensor):
                raise NotAffine
            eps = self._arg(node, 7, "eps", 1e-5)
            scale, shift = A.bn_scale_shift(_f64(rm), _f64(rv), None if w is None else _f64(w),
                                            None if b is None else _f64(b), eps)
            return V.through_channel_affine(node, get(args[0]), scale, shift, axis="dim1")
        if f in _AVG_POOL:
            v = get(args[0])
            k = self._static(node, 1, "kernel_size")
            stride = self._static(node, 2, "stride", None) or k
            pool = A.avg_pool(v.out_channels, k, stride, self._static(node, 3, "padding", 0),
                              ceil_mode=self._static(node, 4, "ceil_mode", False),
                              count_include_pad=self._static(node, 5, "count_include_pad", True),
                              divisor_override=self._static(node, 6, "divisor_override", None))
            return V.through_conv(node, v, pool)
        if f in (F.pad, aten.pad.default, aten.constant_pad_nd.default):
            if f is aten.constant_pad_nd.default:
                mode, value = "constant", self._arg(node, 2, "value", 0)
            else:
                mode, value = self._arg(node, 2, "mode", "constant"), self._arg(node, 3, "value", None)
            if mode != "constant" or value not in (None, 0, 0.0):
                raise NotAffine
            return self._zero_pad(node, get(args[0]), self._static(node, 1, "pad"))
        if f is operator.setitem:
            return self._setitem(node)
        if f is operator.getitem and isinstance(args[0], fx.Node):
            rc = _crop_index(args[1])
            v = get(args[0]) if rc is not None else None
            if v is None or v.rank != 4:
                raise NotAffine
            return V.through_conv(node, v, A.crop(v.out_channels, *rc))
        raise NotAffine

    def _setitem(self, node: fx.Node) -> None:
        target, index, fill = node.args
        v = self.values.get(target)
        side = _border_side(index, v)
        fill_value = self._const(fill) if (not isinstance(fill, fx.Node) or fill in self.consts) else None
        if v is None or side is None or not isinstance(fill_value, torch.Tensor | float | int):
            self._invalidate(target, "slice assignment into the tensor")
            return None
        try:
            self.values[target] = V.fill_border(node, v, side, torch.as_tensor(fill_value))
        except FusionRefused as e:
            self._invalidate(target, str(e))
        return None

    def _invalidate(self, target: fx.Node, reason: str) -> None:
        v = self.values.get(target)
        if v is not None and not v.is_identity:
            self.refusals[target] = reason
            # the mutated tensor can only be read as it is: treat it as a forced root
            self.forced.add(target)
            self.invalidated.add(target)
            self.values[target] = identity_of(target)

    def _add(self, node: fx.Node, operands: list[Any], signs: list[float],
             get: Callable[[fx.Node], Affine]) -> Affine:
        is_tensor = [isinstance(o, fx.Node) and o not in self.consts for o in operands]
        tensors = [(o, s) for o, s, t in zip(operands, signs, is_tensor, strict=True) if t]
        consts = [(self._const(o), s) for o, s, t in zip(operands, signs, is_tensor, strict=True) if not t]
        if not tensors:
            raise NotAffine
        values = [get(o) for o, _ in tensors]
        if len(values) == 2:
            out = V.through_add(node, values, [s for _, s in tensors])
        else:  # tensor +- constant: a shift (and a sign)
            one = torch.ones(1, dtype=torch.float64)
            out = V.through_channel_affine(node, values[0], tensors[0][1] * one, 0 * one)
        for c, s in consts:
            shift, axis = _per_channel(c, out)
            out = V.through_channel_affine(node, out, torch.ones(1, dtype=torch.float64), s * shift, axis)
        return out

    def _scale(self, node: fx.Node, a: Any, b: Any, divide: bool, get: Callable[[fx.Node], Affine]) -> Affine:
        a_t = isinstance(a, fx.Node) and a not in self.consts
        b_t = isinstance(b, fx.Node) and b not in self.consts
        if a_t == b_t or (divide and b_t):
            raise NotAffine  # tensor * tensor is not linear; const / tensor neither
        x, c = (a, self._const(b)) if a_t else (b, self._const(a))
        v = get(x)
        scale, axis = _per_channel(c, v)
        if divide:
            scale = 1.0 / scale
        return V.through_channel_affine(node, v, scale, torch.zeros_like(scale), axis)


def _bias(b: torch.Tensor | None, n: int) -> torch.Tensor:
    return _f64(b) if b is not None else torch.zeros(n, dtype=torch.float64)


def _per_channel(c: Any, v: Affine) -> tuple[torch.Tensor, str]:
    """A scalar or per-channel constant as (vector, axis); anything else is not a channel affine."""
    if isinstance(c, int | float) and not isinstance(c, bool):
        return torch.tensor([float(c)], dtype=torch.float64), "any"
    if not isinstance(c, torch.Tensor) or not c.is_floating_point() and c.dtype not in (torch.int64, torch.int32):
        raise NotAffine
    t = _f64(c)
    if t.numel() == 1:
        return t.reshape(1), "any"
    shape = list(t.shape)
    nontrivial = [i for i, s in enumerate(shape) if s != 1]
    if len(nontrivial) != 1:
        raise NotAffine
    from_end = len(shape) - nontrivial[0]  # 1 = last dim
    if v.rank == 4 and from_end == 3:
        return t.reshape(-1), "dim1"
    if from_end == 1:
        return t.reshape(-1), "last"
    raise NotAffine


def _crop_index(index: Any) -> tuple[int, int] | None:
    """``x[:, :, r:-r, c:-c]`` (either dim may be ``:``) as (r, c); anything else None."""
    if not isinstance(index, tuple) or len(index) != 4 or not all(isinstance(s, slice) for s in index):
        return None
    full = slice(None, None, None)
    if index[0] != full or index[1] != full:
        return None
    rc = []
    for s in index[2:]:
        if s == full:
            rc.append(0)
        elif (s.step in (None, 1) and isinstance(s.start, int) and isinstance(s.stop, int)
              and s.start > 0 and s.stop == -s.start):
            rc.append(s.start)
        else:
            return None
    return (rc[0], rc[1]) if any(rc) else None


def _border_side(index: Any, v: Affine | None) -> str | None:
    """Which padded border ``out[index]`` covers: top/bottom/left/right, or None."""
    if v is None or not v.border_debt or not isinstance(index, tuple) or len(index) != 4:
        return None
    if not all(isinstance(s, slice) and s.step in (None, 1) for s in index):
        return None
    full = slice(None, None, None)
    if index[0] != full or index[1] != full:
        return None
    k = v.kernel
    ph, pw = k.geom.padding if isinstance(k, ConvKernel) else (0, 0)

    def band(s: slice, p: int) -> str | None:
        if s.start in (None, 0) and s.stop == p:
            return "start"
        if s.start == -p and s.stop is None:
            return "end"
        return None

    if index[3] == full and ph:
        b = band(index[2], ph)
        return {"start": "top", "end": "bottom"}.get(b or "")
    if index[2] == full and pw:
        b = band(index[3], pw)
        return {"start": "left", "end": "right"}.get(b or "")
    return None


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
    for _ in range(max_rounds):
        an = Analysis(gm, consts, forced | last_invalid).run()
        new = set(forced) | (an.invalidated & seen_invalid)
        seen_invalid |= an.invalidated
        for node, v in an.values.items():
            if v is None or v.is_identity or node in new:
                continue
            absorbers = an.absorbed.get(node, set())
            direct = [u for u in node.users if u not in absorbers and u not in v.extra]
            if len(absorbers) > 1 or (absorbers and direct):
                new.add(node)
        for node in region_outputs(an):
            v = an.values[node]
            if v.expensive and region_macs(an, node) > original_macs(an, v.sources):
                # cut before each composition / merge that grew the kernel: its inputs become roots
                new |= {a for c in v.expensive for a in _tensor_inputs(c) if a not in an.consts}
        if new == forced and an.invalidated == last_invalid:
            return an
        forced, last_invalid = new, set(an.invalidated)
    return an


def region_outputs(an: Analysis) -> list[fx.Node]:
    outs = []
    for node, v in an.values.items():
        if v is None or v.is_identity:
            continue
        absorbers = an.absorbed.get(node, set())
        if any(u not in absorbers and u not in v.extra for u in node.users):
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
    return int(k.weight.numel()) * _spatial(node) if k is not None else 0


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
        if n.op == "call_function" and n.target in CONV_FUNCTIONS | LINEAR_FUNCTIONS:
            w = an.consts.get(n.args[1]) if isinstance(n.args[1], fx.Node) else None
            if isinstance(w, torch.Tensor):
                total += w.numel() * _spatial(n)
                continue
        total += per_item
    return total

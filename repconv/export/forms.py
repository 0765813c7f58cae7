"""Which form of ``ai.repconv::Involution`` an exported file carries, per deployment target.

* ``onnxruntime``: one custom node per involution plus the model-local function (ORT runs repconv's
  native kernel where it is registered, else inlines the function). Only ONNX Runtime and
  ``onnx.reference`` load it: OpenVINO 2026.4 and tract 0.23 convert no model-local function in a
  custom domain at all.
* ``openvino``, ``tract``, ``generic``: standard ops only, no function, no ``Loop``
  (:func:`expand_involutions`). Every runtime we test loads it. The three names write the same
  form today - the one measured fastest in OpenVINO (benchmarks/export_runtimes.py) - so that a
  runtime-specific form can follow without changing the command line.

The standard-op form ("phase-decomposed taps"), per node with K, stride s, dilation d, groups G:

    Xp  = Pad(X)                                  zero padding d*(K-1)/2 (+ a phase-aligned margin)
    s=1: X5 = Reshape(Xp, (N, G, C/G, Hq, Wq))    one "phase image"
    s>1: the s*s phase images Xp[:, :, a::s, b::s] from one Reshape + Transpose + Split
    Wt  = Split(Reshape(W, (N, G, K*K, Ho, Wo)), axis 2)         the K*K kernel planes
    Y   = Reshape(sum_t Slice(phase_t, unit stride) * Wt_t, (N, C, Ho, Wo))

Every tap is then a *unit-stride* window of one phase image. Measured in OpenVINO 2026.4 (CPU,
f32, 1 thread) on RedNet-26 at 224x224, as a multiple of ORT with repconv's native kernel: the
per-tap strided ``Slice`` form 1.73-1.87x (OpenVINO's strided Slice is a slow reference kernel:
0.33 ms per tap at 28x28x128, 2/3 of the whole involution time), this form 1.30-1.33x. Also
measured and dropped (docs/involution_op.md has the table): ``Sum`` instead of an ``Add`` chain,
contiguous 1-D windows of flattened planes, an im2col ``Conv`` with one-hot kernels + ``ReduceSum``
(5.0x), and a separable variant (1.22-1.28x in OpenVINO, but slower in tract and on CoTNet-26, and
twice the code).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, helper, numpy_helper

from repconv.export import involution_onnx as inv_onnx

__all__ = ["TARGETS", "DEFAULT_TARGET", "STANDARD_TARGETS", "apply_target", "expand_involutions", "FormError"]

TARGETS = ("generic", "onnxruntime", "openvino", "tract")
DEFAULT_TARGET = "generic"
STANDARD_TARGETS = frozenset({"generic", "openvino", "tract"})


class FormError(ValueError):
    """The Involution nodes cannot be written in the form the target needs (one line)."""


def apply_target(model: ModelProto, target: str, opset: int) -> ModelProto:
    """``model`` (carrying custom Involution nodes) in the form ``target`` needs, in place.

    onnxruntime: the nodes stay and the model-local function is attached. Standard targets: every
    node is replaced by standard ops (and the function and the domain import are dropped).
    """
    if target not in TARGETS:
        raise FormError(f"unknown target {target!r} (one of {', '.join(TARGETS)})")
    if not _involution_nodes(model):
        return model
    if target in STANDARD_TARGETS:
        return expand_involutions(model)
    inv_onnx.ensure_involution_function(model)
    for f in model.functions:  # the function's default opset must equal the model's
        if f.domain == inv_onnx.DOMAIN and f.name == inv_onnx.OP_TYPE:
            for imp in f.opset_import:
                if imp.domain in ("", "ai.onnx"):
                    imp.version = opset
    return model


def _involution_nodes(model: ModelProto) -> list[NodeProto]:
    return [n for n in model.graph.node if n.domain == inv_onnx.DOMAIN and n.op_type == inv_onnx.OP_TYPE]


def _static_shapes(model: ModelProto) -> dict[str, list[int | None]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    out: dict[str, list[int | None]] = {}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in g.initializer:
        out[init.name] = list(init.dims)
    return out


class _Emitter:
    """Collects nodes and int64 initializers for one Involution node under a unique prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def name(self, tag: str) -> str:
        return f"{self.prefix}{tag}"

    def ints(self, tag: str, *values: int) -> str:
        name = self.name(tag)
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: list[str] | str, **attrs: object) -> str:
        outs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=outs[0], **attrs))
        return outs[0]


def _node_attrs(node: NodeProto) -> tuple[int, int, int, int]:
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    k = int(a["kernel_size"])
    s, d, g = (int(a.get(n, 1)) for n in ("stride", "dilation", "groups"))
    if k < 1 or k % 2 == 0 or s < 1 or d < 1 or g < 1:
        raise FormError(f"Involution node {node.name!r}: bad attributes kernel_size={k} stride={s} "
                        f"dilation={d} groups={g}")
    if "padding" in a and int(a["padding"]) != d * (k - 1) // 2:
        raise FormError(f"Involution node {node.name!r}: padding {a['padding']} != dilation*(K-1)/2")
    return k, s, d, g


def _expand_one(node: NodeProto, shape: list[int | None], prefix: str, phases: bool) -> _Emitter:
    k, s, d, g = _node_attrs(node)
    if len(shape) != 4 or any(v is None for v in shape[1:]):
        raise FormError(f"Involution node {node.name!r}: the standard-op form needs static channels, height and "
                        f"width (input shape {shape}); export with --target onnxruntime instead")
    _, c, h, w = (int(v) if v is not None else -1 for v in shape)
    if c % g:
        raise FormError(f"Involution node {node.name!r}: channels {c} not divisible by groups {g}")
    cg, kk, p = c // g, k * k, d * (k - 1) // 2
    ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
    e = _Emitter(prefix)
    x, kernel = node.input
    strided = s > 1 and not phases
    if s == 1 or strided:
        # one padded image; taps are windows of it (strided when s > 1: the slow form, for comparison)
        hp, wp = h + 2 * p, w + 2 * p
        xp = e.op("Pad", [x, e.ints("pads", 0, 0, p, p, 0, 0, p, p)], e.name("xp"))
        sources = [e.op("Reshape", [xp, e.ints("x5_shape", 0, g, cg, hp, wp)], e.name("x5"))]
    else:
        # s*s phase images of hq x wq: phase (a, b) = Xp[:, :, a::s, b::s], every tap a unit-stride
        # window of one of them; the padded extent s*hq never crops X
        reach = (k - 1) * d // s  # largest tap offset inside a phase image
        hq = max(ho + reach, -(-(h + p) // s))
        wq = max(wo + reach, -(-(w + p) // s))
        xp = e.op("Pad", [x, e.ints("pads", 0, 0, p, p, 0, 0, s * hq - h - p, s * wq - w - p)], e.name("xp"))
        # (N, C, hq, s, wq, s) -> (N, s, s, C, hq, wq) -> s*s chunks of G groups along axis 1
        x6 = e.op("Reshape", [xp, e.ints("x6_shape", 0, c, hq, s, wq, s)], e.name("x6"))
        xt = e.op("Transpose", [x6], e.name("xt"), perm=[0, 3, 5, 1, 2, 4])
        xg = e.op("Reshape", [xt, e.ints("xg_shape", 0, s * s * g, cg, hq, wq)], e.name("xg"))
        sources = [e.name(f"phase{q}") for q in range(s * s)]
        e.op("Split", [xg, e.ints("phase_split", *([g] * (s * s)))], sources, axis=1)
    w5 = e.op("Reshape", [kernel, e.ints("w5_shape", 0, g, kk, ho, wo)], e.name("w5"))
    if kk == 1:
        taps = [w5]
    else:
        taps = [e.name(f"tap{t}") for t in range(kk)]
        e.op("Split", [w5, e.ints("tap_split", *([1] * kk))], taps, axis=2)
    axes = e.ints("axes", 3, 4)
    steps = [e.ints("steps", s, s)] if strided else []
    acc = None
    for t in range(kk):
        ky, kx = divmod(t, k)
        oy, ox = ky * d, kx * d
        if strided:
            src, y0, x0, span_y, span_x = sources[0], oy, ox, (ho - 1) * s + 1, (wo - 1) * s + 1
        else:
            src, y0, x0, span_y, span_x = sources[(oy % s) * s + ox % s], oy // s, ox // s, ho, wo
        window = e.op("Slice", [src, e.ints(f"start{t}", y0, x0), e.ints(f"end{t}", y0 + span_y, x0 + span_x), axes,
                                *steps], e.name(f"window{t}"))
        prod = e.op("Mul", [window, taps[t]], e.name(f"prod{t}"))
        acc = prod if acc is None else e.op("Add", [acc, prod], e.name(f"acc{t}"))
    assert acc is not None
    e.op("Reshape", [acc, e.ints("y_shape", 0, c, ho, wo)], list(node.output))
    return e


def _unique_prefixes(model: ModelProto, nodes: list[NodeProto]) -> Iterator[str]:
    used = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.initializer}
    used |= {i.name for i in model.graph.input}
    for i, _ in enumerate(nodes):
        base = f"involution{i}/"
        while any(u.startswith(base) for u in used):
            base = f"_{base}"
        yield base


def expand_involutions(model: ModelProto, *, phases: bool = True) -> ModelProto:
    """Replace every ``ai.repconv::Involution`` node by standard ops (in place; returns ``model``).

    Needs static C, H, W at each node (the batch may be symbolic) and default-domain opset >= 13.
    Drops the function and the ``ai.repconv`` import. Raises :class:`FormError`. ``phases=False``
    writes strided taps for stride > 1 instead of phase images: the slower form, kept so the
    benchmark can show the difference (benchmarks/export_runtimes.py).
    """
    nodes = _involution_nodes(model)
    if not nodes:
        return model
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < inv_onnx.MIN_OPSET:
        raise FormError(f"the standard-op Involution form needs opset >= {inv_onnx.MIN_OPSET}, got {opset}")
    shapes = _static_shapes(model)
    expanded: dict[int, _Emitter] = {}
    for node, prefix in zip(nodes, _unique_prefixes(model, nodes), strict=True):
        expanded[id(node)] = _expand_one(node, shapes.get(node.input[0], []), prefix, phases)
    new_nodes: list[NodeProto] = []
    for n in model.graph.node:
        em = expanded.get(id(n))
        if em is None:
            new_nodes.append(n)
        else:
            new_nodes.extend(em.nodes)
            model.graph.initializer.extend(em.inits)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    keep_fns = [f for f in model.functions if f.domain != inv_onnx.DOMAIN]
    del model.functions[:]
    model.functions.extend(keep_fns)
    keep = [o for o in model.opset_import if o.domain != inv_onnx.DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model

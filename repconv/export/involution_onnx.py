"""The ``ai.repconv::Involution`` ONNX operator: node helpers and a model-local FunctionProto.

Schema: docs/involution_op.md. Every exported model carries :func:`involution_function` in
``ModelProto.functions`` so any ONNX runtime can execute the node with standard ops; ONNX Runtime
with repconv's native library registered (``repconv.runtime.session_options()``) runs the native
kernel instead, because a registered kernel takes precedence over a model-local function.

Design of the function body (one generic function for every attribute set):

* the attributes are read through attribute references (``Constant`` with ``ref_attr_name``), so
  one FunctionProto serves all nodes, whatever their kernel_size / stride / dilation / groups;
* the K*K taps are a ``Loop`` (trip count K*K - 1 and an explicit ``cond`` input; tap 0 initialises
  the accumulator, which also keeps the body dtype-generic): per tap a strided ``Slice`` of the padded input viewed as
  (N, G, C/G, Hp, Wp), a ``Slice`` of the kernel viewed as (N, G, K*K, Ho, Wo), ``Mul`` (broadcast
  over the channels of a group) and ``Add`` into the accumulator. No K*K-sized unfold buffer.
  Measured in ORT 1.32 this is as fast as a fully unrolled per-attribute-set function (the loop
  overhead is ~K*K small-op dispatches), so specialised functions/overloads are not needed.

Opsets 13 and newer are supported (``Unsqueeze``/``Slice`` take axes as inputs from 13 on). ORT 1.32
does not load the newest IR version onnx 1.23 writes; models should use :data:`IR_VERSION` (10).
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx import AttributeProto, FunctionProto, ModelProto, NodeProto, TensorProto, helper

__all__ = [
    "DOMAIN",
    "OP_TYPE",
    "DOMAIN_VERSION",
    "IR_VERSION",
    "ATTRIBUTES",
    "MIN_OPSET",
    "involution_function",
    "make_involution_node",
    "involution_model",
    "ensure_involution_function",
]

DOMAIN = "ai.repconv"
OP_TYPE = "Involution"
DOMAIN_VERSION = 1
IR_VERSION = 10  # ORT 1.32 rejects IR 11+ models that onnx>=1.18 writes by default
ATTRIBUTES = ("kernel_size", "stride", "dilation", "groups", "padding")
MIN_OPSET = 13
_INT64_MAX = 2**63 - 1


def _ints(name: str, values: Sequence[int]) -> NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=helper.make_tensor(f"{name}_value", TensorProto.INT64, [len(values)], values)
    )


def _attr_scalar(name: str, attr: str) -> NodeProto:
    """``Constant`` whose int64 scalar value is the calling node's attribute ``attr``."""
    node = helper.make_node("Constant", [], [name])
    ref = AttributeProto()
    ref.name = "value_int"
    ref.type = AttributeProto.INT
    ref.ref_attr_name = attr
    node.attribute.append(ref)
    return node


def _tap_body() -> onnx.GraphProto:
    """Loop body: acc += Slice(X5, tap t) * Slice(W5, tap t), with t = iteration + 1."""
    nodes = [
        helper.make_node("Add", ["it", "one_s"], ["t"]),
        helper.make_node("Div", ["t", "k_s"], ["ky"]),
        helper.make_node("Mod", ["t", "k_s"], ["kx"]),
        helper.make_node("Mul", ["ky", "d_s"], ["y0"]),
        helper.make_node("Mul", ["kx", "d_s"], ["x0"]),
        helper.make_node("Unsqueeze", ["y0", "ax0"], ["y0_1"]),
        helper.make_node("Unsqueeze", ["x0", "ax0"], ["x0_1"]),
        helper.make_node("Concat", ["y0_1", "x0_1"], ["xb"], axis=0),
        helper.make_node("Add", ["xb", "span"], ["xe"]),
        helper.make_node("Slice", ["X5", "xb", "xe", "ax34", "steps"], ["x_tap"]),
        helper.make_node("Unsqueeze", ["t", "ax0"], ["t_1"]),
        helper.make_node("Add", ["t_1", "one"], ["t_2"]),
        helper.make_node("Slice", ["W5", "t_1", "t_2", "ax2"], ["w_tap"]),
        helper.make_node("Mul", ["x_tap", "w_tap"], ["prod"]),
        helper.make_node("Add", ["acc_in", "prod"], ["acc_out"]),
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
    ]
    return helper.make_graph(
        nodes,
        "involution_tap",
        [
            helper.make_tensor_value_info("it", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            onnx.ValueInfoProto(name="acc_in")  # untyped: dtype comes from the caller,
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            onnx.ValueInfoProto(name="acc_out"),
        ],
    )


def involution_function(opset: int) -> FunctionProto:
    """The model-local function ``ai.repconv::Involution`` for a model whose default opset is ``opset``.

    The function's default-domain import must equal the model's, hence the parameter. Inputs ``X``
    (N, C, H, W) and ``W`` (N, G*K*K, Ho, Wo); output ``Y`` (N, C, Ho, Wo); int attributes
    kernel_size, stride, dilation, groups, padding (see docs/involution_op.md).
    """
    if opset < MIN_OPSET:
        raise ValueError(f"Involution function needs default-domain opset >= {MIN_OPSET}, got {opset}")
    n: list[NodeProto] = [
        _attr_scalar("k_s", "kernel_size"),
        _attr_scalar("s_s", "stride"),
        _attr_scalar("d_s", "dilation"),
        _attr_scalar("g_s", "groups"),
        _attr_scalar("p_s", "padding"),
        _ints("ax0", [0]),
        _ints("ax2", [2]),
        _ints("ax34", [3, 4]),
        _ints("zero", [0]),
        _ints("one", [1]),
        _ints("minus1", [-1]),
        _ints("zz", [0, 0]),
        _ints("big", [_INT64_MAX]),
        helper.make_node("Constant", [], ["one_s"], value=helper.make_tensor("one_s_v", TensorProto.INT64, [], [1])),
        # Pad H and W by `padding` on both sides (zeros).
        helper.make_node("Unsqueeze", ["p_s", "ax0"], ["p_1"]),
        helper.make_node("Concat", ["zz", "p_1", "p_1", "zz", "p_1", "p_1"], ["pads"], axis=0),
        helper.make_node("Pad", ["X", "pads"], ["Xp"]),
        # Views: X5 = (N, G, C/G, Hp, Wp), W5 = (N, G, K*K, Ho, Wo).
        helper.make_node("Unsqueeze", ["g_s", "ax0"], ["g_1"]),
        helper.make_node("Shape", ["Xp"], ["xp_shape"]),
        helper.make_node("Slice", ["xp_shape", "ax2", "big"], ["xp_hw"]),
        helper.make_node("Concat", ["zero", "g_1", "minus1", "xp_hw"], ["x5_shape"], axis=0),
        helper.make_node("Reshape", ["Xp", "x5_shape"], ["X5"]),
        # Output extent from X (not from W), and W reshaped with explicit sizes: a kernel whose shape
        # disagrees with X fails in Reshape instead of silently producing a cropped output.
        helper.make_node("Mul", ["d_s", "k_s"], ["dk"]),
        helper.make_node("Sub", ["dk", "d_s"], ["span_in_m1"]),  # d*(K-1)
        helper.make_node("Sub", ["xp_hw", "span_in_m1"], ["hw_a"]),
        helper.make_node("Sub", ["hw_a", "one"], ["hw_b"]),
        helper.make_node("Div", ["hw_b", "s_s"], ["hw_c"]),
        helper.make_node("Add", ["hw_c", "one"], ["out_hw"]),  # (Hp - d*(K-1) - 1) // s + 1
        helper.make_node("Mul", ["k_s", "k_s"], ["kk"]),
        helper.make_node("Unsqueeze", ["kk", "ax0"], ["kk_1"]),
        helper.make_node("Concat", ["zero", "g_1", "kk_1", "out_hw"], ["w5_shape"], axis=0),
        helper.make_node("Reshape", ["W", "w5_shape"], ["W5"]),
        # Per-tap slice geometry: steps = [s, s]; extent = (Ho-1)*s + 1.
        helper.make_node("Unsqueeze", ["s_s", "ax0"], ["s_1"]),
        helper.make_node("Concat", ["s_1", "s_1"], ["steps"], axis=0),
        helper.make_node("Sub", ["out_hw", "one"], ["hw_m1"]),
        helper.make_node("Mul", ["hw_m1", "steps"], ["hw_m1_s"]),
        helper.make_node("Add", ["hw_m1_s", "one"], ["span"]),
        # Tap 0 (ky = kx = 0) initialises the accumulator.
        helper.make_node("Slice", ["X5", "zz", "span", "ax34", "steps"], ["x_tap0"]),
        helper.make_node("Slice", ["W5", "zero", "one", "ax2"], ["w_tap0"]),
        helper.make_node("Mul", ["x_tap0", "w_tap0"], ["acc0"]),
        helper.make_node("Sub", ["kk", "one_s"], ["trips"]),
        # An explicit `cond`: the spec lets it be omitted, but onnx.reference's Loop then returns wrong
        # outputs without an error (onnx 1.23).
        helper.make_node("Constant", [], ["keep_going"],
                         value=helper.make_tensor("keep_going_v", TensorProto.BOOL, [], [True])),
        helper.make_node("Loop", ["trips", "keep_going", "acc0"], ["acc"], body=_tap_body()),
        # Back to (N, C, Ho, Wo).
        helper.make_node("Shape", ["X"], ["x_shape"]),
        helper.make_node("Slice", ["x_shape", "zero", "ax2"], ["nc"]),
        helper.make_node("Concat", ["nc", "out_hw"], ["y_shape"], axis=0),
        helper.make_node("Reshape", ["acc", "y_shape"], ["Y"]),
    ]
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        inputs=["X", "W"],
        outputs=["Y"],
        nodes=n,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=list(ATTRIBUTES),
        doc_string="Involution aggregation (repconv); see docs/involution_op.md",
    )


def make_involution_node(
    x: str,
    kernel: str,
    output: str,
    kernel_size: int,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    name: str | None = None,
) -> NodeProto:
    """One ``ai.repconv::Involution`` node with all five attributes set (padding derived)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"Involution kernel_size must be odd, got {kernel_size}")
    return helper.make_node(
        OP_TYPE,
        [x, kernel],
        [output],
        name=name,
        domain=DOMAIN,
        kernel_size=kernel_size,
        stride=stride,
        dilation=dilation,
        groups=groups,
        padding=dilation * (kernel_size - 1) // 2,
    )


def ensure_involution_function(model: ModelProto) -> ModelProto:
    """Add the function and the ``ai.repconv`` opset import to ``model`` if missing (in place)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ValueError("model has no default-domain opset import")
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    if not any(f.domain == DOMAIN and f.name == OP_TYPE for f in model.functions):
        model.functions.append(involution_function(opset))
    return model


def involution_model(
    channels: int,
    kernel_size: int,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    height: int | str = "H",
    width: int | str = "W",
    *,
    batch: int | str = "N",
    opset: int = 17,
    with_function: bool = True,
) -> ModelProto:
    """A one-node model ``y = Involution(x, kernel)`` (tests, benchmarks, runtime smoke checks).

    String sizes become symbolic dims; the kernel's spatial dims are then symbolic too.
    """
    kk = groups * kernel_size * kernel_size
    if isinstance(height, int) and isinstance(width, int):
        ho: int | str = (height - 1) // stride + 1
        wo: int | str = (width - 1) // stride + 1
    else:
        ho, wo = "Ho", "Wo"
    node = make_involution_node("x", "kernel", "y", kernel_size, stride, dilation, groups, name="involution")
    graph = helper.make_graph(
        [node],
        "involution",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, height, width]),
            helper.make_tensor_value_info("kernel", TensorProto.FLOAT, [batch, kk, ho, wo]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, channels, ho, wo])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        functions=[involution_function(opset)] if with_function else [],
        ir_version=IR_VERSION,
        producer_name="repconv",
    )
    return model

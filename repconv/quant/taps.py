"""Intermediate outputs of a model, keyed so that two models can be lined up layer by layer.

ONNX: a copy of the model lists the wanted intermediate tensors as extra graph outputs, custom-op
outputs included (``ai.repconv::Involution``). How the exporter names things (TorchScript exporter,
checked on repconv's models): node names carry only the scope of the last module call
(``/reparam/Conv`` for ``stage1.0.reparam``), so they do not identify the module; the parameters keep
their full module path (``stage1.0.reparam.weight``), through onnxsim and through ORT's quantizer
(``stage1.0.reparam.weight_quantized`` behind a DequantizeLinear). So an ONNX node that reads a
weight is matched to the module of that name; custom ops are matched by their order of execution
(the k-th ``Involution`` node is the k-th call of ``torch.ops.repconv.involution``); ONNX against ONNX
matches tensor names, which the quantizer keeps.

PyTorch: forward hooks on every named module (first call per forward) and a dispatch mode that
records the outputs of repconv's custom ops.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from repconv.util import tensor_leaves

from .ort_quant import QDQ_OPS, STANDARD_DOMAINS, check_loads, custom_nodes, input_info, session

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
SKIP_OPS = (*QDQ_OPS, "Constant", "Shape", "Size", "ConstantOfShape", "Identity")
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CUSTOM_OPS = {"repconv::involution": "Involution"}  # torch op -> ONNX op type


@dataclass
class Layer:
    """One tensor a model exposes: ``key`` matches the other model's, ``label`` is shown to the user."""

    key: str
    label: str
    op: str
    tensor: str  # ONNX tensor name, or the module path


def custom_key(op_type: str, index: int) -> str:
    return f"{op_type}#{index}"


# --------------------------------------------------------------------------- ONNX

class OnnxLayers:
    """An ONNX model's layers and a way to run it with chosen intermediate tensors as outputs."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.input_name, self.batch, self.input_shape = input_info(model)
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # custom domains the checker cannot type: use what the file carries
            inferred = model
        g = inferred.graph
        self.types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.output, *g.input]}
        self.producers = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.initializers = {t.name for t in model.graph.initializer}
        self.outputs = [o.name for o in model.graph.output]

    # which tensors are layers

    def tensor_layers(self) -> list[Layer]:
        """Every float node output in graph order (not Q/DQ, constants or shape arithmetic), keyed by name."""
        layers = []
        for n in self.model.graph.node:
            if n.op_type in SKIP_OPS or not n.output or not n.output[0]:
                continue
            out = n.output[0]
            elem = self.types.get(out, 0)
            if elem in FLOAT_TYPES or (elem == 0 and n.domain not in STANDARD_DOMAINS):
                layers.append(Layer(out, self._label(n), self._op(n), out))
        return layers

    def module_layers(self) -> list[Layer]:
        """Nodes that read a module's weight, keyed by that module's path; custom ops keyed by order."""
        layers = []
        seen: Counter[str] = Counter()
        for n in self.model.graph.node:
            if n.domain not in STANDARD_DOMAINS:
                key = custom_key(n.op_type, seen[n.op_type])
                seen[n.op_type] += 1
                layers.append(Layer(key, f"{key} ({n.name or n.op_type})", self._op(n), n.output[0]))
                continue
            module = self.module_of(n) if n.op_type in WEIGHT_OPS else None
            if module and n.output:
                layers.append(Layer(module, f"{module} ({n.name or n.op_type})", n.op_type, n.output[0]))
        return layers

    def module_of(self, node: onnx.NodeProto) -> str | None:
        """The module path behind a node's weight initializer (``X.weight``, or ``X.weight_quantized`` behind a DQ)."""
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            return None
        name = node.input[1]
        dq = self.producers.get(name)
        if dq is not None and dq.op_type == "DequantizeLinear":
            name = dq.input[0]
        if name not in self.initializers:
            return None
        for suffix in ("_quantized", ""):
            if name.endswith(".weight" + suffix):
                return name[: -len(".weight" + suffix)]
        return None

    def _label(self, n: onnx.NodeProto) -> str:
        """'module (node)' for a node reading a weight; 'node (after module)' for what directly follows one."""
        name = n.name or n.output[0]
        module = self.module_of(n)
        if module:
            return f"{module} ({name})"
        before = self.producers.get(n.input[0]) if n.input else None
        before_module = self.module_of(before) if before is not None else None
        return f"{name} (after {before_module})" if before_module else name

    def resolve(self, tensor: str) -> str | None:
        """Where this model holds what another model calls ``tensor``: the DequantizeLinear output of a
        quantized tensor (what the next layer reads), else the tensor itself, else None."""
        for q in self.consumers.get(tensor, []):
            if q.op_type == "QuantizeLinear":
                for dq in self.consumers.get(q.output[0], []):
                    if dq.op_type == "DequantizeLinear":
                        return dq.output[0]
        return tensor if tensor in self.producers else None

    def _op(self, n: onnx.NodeProto) -> str:
        return f"{n.domain}::{n.op_type}" if n.domain not in STANDARD_DOMAINS else n.op_type

    # running

    def runner(self, tensors: Sequence[str]) -> OnnxRunner:
        return OnnxRunner(self, tensors)


class OnnxRunner:
    """A session over a copy of the model whose extra outputs are ``tensors``."""

    def __init__(self, layers: OnnxLayers, tensors: Sequence[str]) -> None:
        model = onnx.ModelProto()
        model.CopyFrom(layers.model)
        existing = set(layers.outputs)
        self.extra = [t for t in dict.fromkeys(tensors) if t not in existing]
        for t in self.extra:
            model.graph.output.append(onnx.helper.make_tensor_value_info(
                t, layers.types.get(t) or onnx.TensorProto.FLOAT, None))
        if custom_nodes(model) and any(n.op_type in QDQ_OPS for n in model.graph.node):
            check_loads(model)  # a QDQ model around custom ops can abort ORT (see ort_quant)
        self.session = session(model, native=True)
        self.input_name = layers.input_name
        self.n_outputs = len(layers.outputs)
        self.names = [o.name for o in model.graph.output]

    def __call__(self, batch: np.ndarray) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        outs = self.session.run(None, {self.input_name: batch})
        named = dict(zip(self.names, outs, strict=True))
        return [np.asarray(o) for o in outs[: self.n_outputs]], named


def plain_outputs(model: onnx.ModelProto, batches: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
    """The model's outputs in an unmodified session (intermediate outputs can change ORT's kernels)."""
    sess = session(model, native=True)
    name = input_info(model)[0]
    return [[np.asarray(o) for o in sess.run(None, {name: b})] for b in batches]


# --------------------------------------------------------------------------- PyTorch

class _CustomOpRecorder(TorchDispatchMode):
    def __init__(self, sink: dict[str, Tensor], order: list[str]) -> None:
        super().__init__()
        self.sink, self.order = sink, order
        self.count: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        op = CUSTOM_OPS.get(func._schema.name)
        if op is not None and isinstance(out, Tensor):
            key = custom_key(op, self.count[op])
            self.count[op] += 1
            self.sink[key] = out.detach().clone()
            self.order.append(key)
        return out


class TorchLayers:
    """A PyTorch model run with every named module's (first) output and custom-op outputs recorded."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.kinds = {name: type(m).__name__ for name, m in model.named_modules() if name}

    @contextlib.contextmanager
    def _recording(self, keep: set[str] | None, values: bool = True
                   ) -> Iterator[tuple[dict[str, Tensor], list[str]]]:
        """Record module outputs (or, with ``values=False``, empty tensors of their shapes: a probe of a
        large model must not hold every activation at once)."""
        sink: dict[str, Tensor] = {}
        order: list[str] = []
        hooks = []
        for name, m in self.model.named_modules():
            if not name or (keep is not None and name not in keep):
                continue

            def hook(_m: nn.Module, _args: Any, out: Any, name: str = name) -> None:
                leaves = tensor_leaves(out)
                if name not in sink and leaves:
                    t = leaves[0].detach()
                    sink[name] = t.clone() if values else torch.empty(t.shape, device="meta")
                    order.append(name)
            hooks.append(m.register_forward_hook(hook))
        record_custom = keep is None or any("#" in k for k in keep)
        try:
            with _CustomOpRecorder(sink, order) if record_custom else contextlib.nullcontext():
                yield sink, order
        finally:
            for h in hooks:
                h.remove()

    def __call__(self, batch: np.ndarray, keep: set[str] | None = None
                 ) -> tuple[list[np.ndarray], dict[str, np.ndarray], list[str]]:
        """(outputs, recorded tensors, their keys in execution order)."""
        with self._recording(keep) as (sink, order), torch.no_grad():
            out = self.model(torch.from_numpy(np.ascontiguousarray(batch)))
        outs = [t.detach().float().numpy() if t.is_floating_point() else t.numpy() for t in tensor_leaves(out)]
        return outs, {k: v.float().numpy() for k, v in sink.items()}, order

    def shapes(self, batch: np.ndarray) -> tuple[dict[str, tuple[int, ...]], list[str]]:
        """Output shape of every module (and custom op) that runs, in execution order."""
        with self._recording(None, values=False) as (sink, order), torch.no_grad():
            self.model(torch.from_numpy(np.ascontiguousarray(batch)))
        return {k: tuple(v.shape) for k, v in sink.items()}, order

    def label(self, key: str) -> str:
        kind = self.kinds.get(key)
        return f"{key} ({kind})" if kind else key

"""Spelling differences between the two exporters, removed after simplification (each rewrite is an identity).

The dynamo and TorchScript exporters write the same computation with small differences that no
runtime cares about but that make two files of one model look different:

* ``Constant`` nodes (TorchScript) where the other writes initializers;
* ``Reshape(allowzero=1)`` (dynamo) where the shape holds no 0, so allowzero changes nothing;
* a ``Reshape`` target with ``-1`` (TorchScript) where the input shape is static, so the -1 has
  one value, which the other writes out;
* a ``Conv`` bias that is all zeros (TorchScript keeps it, dynamo's optimizer drops it);
* trailing empty optional inputs (``Pad(x, pads, "")``).

After :func:`normalize` the files of repconv's operator families are node-for-node identical
(tests/test_export_exporters.py), except where the exporters decompose an op differently.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import ModelProto, numpy_helper

__all__ = ["normalize"]


def _static_shapes(model: ModelProto) -> dict[str, list[int]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return {}
    out: dict[str, list[int]] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            out[vi.name] = [d.dim_value for d in t.shape.dim]
    return out


def normalize(model: ModelProto) -> ModelProto:
    """Apply the rewrites above to the main graph, in place; returns ``model``."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    outputs = {o.name for o in g.output}
    keep = []
    for node in g.node:
        if (node.op_type == "Constant" and not node.domain and len(node.attribute) == 1
                and node.attribute[0].name == "value" and node.output[0] not in outputs):
            tensor = numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t), node.output[0])
            g.initializer.append(tensor)
            inits[tensor.name] = tensor
            continue
        while node.input and node.input[-1] == "":
            del node.input[-1]
        keep.append(node)
    del g.node[:]
    g.node.extend(keep)

    shapes = _static_shapes(model)
    uses: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for node in g.node:
        if node.domain:
            continue
        if node.op_type == "Reshape" and len(node.input) == 2 and node.input[1] in inits:
            target = numpy_helper.to_array(inits[node.input[1]])
            src = shapes.get(node.input[0])
            if (target == -1).sum() == 1 and not (target == 0).any() and src is not None and uses[node.input[1]] == 1:
                known = math.prod(int(v) for v in target if v != -1)
                if known and math.prod(src) % known == 0:
                    resolved = np.where(target == -1, math.prod(src) // known, target).astype(target.dtype)
                    inits[node.input[1]].CopyFrom(numpy_helper.from_array(resolved, node.input[1]))
                    target = resolved
            if not (target == 0).any():
                kept = [a for a in node.attribute if a.name != "allowzero"]
                del node.attribute[:]
                node.attribute.extend(kept)
        elif node.op_type == "Conv" and len(node.input) == 3 and node.input[2] in inits:
            if not numpy_helper.to_array(inits[node.input[2]]).any():
                del node.input[2]
    used = {name for node in g.node for name in node.input} | outputs
    kept_inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    return model

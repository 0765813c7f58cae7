"""Layer-wise INT8 sensitivity: quantize one layer at a time and measure the model's output drift.

Each weight layer (Conv / Gemm / MatMul) is quantized alone with ONNX Runtime's own
``nodes_to_quantize`` (its input, weights and output get QDQ; everything else stays fp32), on one
shared calibration (ORT's calibration cache), and the output is compared with the fp32 model on the
evaluation batches. A Relu / Clip that alone reads the layer's output is quantized with it: in the
full INT8 model ORT folds it into the output's QuantizeLinear, so the layer's output is rounded on
its post-activation range, and without it ORT would round the wider pre-activation range instead.
The layer whose lone quantization costs the most SQNR is the one INT8 hurts most: an answer from
calibration data in one pass per layer, not a validation run per configuration.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .metrics import Drift, drift
from .ort_quant import check_loads, custom_nodes, input_info, quantize_onnx, run_batches, session
from .taps import WEIGHT_OPS, OnnxLayers


@dataclass
class LayerSensitivity:
    node: str
    module: str | None  # the module path its weight carries
    op: str
    drift: Drift

    @property
    def label(self) -> str:
        return f"{self.module} ({self.node})" if self.module else self.node

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "module": self.module, "op": self.op, **self.drift.to_dict()}


@dataclass
class SensitivityReport:
    layers: list[LayerSensitivity]  # most sensitive (lowest SQNR) first
    method: str
    calib_samples: int
    eval_samples: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "calib_samples": self.calib_samples, "eval_samples": self.eval_samples,
                "notes": self.notes, "layers": [lay.to_dict() for lay in self.layers]}


def sensitivity(fp32: onnx.ModelProto, calib: Sequence[np.ndarray], evaluate: Sequence[np.ndarray], *,
                method: str = "minmax", reduce_range: bool | None = None,
                nodes: Sequence[str] | None = None) -> SensitivityReport:
    """Per-layer sensitivity of ``fp32`` (batches of the model's batch size for calibration and evaluation)."""
    layers = OnnxLayers(fp32)
    targets = [n for n in fp32.graph.node if n.op_type in WEIGHT_OPS and (nodes is None or n.name in nodes)]
    name = input_info(fp32)[0]
    reference = run_batches(session(fp32, native=True), name, evaluate)
    notes: list[str] = []
    results = []
    with tempfile.TemporaryDirectory(prefix="repconv-sens-") as tmp:
        cache = Path(tmp) / "calibration.json"
        for node in targets:
            quantized = quantize_onnx(fp32, calib, method=method, reduce_range=reduce_range,
                                      nodes_to_quantize=[node.name, *_activation_after(layers, node)], cache=cache,
                                      notes=notes)
            if custom_nodes(quantized):
                check_loads(quantized)
            got = run_batches(session(quantized, native=True), name, evaluate)
            results.append(LayerSensitivity(node.name, layers.module_of(node), node.op_type, drift(reference, got)))
    results.sort(key=lambda r: r.drift.sqnr_db)
    n_cal = sum(int(b.shape[0]) for b in calib)
    n_eval = sum(int(b.shape[0]) for b in evaluate)
    return SensitivityReport(results, method, n_cal, n_eval, sorted(set(notes)))


def _activation_after(layers: OnnxLayers, node: onnx.NodeProto) -> list[str]:
    readers = layers.consumers.get(node.output[0], [])
    if len(readers) == 1 and readers[0].op_type in ("Relu", "Clip") and node.output[0] not in layers.outputs:
        return [readers[0].name]
    return []

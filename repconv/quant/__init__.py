"""Quantization readiness of fused models.

* :func:`analyze_risk` - per layer and output channel: weight and activation ranges, outlier channels,
  the original branch behind each outlier, a predicted INT8 SQNR; layers ranked riskiest first.
* :func:`quantize_fp32` - ONNX Runtime static quantization (QDQ, per-channel weights) of an fp32 ONNX
  model, load-checked, with drift (SQNR, cosine, max relative error, top-1 agreement) and latency.
* :func:`compare_models` - two models (PyTorch / ONNX / INT8 ONNX) layer by layer; first diverging layer.
* :func:`sensitivity` - quantize one layer at a time, output SQNR per layer.
* :mod:`repconv.quant.calib` - calibration samples from images, ``.npy`` batches or random tensors.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "analyze_risk": "repconv.quant.risk",
    "RiskReport": "repconv.quant.risk",
    "quantize_fp32": "repconv.quant.ort_quant",
    "quantize_onnx": "repconv.quant.ort_quant",
    "export_fp32": "repconv.quant.ort_quant",
    "QuantizeError": "repconv.quant.ort_quant",
    "QuantizeResult": "repconv.quant.ort_quant",
    "compare_models": "repconv.quant.compare",
    "CompareReport": "repconv.quant.compare",
    "CompareError": "repconv.quant.compare",
    "sensitivity": "repconv.quant.sensitivity",
    "drift": "repconv.quant.metrics",
    "Drift": "repconv.quant.metrics",
    "CalibrationError": "repconv.quant.calib",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'repconv.quant' has no attribute {name!r}")

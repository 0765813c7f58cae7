"""Drift figures of `repconv.quant` against a hand computation on a tiny model.

A 2 -> 3 Linear is quantized by ONNX Runtime. The INT8 output is recomputed here from the
definitions ORT documents for static QDQ (activations: asymmetric int8 over [min(0, lo), max(0, hi)]
of the calibration data, scale = range / 255, zero point = round(-128 - rmin / scale); weights:
symmetric per output channel, scale = absmax / 64 with reduce_range), and the drift figures from
their formulas (SQNR, cosine, max |err| / max |ref|, argmax agreement).

Tolerances: ORT's integer kernel adds the bias in int32 (scale s_x * s_w) and rounds the output
once more, so the hand result may sit one output step away where a value falls on a rounding
boundary: allowed |diff| <= 1 output step. The drift figures are computed from the same two
arrays both ways, so they agree to float64 rounding (1e-9 relative); the fp32 reference differs from
ONNX Runtime's fp32 Gemm by float32 rounding only (1e-6 relative).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from repconv.quant.metrics import ErrorStats, drift
from repconv.quant.ort_quant import export_fp32, quantize_fp32, session

W = np.array([[1.0, -0.5], [0.25, 2.0], [-1.5, 0.75]])
B = np.array([0.1, -0.2, 0.3])


def tiny() -> nn.Module:
    m = nn.Linear(2, 3)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(W))
        m.bias.copy_(torch.from_numpy(B))
    return m.eval()


def act_grid(lo: float, hi: float) -> tuple[float, int]:
    rmin, rmax = min(lo, 0.0), max(hi, 0.0)
    scale = (rmax - rmin) / 255.0
    return scale, int(np.round(-128 - rmin / scale))


def fake_act(x: np.ndarray, scale: float, zp: int) -> np.ndarray:
    return (np.clip(np.round(x / scale) + zp, -128, 127) - zp) * scale


def test_drift_matches_hand_computation() -> None:
    rng = np.random.default_rng(0)
    calib = rng.uniform(-1.0, 1.0, (32, 2)).astype(np.float32)
    held = rng.uniform(-1.0, 1.0, (12, 2)).astype(np.float32)
    fp32, _ = export_fp32(tiny(), torch.zeros(1, 2))
    result = quantize_fp32(fp32, calib, held, reduce_range=True, latency=False)
    assert result.reduce_range and result.calib_samples == 32 and result.holdout_samples == 12

    # INT8 by hand: ranges from the calibration data, then the three roundings
    s_in, z_in = act_grid(float(calib.min()), float(calib.max()))
    w_scale = np.abs(W).max(1) / 64.0
    w_q = np.clip(np.round(W / w_scale[:, None]), -64, 64) * w_scale[:, None]
    y_cal = calib.astype(np.float64) @ W.T + B
    s_out, z_out = act_grid(float(y_cal.min()), float(y_cal.max()))
    x_hat = fake_act(held.astype(np.float64), s_in, z_in)
    hand_int8 = fake_act(x_hat @ w_q.T + B, s_out, z_out)

    sess = session(result.model)
    ort_int8 = np.concatenate([sess.run(None, {"input": h[None]})[0] for h in held]).astype(np.float64)
    assert np.abs(ort_int8 - hand_int8).max() <= s_out * 1.001
    assert np.mean(np.isclose(ort_int8, hand_int8, atol=1e-6)) >= 0.9  # off by one step only at ties

    # the figures, from their definitions
    ref = held.astype(np.float64) @ W.T + B
    err = ref - ort_int8
    sqnr = 10 * math.log10((ref ** 2).sum() / (err ** 2).sum())
    cosine = (ref * ort_int8).sum() / np.sqrt((ref ** 2).sum() * (ort_int8 ** 2).sum())
    max_rel = np.abs(err).max() / np.abs(ref).max()
    top1 = float((ref.argmax(1) == ort_int8.argmax(1)).mean())
    d = result.drift
    assert d.samples == 12
    assert d.sqnr_db == pytest.approx(sqnr, rel=1e-5)
    assert d.cosine == pytest.approx(cosine, rel=1e-9)
    assert d.max_rel == pytest.approx(max_rel, rel=1e-5)
    assert d.top1_agreement == pytest.approx(top1)
    assert 25 < d.sqnr_db < 60  # 8-bit grids on a 2-input layer: tens of dB, not exact, not broken


def test_error_stats_edge_cases() -> None:
    a = np.array([[3.0, -4.0]])
    same = ErrorStats()
    same.add(a, a)
    assert same.sqnr_db == math.inf and same.cosine == pytest.approx(1.0) and same.max_rel == 0.0
    assert not same.exceeds(0.0, 0.0)
    off = ErrorStats()
    off.add(a, np.array([[3.0, -3.0]]))  # error 1 on signal power 25
    assert off.sqnr_db == pytest.approx(10 * math.log10(25.0))
    assert off.max_rel == pytest.approx(0.25)
    assert off.exceeds(0.1, 0.0) and not off.exceeds(0.3, 0.0)
    assert off.exceeds(0.0, 10.0, min_sqnr=20.0) and not off.exceeds(0.0, 0.0, min_sqnr=10.0)
    bad = ErrorStats()
    bad.add(a, np.array([[np.nan, 1.0]]))
    assert bad.exceeds(1e9, 1e9) and bad.sqnr_db == -math.inf
    d = drift([[a]], [[a[:, ::-1] * 1.0]])
    assert d.top1_agreement == 0.0 and d.samples == 1
    assert drift([[np.ones((2, 1, 4, 4))]], [[np.ones((2, 1, 4, 4))]]).top1_agreement is None

"""INT8 models through ONNX Runtime's static quantization (QDQ format, per-channel weights).

The fp32 model comes from ``repconv.export_onnx`` (fused, checked against PyTorch). ORT's
``quantize_static`` calibrates activation ranges on the given samples (``minmax``, ``entropy`` or
``percentile``) and writes QuantizeLinear / DequantizeLinear pairs around every op it can quantize;
ops it does not know, such as ``ai.repconv::Involution``, run in fp32 between a DequantizeLinear on
their input and a QuantizeLinear on their output.

ONNX Runtime 1.32 aborts the whole process (a failed C++ assertion, not an exception) when it
creates a session for a QDQ model in which a DequantizeLinear read only by a custom op feeds that
op's inlined model-local function: its QDQ propagation pass follows the value into the function's
``Loop`` body. The inputs that only a custom op reads are therefore left in fp32 (for the
involution that is the generated kernel, the most quantization-sensitive tensor anyway), and every
quantized model is first opened in a child process, so a runtime that still crashes cannot take
the caller down and nothing is written.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import tempfile
import textwrap
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .calib import batches
from .metrics import Drift, drift

METHODS = ("minmax", "entropy", "percentile")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
STANDARD_DOMAINS = ("", "ai.onnx", "com.microsoft")
LOAD_CHECK_TIMEOUT_S = 300


def default_reduce_range() -> bool:
    """7-bit weights on x86 CPUs without VNNI, as ONNX Runtime advises.

    Their u8 x s8 kernels (AVX2 ``vpmaddubsw``) add two products in int16, which saturates for full
    8-bit weights: on such a CPU a layer with inputs near the top of their range loses ~20 dB of SQNR
    (measured: a trained digits RepVGG's first conv, 45.7 dB simulated in float vs 26.5 dB in ORT's
    integer kernel; 38.7 dB with 7-bit weights). CPUs with VNNI (AVX512-VNNI / AVX-VNNI) and ARM
    accumulate in int32 and keep 8 bits."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return not any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


class QuantizeError(RuntimeError):
    """The model cannot be quantized, or the quantized model does not load / run; one line."""


@dataclass
class Latency:
    """Median ms per batch in ONNX Runtime, fp32 and INT8 timed interleaved in one run."""

    fp32_ms: float
    int8_ms: float
    ratio: float  # INT8 / fp32, median of the per-repetition ratios
    ratio_p25: float
    ratio_p75: float
    batch: int
    threads: int
    repetitions: int
    native_ops: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class QuantizeResult:
    """What :func:`quantize_model` made and measured; ``model`` is the INT8 ONNX model (not yet written)."""

    model: onnx.ModelProto
    method: str
    reduce_range: bool
    calibration: str
    calib_samples: int
    holdout_samples: int
    drift: Drift
    latency: Latency | None
    op_counts: dict[str, int]
    quantized_nodes: int
    float_nodes: list[str]  # compute nodes left in fp32 (custom ops)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "reduce_range": self.reduce_range, "calibration": self.calibration,
                "calib_samples": self.calib_samples, "holdout_samples": self.holdout_samples,
                "drift": self.drift.to_dict(),
                "latency": self.latency.to_dict() if self.latency else None, "op_counts": self.op_counts,
                "quantized_nodes": self.quantized_nodes, "float_nodes": self.float_nodes, "notes": self.notes}


# --------------------------------------------------------------------------- ONNX helpers

def input_info(model: onnx.ModelProto) -> tuple[str, int, tuple[int, ...]]:
    """(name, static batch, full shape) of a single-input model; a symbolic batch counts as 1."""
    init = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise QuantizeError(f"the model has {len(inputs)} inputs; calibration handles single-input models")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in dims)
    if any(s <= 0 for s in shape[1:]):
        raise QuantizeError(f"input {inputs[0].name} has symbolic dimensions besides the batch: {shape}")
    return inputs[0].name, shape[0] if shape else 1, shape


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in QDQ_OPS or n.op_type.startswith("QLinear") for n in model.graph.node)


def custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain not in STANDARD_DOMAINS]


def session(model: onnx.ModelProto | bytes | str | Path, *, threads: int | None = None, native: bool = False,
            flush_denormal: bool = True) -> Any:
    """A CPU InferenceSession; ``native`` registers repconv's kernels when they are built."""
    import onnxruntime as ort

    if native:
        from repconv.profile.runtimes import ort_session_options

        so, _ = ort_session_options(threads or 0, flush_denormal)
    else:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        if flush_denormal:
            so.add_session_config_entry("session.set_denormal_as_zero", "1")
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(str(src) if isinstance(src, Path) else src, so, providers=["CPUExecutionProvider"])


def run_batches(sess: Any, input_name: str, data: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
    return [[np.asarray(o) for o in sess.run(None, {input_name: b})] for b in data]


@contextlib.contextmanager
def _quiet_ort_logging() -> Iterator[None]:
    """quantize_static logs advice (pre-processing, ...) on the root logger for every call."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


class _Reader:
    """ORT's CalibrationDataReader protocol: ``get_next`` yields feeds until None."""

    def __init__(self, input_name: str, data: Sequence[np.ndarray]) -> None:
        self.input_name = input_name
        self.data = list(data)
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.data):
            return None
        self.pos += 1
        return {self.input_name: self.data[self.pos - 1]}

    def rewind(self) -> None:
        self.pos = 0

    def __len__(self) -> int:
        return len(self.data)


# --------------------------------------------------------------------------- quantization

def quantize_onnx(fp32: onnx.ModelProto, calib: Sequence[np.ndarray], *, method: str = "minmax",
                  reduce_range: bool | None = None, nodes_to_quantize: Sequence[str] | None = None,
                  cache: Path | None = None, notes: list[str] | None = None) -> onnx.ModelProto:
    """ORT static quantization of ``fp32`` on the calibration batches; the result, not yet load-checked.

    ``reduce_range``: 7-bit weights (default: :func:`default_reduce_range`). ``nodes_to_quantize``
    restricts quantization to those nodes (ORT's own option). ``cache`` names a calibration cache file:
    computed once, reused by later calls (one calibration for many models)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise QuantizeError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if is_quantized(fp32):
        raise QuantizeError("the model is already quantized (it has QuantizeLinear / QLinear* nodes)")
    input_name, _, _ = input_info(fp32)
    calib_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile}[method]
    kwargs: dict[str, Any] = {}
    if cache is not None:
        import inspect

        if "calibration_cache_path" in inspect.signature(quantize_static).parameters:  # ORT >= 1.32
            kwargs["calibration_cache_path"] = str(cache)
    with tempfile.TemporaryDirectory(prefix="repconv-quant-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(fp32, src)
        try:
            with _quiet_ort_logging():
                quantize_static(
                    str(src), str(dst), _Reader(input_name, calib), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8,
                    reduce_range=default_reduce_range() if reduce_range is None else reduce_range,
                    weight_type=QuantType.QInt8, calibrate_method=calib_method,
                    nodes_to_quantize=list(nodes_to_quantize or []), **kwargs)
        except Exception as e:
            text = str(e).strip().splitlines()
            raise QuantizeError(f"ONNX Runtime quantization failed: {(text[0] if text else type(e).__name__)[:200]}"
                                ) from None
        quantized = onnx.load(dst)
    kept = _keep_custom_inputs_float(quantized)
    if kept and notes is not None:
        notes.append(f"kept in fp32 the inputs only a custom op reads ({', '.join(kept)}): ONNX Runtime's QDQ "
                     "propagation crashes on them")
    return quantized


def _keep_custom_inputs_float(model: onnx.ModelProto) -> list[str]:
    """Feed custom-domain nodes the fp32 tensor instead of DQ(Q(tensor)) where only they read the DQ."""
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: Counter[str] = Counter(i for n in model.graph.node for i in n.input)
    graph_outputs = {o.name for o in model.graph.output}
    kept: list[str] = []
    for node in custom_nodes(model):
        for i, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or consumers[name] != 1 or name in graph_outputs:
                continue
            q = producers.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            node.input[i] = q.input[0]
            kept.append(q.input[0])
    if kept:
        _drop_dead_nodes(model)
    return kept


def _drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove Q / DQ nodes nobody reads any more, then initializers nobody reads."""
    g = model.graph
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if n.op_type in QDQ_OPS and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input} | outputs
    for f in model.functions:
        used |= {i for n in f.node for i in n.input}
    for init in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(init)


_LOAD_CHECK = textwrap.dedent("""
    import sys
    import numpy as np
    import onnxruntime as ort
    sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        feeds[i.name] = np.zeros(shape, dtype=np.float32)
    sess.run(None, feeds)
""")


def check_loads(model: onnx.ModelProto) -> None:
    """Open and run ``model`` in a plain ONNX Runtime session in a child process (see the module note)."""
    with tempfile.TemporaryDirectory(prefix="repconv-quant-check-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(model, path)
        try:
            proc = subprocess.run([sys.executable, "-c", _LOAD_CHECK, str(path)], capture_output=True, text=True,
                                  timeout=LOAD_CHECK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise QuantizeError(f"the quantized model did not load in ONNX Runtime within {LOAD_CHECK_TIMEOUT_S} s"
                                ) from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.strip().splitlines() if ln.strip()]
        why = lines[-1][:200] if lines else f"exit status {proc.returncode}"
        raise QuantizeError(f"the quantized model does not load in ONNX Runtime: {why}")


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.node))


def quantized_compute_nodes(model: onnx.ModelProto) -> tuple[int, list[str]]:
    """(compute nodes reading a DequantizeLinear output, custom nodes left in float)."""
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = sum(1 for n in model.graph.node if n.op_type not in QDQ_OPS and any(i in dq_out for i in n.input))
    return quantized, [f"{n.name} ({n.domain}::{n.op_type})" for n in custom_nodes(model)]


# --------------------------------------------------------------------------- the whole job

def quantize_fp32(fp32: onnx.ModelProto, calib: np.ndarray, holdout: np.ndarray, *, method: str = "minmax",
                  reduce_range: bool | None = None, calibration: str = "", latency: bool = True,
                  latency_seconds: float = 1.0, threads: int | None = None,
                  notes: Sequence[str] = ()) -> QuantizeResult:
    """Quantize an fp32 ONNX model, check it loads, and measure drift and latency against fp32.

    ``calib`` / ``holdout``: samples ``(N, *input_shape[1:])``; the held-out ones never take part in
    calibration. Raises :class:`QuantizeError`; nothing is written here (the caller writes ``.model``)."""
    input_name, batch, _ = input_info(fp32)
    calib_batches, eval_batches = batches(calib, batch), batches(holdout, batch)
    all_notes = list(notes)
    if len(calib) % batch or len(holdout) % batch:
        all_notes.append(f"samples beyond a multiple of the model's batch size {batch} were left out")
    reduce_range = default_reduce_range() if reduce_range is None else reduce_range
    quantized = quantize_onnx(fp32, calib_batches, method=method, reduce_range=reduce_range, notes=all_notes)
    check_loads(quantized)
    ref_sess, q_sess = session(fp32, threads=threads, native=True), session(quantized, threads=threads, native=True)
    figures = drift(run_batches(ref_sess, input_name, eval_batches), run_batches(q_sess, input_name, eval_batches))
    timing = _latency(ref_sess, q_sess, input_name, eval_batches[0], latency_seconds, threads) if latency else None
    n_quant, floats = quantized_compute_nodes(quantized)
    if floats:
        all_notes.append(f"custom ops run in fp32 between DequantizeLinear / QuantizeLinear: {', '.join(floats)}")
    return QuantizeResult(quantized, method, reduce_range, calibration, len(calib_batches) * batch,
                          len(eval_batches) * batch, figures, timing, op_counts(quantized), n_quant, floats, all_notes)


def _latency(ref_sess: Any, q_sess: Any, input_name: str, example: np.ndarray, seconds: float,
             threads: int | None) -> Latency:
    from repconv.profile.stats import measure_interleaved, paired_ratio, summarize
    from repconv.runtime import native_library

    feed = {input_name: example}
    samples = measure_interleaved([lambda: ref_sess.run(None, feed), lambda: q_sess.run(None, feed)],
                                  warmup=5, seconds=seconds, min_iters=10)
    fp32, int8 = summarize(samples[0]), summarize(samples[1])
    ratio = paired_ratio(samples[0], samples[1])
    return Latency(fp32.median_ms, int8.median_ms, ratio.median, ratio.p25, ratio.p75, int(example.shape[0]),
                   threads or 0, len(samples[0]), native_library() is not None)



def export_fp32(model: Any, example: Any, *, opset: int | None = None) -> tuple[onnx.ModelProto, Any]:
    """``repconv.export_onnx`` into a temporary file: (fp32 ModelProto, ExportReport). Export errors propagate."""
    from repconv.export.onnx import export_onnx_with_report

    with tempfile.TemporaryDirectory(prefix="repconv-quant-") as tmp:
        path = Path(tmp) / "fp32.onnx"
        report = export_onnx_with_report(model, path, example, opset=opset)
        return onnx.load(path), report

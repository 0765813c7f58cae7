#!/usr/bin/env python3
"""Standalone latency benchmark of this bundle's ONNX model(s) on the device it runs on.

Needs only Python 3.9+, numpy and onnxruntime. Writes the same JSON schema as ``repconv profile
--json``; bring the file back and show it beside local runs with ``repconv profile --import FILE``.

    python benchmark.py --json result.json [--batch-sizes 1,8] [--threads N] [--iters N | --seconds S]
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

try:
    import onnxruntime as ort  # noqa: E402
except ImportError:
    sys.exit("benchmark.py needs onnxruntime: pip install onnxruntime numpy")

from repconv_portable import cpu_model, cpu_peak_growth_mb, usable_cores  # noqa: E402
from repconv_stats import measure_interleaved, paired_ratio, summarize, wall_timer  # noqa: E402

SCHEMA = "repconv.profile/1"


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: values must be positive")
    return values


def positive_int(text: str) -> int:
    values = positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected one positive integer")
    return values[0]


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def find_native_library(explicit: str | None) -> str | None:
    """The repconv custom-op library: --custom-op-library, else one built under native/."""
    if explicit:
        if not os.path.isfile(explicit):
            sys.exit(f"--custom-op-library {explicit}: no such file")
        return explicit
    for pattern in ("*.so", "*.dylib", "*.dll"):
        found = sorted(glob.glob(os.path.join(HERE, "native", "**", pattern), recursive=True))
        if found:
            return found[0]
    return None


def uses_custom_domain(path: str) -> bool:
    # Cheap byte scan instead of importing the onnx package (not needed on the device).
    with open(path, "rb") as f:
        return b"ai.repconv" in f.read()


def session_options(threads: int, flush_denormal: bool, native: str | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Same settings as `repconv profile`: interleaved sessions must not spin on each other's cores.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if flush_denormal:
        so.add_session_config_entry("session.set_denormal_as_zero", "1")
    if native:
        so.register_custom_ops_library(native)
    return so


def main(argv: list[str] | None = None) -> int:
    with open(os.path.join(HERE, "bundle.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", dest="json_out", default=None, help="write the report here (default: stdout)")
    p.add_argument("--batch-sizes", type=positive_ints, default=manifest["batch_sizes"])
    p.add_argument("--threads", type=positive_int, default=None, help="intra-op threads (default: usable cores)")
    p.add_argument("--warmup", type=int, default=manifest["warmup"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--iters", type=positive_int, default=None)
    g.add_argument("--seconds", type=positive_float, default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--custom-op-library", default=None, help="built repconv native op library (.so/.dylib/.dll)")
    p.add_argument("--no-flush-denormal", action="store_true", help="keep denormal floats (default: flush to zero)")
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    iters = args.iters if args.iters is not None else (None if args.seconds else manifest.get("iters"))
    seconds = args.seconds or (None if iters else manifest.get("seconds") or 1.0)

    provider = "CUDAExecutionProvider" if args.device == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        p.error(f"--device {args.device}: this onnxruntime has no {provider} "
                f"(has: {', '.join(ort.get_available_providers())})")
    threads = args.threads or usable_cores()
    flush = not args.no_flush_denormal
    native = find_native_library(args.custom_op_library)
    models = manifest["models"]
    notes = []
    if any(uses_custom_domain(os.path.join(HERE, m["file"])) for m in models) and not native:
        notes.append("repconv native op library not found: ONNX Runtime runs Involution through the model-local "
                     "function (slower); build native/ and pass --custom-op-library")
    if flush:
        notes.append("denormals flushed to zero (ORT session.set_denormal_as_zero=1)")

    sessions = []
    for m in models:
        so = session_options(threads, flush, native)
        sessions.append(ort.InferenceSession(os.path.join(HERE, m["file"]), sess_options=so, providers=[provider]))
    input_shape = list(manifest["input_shape"])
    rng = np.random.default_rng(0)
    report = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (3.9)
        "machine": {
            "hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "usable_cores": usable_cores(),
            "threads": threads, "torch": None, "onnxruntime": ort.__version__, "device": args.device,
            "gpu": None, "cuda": None, "flush_denormal": flush,
        },
        "config": {"runtimes": ["onnxruntime"], "device": args.device, "batch_sizes": args.batch_sizes,
                   "input_shape": input_shape, "warmup": args.warmup, "iters": iters,
                   "seconds": None if iters else seconds, "threads": threads, "flush_denormal": flush,
                   "interleaved": True, "ort_thread_spinning": False, "bundle": manifest.get("name")},
        "results": [],
        "comparisons": [],
        "notes": notes,
    }
    for b in args.batch_sizes:
        x = rng.standard_normal([b, *input_shape[1:]]).astype(np.float32)
        calls = []
        for s in sessions:
            feed = {s.get_inputs()[0].name: x}
            calls.append(lambda s=s, feed=feed: s.run(None, feed))
        try:
            for call in calls:
                call()  # one-time initialisation for this shape
        except Exception as e:  # e.g. a model exported with a fixed batch size
            notes.append(f"batch {b}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            continue
        mems = []
        for m in models:
            fresh = ort.InferenceSession(os.path.join(HERE, m["file"]), sess_options=session_options(
                threads, flush, native), providers=[provider])
            feed = {fresh.get_inputs()[0].name: x}
            mems.append(None if args.device == "cuda" else cpu_peak_growth_mb(lambda f=fresh, d=feed: f.run(None, d)))
            del fresh
        print(f"batch {b}: timing {len(calls)} model(s) interleaved", file=sys.stderr)
        samples = measure_interleaved(calls, warmup=args.warmup, iters=iters, seconds=seconds,
                                      timer=wall_timer(time.perf_counter), clock=time.perf_counter)
        for m, s, mem in zip(models, samples, mems):  # noqa: B905 (runs on Python 3.9)
            st = summarize(s)
            row = {"model": m["model"], "variant": m["variant"], "runtime": "onnxruntime", "device": args.device,
                   "batch_size": b, "threads": threads, **st.to_dict(),
                   "throughput": b / (st.median_ms / 1e3) if st.median_ms > 0 else None,
                   "peak_mem_mb": mem, "params": m.get("params"), "macs": m.get("macs"),
                   "provider": provider, "native_ops": bool(native), "per_op": None, "source": "local"}
            report["results"].append(row)
        for j in range(1, len(models)):
            ratio = paired_ratio(samples[0], samples[j])
            report["comparisons"].append({
                "model": models[0]["model"], "runtime": "onnxruntime", "device": args.device, "batch_size": b,
                "reference": "{} [{}]".format(models[0]["model"], models[0]["variant"]),
                "candidate": "{} [{}]".format(models[j]["model"], models[j]["variant"]), **ratio.to_dict()})
    text = json.dumps(report, indent=2)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        print(f"wrote {args.json_out}", file=sys.stderr)
    else:
        print(text)
    return 0 if report["results"] else 1


if __name__ == "__main__":
    sys.exit(main())

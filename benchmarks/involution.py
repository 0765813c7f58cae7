"""Involution latency: ORT native kernel vs ORT function fallback vs ORT 7x7 depth-wise conv vs torch.

    python benchmarks/involution.py                     # x=(1,64,56,56), K=7, G=4; 1 thread and all
    python benchmarks/involution.py --reps 50 --json out.json

Every case runs once per round, rounds interleave the cases (so load drift hits all of them alike),
and the table shows medians. Denormals are flushed (torch.set_flush_denormal(True)). The depth-wise
7x7 conv has the same input/output shape and the same multiply-add count as the involution, with
MLAS's hand-written kernels, so it is the floor the native kernel is compared with.
Targets: native <= 2x depth-wise; native >= 25x faster than the torch unfold reference; ORT function
<= 0.3x unfold; repconv's torch op >= 15x faster than unfold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repconv import runtime  # noqa: E402
from repconv.export import involution_onnx as inv_onnx  # noqa: E402
from repconv.ops.involution import involution, involution_reference  # noqa: E402


def time_interleaved(cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call for each case; one call of every case per round, in the same order."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def depthwise_model(channels: int, kernel_size: int, h: int, w: int, stride: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    pad = (kernel_size - 1) // 2
    weight = np.random.default_rng(0).standard_normal((channels, 1, kernel_size, kernel_size)).astype(np.float32)
    node = helper.make_node(
        "Conv", ["x", "w"], ["y"], group=channels, pads=[pad] * 4, strides=[stride, stride],
        kernel_shape=[kernel_size, kernel_size],
    )
    graph = helper.make_graph(
        [node], "depthwise", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=inv_onnx.IR_VERSION)
    return model.SerializeToString()


def run(shape: tuple[int, int, int, int], k: int, groups: int, stride: int, threads: int, rounds: int) -> dict:
    import onnxruntime as ort

    n, c, h, w = shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen)
    kern = torch.randn(n, groups * k * k, ho, wo, generator=gen)
    feeds = {"x": x.numpy(), "kernel": kern.numpy()}
    model = inv_onnx.involution_model(c, k, stride, 1, groups, h, w, batch=n).SerializeToString()
    # no spinning: idle ORT workers would otherwise steal the cores from the next case in the round
    opts = {"intra_op_num_threads": threads, "inter_op_num_threads": 1, "log_severity_level": 3, "spinning": False}

    cases: dict[str, Callable[[], object]] = {}
    native_lib = runtime.native_library()
    if native_lib is not None:
        s_native = runtime.inference_session(model, native=True, **opts)
        cases["ORT native kernel"] = lambda: s_native.run(None, feeds)
    s_func = runtime.inference_session(model, native=False, **opts)
    cases["ORT function fallback"] = lambda: s_func.run(None, feeds)
    so = runtime.session_options(native=False, **opts)
    s_dw = ort.InferenceSession(depthwise_model(c, k, h, w, stride), so, providers=["CPUExecutionProvider"])
    dw_feeds = {"x": feeds["x"]}
    cases[f"ORT depthwise {k}x{k} conv"] = lambda: s_dw.run(None, dw_feeds)

    torch.set_num_threads(threads)

    def torch_op() -> object:
        with torch.inference_mode():
            return involution(x, kern, k, stride, 1, groups)

    def torch_unfold() -> object:
        with torch.inference_mode():
            return involution_reference(x, kern, k, stride, 1, groups)

    cases["torch repconv op"] = torch_op
    cases["torch unfold reference"] = torch_unfold

    # Sanity: all involution implementations agree before anything is timed.
    ref = torch_unfold().numpy()
    for name in ("ORT native kernel", "ORT function fallback"):
        if name in cases:
            np.testing.assert_allclose(cases[name]()[0], ref, rtol=1e-4, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(torch_op().numpy(), ref, rtol=1e-4, atol=1e-4)

    times = time_interleaved(cases, rounds)
    return {name: statistics.median(ts) for name, ts in times.items()}


TARGETS = [
    # (description, numerator case, denominator case, bound, "<=" or ">=")
    ("native <= 2x depthwise", "ORT native kernel", "ORT depthwise", 2.0, "<="),
    ("native >= 25x faster than unfold", "torch unfold reference", "ORT native kernel", 25.0, ">="),
    ("function <= 0.3x unfold", "ORT function fallback", "torch unfold reference", 0.3, "<="),
    ("torch op >= 15x faster than unfold", "torch unfold reference", "torch repconv op", 15.0, ">="),
]


def _lookup(result: dict[str, float], prefix: str) -> float | None:
    return next((v for k, v in result.items() if k.startswith(prefix)), None)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="1,64,56,56")
    p.add_argument("--kernel-size", type=int, default=7)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--threads", default=f"1,{os.cpu_count() or 1}", help="comma-separated thread counts")
    p.add_argument("--reps", type=int, default=30, help="interleaved rounds (median reported)")
    p.add_argument("--json", type=Path, default=None, help="also write the medians (seconds) here")
    args = p.parse_args(argv)

    torch.set_flush_denormal(True)
    shape = tuple(int(v) for v in args.shape.split(","))
    thread_counts = sorted({int(t) for t in args.threads.split(",")})
    results = {t: run(shape, args.kernel_size, args.groups, args.stride, t, args.reps) for t in thread_counts}

    console = Console()
    if runtime.native_library() is None:
        console.print("[yellow]native library not built: run `python -m repconv.runtime.build`[/yellow]")
    table = Table(title=f"Involution x={shape}, K={args.kernel_size}, G={args.groups}, stride={args.stride} "
                        f"(median of {args.reps} interleaved rounds)")
    table.add_column("case")
    for t in thread_counts:
        table.add_column(f"{t} thr ms", justify="right")
        table.add_column(f"{t} thr vs unfold", justify="right")
        table.add_column(f"{t} thr vs dw", justify="right")
    for name in results[thread_counts[0]]:
        row = [name]
        for t in thread_counts:
            r = results[t]
            v, unfold, dw = r[name], _lookup(r, "torch unfold"), _lookup(r, "ORT depthwise")
            row += [f"{v * 1e3:.3f}", f"{v / unfold:.3f}x" if unfold else "-", f"{v / dw:.2f}x" if dw else "-"]
        table.add_row(*row)
    console.print(table)

    ok = True
    for desc, num, den, bound, op in TARGETS:
        for t in thread_counts:
            a, b = _lookup(results[t], num), _lookup(results[t], den)
            if a is None or b is None:
                console.print(f"  [yellow]skip[/yellow] {desc} ({t} thr): case missing")
                continue
            ratio = a / b
            good = ratio <= bound if op == "<=" else ratio >= bound
            ok &= good
            mark = "[green]PASS[/green]" if good else "[red]FAIL[/red]"
            console.print(f"  {mark} {desc} ({t} thr): {ratio:.2f} (target {op} {bound})")
    if args.json:
        args.json.write_text(json.dumps({str(t): r for t, r in results.items()}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

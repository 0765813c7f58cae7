"""RedNet-26 vs ResNet-26 in ONNX Runtime, both exported by repconv.

RedNet's involutions run either through repconv's native ORT kernel or through the model-local
``ai.repconv::Involution`` function (standard ops); ResNet-26 is the same network with a 3x3 conv in
place of every involution. Sessions are timed interleaved (each round runs every session once, in
a shuffled order) so that machine noise hits all of them alike; the table shows medians.

    python benchmarks/rednet_ort.py [--size 224] [--rounds 30] [--threads 1,0]   (0 = all cores)
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from repconv import runtime
from repconv.blocks.rednet import rednet26, resnet26
from repconv.export.onnx import export_onnx_with_report


@dataclass
class Case:
    model: str
    runtime: str  # "native", "function" or "-" (no custom op)
    threads: int
    session: ort.InferenceSession
    times: list[float]


def _calibrate(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """BN statistics from train-mode passes: an untrained deep RedNet otherwise overflows in eval."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for seed in range(2):
            model(torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def _session(path: Path, threads: int, native: bool) -> ort.InferenceSession:
    so = runtime.session_options(native=native, spinning=False, intra_op_num_threads=threads, inter_op_num_threads=1,
                                 graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", default="1,0", help="comma list; 0 = all cores")
    args = ap.parse_args(argv)
    console = Console()
    cores = os.cpu_count() or 1
    threads = sorted({cores if int(t) == 0 else int(t) for t in args.threads.split(",")})
    shape = (1, 3, args.size, args.size)
    native_ok = runtime.native_library() is not None
    if not native_ok:
        console.print("[yellow]native library not built: only the function fallback is timed "
                      "(python -m repconv.runtime.build)[/yellow]")

    torch.manual_seed(0)
    x = torch.randn(*shape)
    cases: list[Case] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, factory in (("RedNet-26", rednet26), ("ResNet-26", resnet26)):
            t0 = time.perf_counter()
            path = Path(tmp) / f"{name}.onnx"
            rep = export_onnx_with_report(_calibrate(factory(), shape), path, x, target="onnxruntime")
            console.print(f"exported {name}: {rep.nodes_final} nodes, {rep.custom_nodes} Involution, "
                          f"ORT max abs err {rep.max_abs:.2e} ({time.perf_counter() - t0:.1f} s)")
            runtimes = ((["native"] if native_ok else []) + ["function"]) if rep.custom_nodes else ["-"]
            for t in threads:
                for rt in runtimes:
                    cases.append(Case(name, rt, t, _session(path, t, native=rt == "native"), []))

        feeds = {"input": x.numpy()}
        for c in cases:
            for _ in range(args.warmup):
                c.session.run(None, feeds)
        rng = random.Random(0)
        for _ in range(args.rounds):
            order = cases[:]
            rng.shuffle(order)
            for c in order:
                t0 = time.perf_counter()
                c.session.run(None, feeds)
                c.times.append((time.perf_counter() - t0) * 1e3)

    med = {(c.model, c.runtime, c.threads): statistics.median(c.times) for c in cases}
    table = Table(title=f"ORT {ort.__version__}, input {'x'.join(map(str, shape))}, {cores} cores, "
                        f"median of {args.rounds} interleaved runs (ms)")
    for col in ("model", "Involution runs as", "threads", "median ms", "p10-p90 ms", "vs ResNet-26",
                "native speed-up"):
        table.add_column(col, justify="left" if col in ("model", "Involution runs as") else "right")
    for c in cases:
        m = med[(c.model, c.runtime, c.threads)]
        p10, p90 = np.percentile(c.times, [10, 90])
        base = med[("ResNet-26", "-", c.threads)]
        fn = med.get((c.model, "function", c.threads))
        speed = f"{fn / m:.2f}x" if c.runtime == "native" and fn else ""
        table.add_row(c.model, c.runtime, str(c.threads), f"{m:.2f}", f"{p10:.1f}-{p90:.1f}", f"{m / base:.2f}x",
                      speed)
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

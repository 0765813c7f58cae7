"""RedNet-26 and CoTNet-26 exported by repconv, every Involution form in every runtime that loads it.

Forms (repconv.export.forms):
* ``onnxruntime``: one ``ai.repconv::Involution`` node per involution + the model-local function -
  ONNX Runtime with repconv's native kernel ("ORT native") or without it (the function, a ``Loop``
  over the taps: "ORT function"). OpenVINO and tract refuse this file.
* ``generic`` (the default): standard ops, phase-decomposed unit-stride taps - ONNX Runtime,
  OpenVINO, tract.
* ``strided``: standard ops with per-tap strided ``Slice`` for stride 2 (the first standard-op
  prototype, kept for comparison; ``expand_involutions(phases=False)``).

Each thread setting (1, and all cores) is one interleaved run: every round runs every session once
in a shuffled order, so machine noise hits all of them alike. The table gives medians, the 10-90 %
range, the ratio to ORT native (the median over rounds of the per-round ratio, so drift between
rounds cancels) and each session's max relative error against PyTorch. tract's Python API has no
thread setting (one thread): it appears in the 1-thread rows only. onnx.reference (pure numpy) is a
correctness tool, not timed here (tests/test_runtime_matrix.py, benchmarks/runtime_support.py).

    python benchmarks/export_runtimes.py [--size 224] [--rounds 20] [--threads 1,0] [--models rednet26,cotnet26]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from repconv import runtime as native
from repconv.blocks.rednet import rednet26
from repconv.dynamic.cotnet import cotnet26
from repconv.export import runtimes
from repconv.export.families import calibrate
from repconv.export.forms import expand_involutions
from repconv.export.onnx import export_onnx_with_report

MODELS: dict[str, Callable[[], nn.Module]] = {"rednet26": rednet26, "cotnet26": cotnet26}


@dataclass
class Session:
    model: str
    form: str
    runtime: str
    threads: int
    run: Callable[[], list[np.ndarray]]
    rel_err: float
    times: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return {"onnxruntime-native": "ORT native", "onnxruntime": "ORT", "openvino": "OpenVINO",
                "tract": "tract"}[self.runtime] + ("" if self.form != "onnxruntime" or self.runtime != "onnxruntime"
                                                   else " function")


def _export(name: str, shape: tuple[int, ...], tmp: Path, console: Console) -> tuple[dict[str, Path], np.ndarray,
                                                                                     np.ndarray]:
    torch.manual_seed(0)
    model = calibrate(MODELS[name](), shape)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    files = {"onnxruntime": tmp / f"{name}.ort.onnx", "generic": tmp / f"{name}.generic.onnx",
             "strided": tmp / f"{name}.strided.onnx"}
    rep = export_onnx_with_report(model, files["onnxruntime"], x, target="onnxruntime",
                                  extra_targets={"generic": files["generic"]})
    strided = expand_involutions(onnx.load(str(files["onnxruntime"])), phases=False)
    onnx.save(strided, str(files["strided"]))
    console.print(f"exported {name}: {rep.involution_nodes} involutions, {rep.nodes_final} nodes (onnxruntime form), "
                  f"{len(onnx.load(str(files['generic'])).graph.node)} (generic), {time.perf_counter() - t0:.1f} s")
    with torch.no_grad():
        ref = model(x).numpy()
    return files, x.numpy(), ref


def _sessions(name: str, files: dict[str, Path], x: np.ndarray, ref: np.ndarray, threads: int,
              console: Console) -> list[Session]:
    plan = [("onnxruntime", "onnxruntime-native"), ("onnxruntime", "onnxruntime"), ("generic", "onnxruntime"),
            ("generic", "openvino"), ("generic", "tract"), ("strided", "onnxruntime"), ("strided", "openvino")]
    out = []
    for form, rt in plan:
        if not runtimes.available(rt) or (rt == "tract" and threads != 1):
            continue
        try:
            run = runtimes.load(rt, files[form], threads=threads)
        except runtimes.RuntimeRefused as e:
            console.print(f"[yellow]{name} {form} form in {rt}: refused ({e})[/yellow]")
            continue
        feeds = {"input": x}
        got = run(feeds)[0]
        err = float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())
        out.append(Session(name, form, rt, threads, lambda run=run, feeds=feeds: run(feeds), err))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", default="1,0", help="comma list; 0 = all cores")
    ap.add_argument("--models", default="rednet26,cotnet26")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    console = Console(width=150)
    cores = os.cpu_count() or 1
    threads = sorted({cores if int(t) == 0 else int(t) for t in args.threads.split(",")})
    shape = (1, 3, args.size, args.size)
    if native.native_library() is None:
        console.print("[red]the native library is not built (python -m repconv.runtime.build): no ORT native "
                      "baseline[/red]")
        return 1
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    results: list[Session] = []
    with tempfile.TemporaryDirectory() as tmp:
        exported = {n: _export(n, shape, Path(tmp), console) for n in names}
        for t in threads:
            sessions = [s for n in names for s in _sessions(n, *exported[n], t, console)]
            for s in sessions:
                for _ in range(args.warmup):
                    s.run()
            rng = random.Random(0)
            for _ in range(args.rounds):
                order = sessions[:]
                rng.shuffle(order)
                for s in order:
                    t0 = time.perf_counter()
                    s.run()
                    s.times.append((time.perf_counter() - t0) * 1e3)
            results.extend(sessions)
            del sessions

    table = Table(title=f"input {'x'.join(map(str, shape))}, {cores} cores, median of {args.rounds} interleaved "
                        "rounds (ms); vs ORT native = median over rounds of the time / ORT native's time in "
                        "the same round (same thread count)")
    for col in ("model", "form", "runtime", "threads", "median ms", "p10-p90 ms", "vs ORT native", "max rel err"):
        table.add_column(col, justify="left" if col in ("model", "form", "runtime") else "right")
    for s in results:
        med = statistics.median(s.times)
        base = next(b for b in results if b.model == s.model and b.threads == s.threads
                    and b.runtime == "onnxruntime-native")
        p10, p90 = np.percentile(s.times, [10, 90])
        ratio = statistics.median(t / b for t, b in zip(s.times, base.times, strict=True))
        table.add_row(s.model, s.form, s.label, str(s.threads), f"{med:.1f}", f"{p10:.1f}-{p90:.1f}",
                      f"{ratio:.2f}x", f"{s.rel_err:.1e}")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

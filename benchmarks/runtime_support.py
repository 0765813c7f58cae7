"""Which runtime runs which exported file: issue 9's table, re-measured.

Exports RedNet-26, CoTNet-26, RepVGG-A0, the demo model and every operator family of
repconv/export/families.py (involution and CoT blocks, the dynamic operators, the fused static
blocks), each with a static and a dynamic batch, in both Involution forms (``--target onnxruntime``
and the default ``generic``), then loads every file in ONNX Runtime (plain session and with repconv's
native kernel), OpenVINO (CPU, f32 hint), tract and onnx.reference and compares it with PyTorch at
the export batch and, for a dynamic batch, at a second one. A cell counts files that loaded and
matched (max |err| <= 1e-4 * max |ref|), the worst relative error, and the runtime's own message
for a file it refused.

    python benchmarks/runtime_support.py [--size 64]     (the big nets at SIZExSIZE; onnx.reference is slow)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from repconv.blocks.common import randomize_bn_
from repconv.blocks.models import repvgg_a0
from repconv.blocks.rednet import rednet26
from repconv.dynamic.cotnet import cotnet26
from repconv.export import runtimes
from repconv.export.families import FAMILIES, INVOLUTION_FAMILIES, calibrate
from repconv.export.onnx import export_onnx_with_report

TOL = 1e-4
RUNTIMES = ("onnxruntime-native", "onnxruntime", "openvino", "tract", "reference")


@dataclass
class Cell:
    ran: int = 0
    total: int = 0
    worst: float = 0.0
    refused: list[str] = field(default_factory=list)

    def text(self) -> str:
        if not self.total:
            return "-"
        out = f"{self.ran} / {self.total}" + (f", <= {self.worst:.0e}" if self.ran else "")
        if self.refused:
            out += f"; refused: {self.refused[0]}"
        return out


def _calibrated(factory: Callable[[], nn.Module], size: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return calibrate(factory(num_classes=10), (1, 3, size, size))

    return make


def _cases(size: int) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool]]:
    """name -> (factory, one sample's shape, has Involution)."""
    cases = {
        "RedNet-26": (_calibrated(rednet26, size), (3, size, size), True),
        "CoTNet-26": (_calibrated(cotnet26, size), (3, size, size), True),
        "RepVGG-A0": (lambda: randomize_bn_(repvgg_a0(num_classes=10)).eval(), (3, size, size), False),
    }
    for name, (factory, shape) in FAMILIES.items():
        cases[name] = (factory, shape, name in INVOLUTION_FAMILIES)
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    console = Console(width=160)
    have = [rt for rt in RUNTIMES if runtimes.available(rt)]
    missing = [rt for rt in RUNTIMES if rt not in have]
    if missing:
        console.print(f"[yellow]not installed here: {', '.join(missing)} (scripts/thirdparty-env has them)[/yellow]")
    columns = ("with Involution, --target onnxruntime", "with Involution, default (generic)", "without Involution")
    cells = {(rt, col): Cell() for rt in have for col in columns}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (factory, shape, has_inv) in _cases(args.size).items():
            for mode in ("static", "dynamic"):
                t0 = time.perf_counter()
                model = factory()
                x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
                files = {"onnxruntime": Path(tmp) / f"{name}-{mode}-ort.onnx",
                         "generic": Path(tmp) / f"{name}-{mode}.onnx"}
                export_onnx_with_report(model, files["generic"], x, dynamic_batch=mode == "dynamic",
                                        extra_targets={"onnxruntime": files["onnxruntime"]})
                batches = (2, 3) if mode == "dynamic" else (2,)
                refs = {}
                for b in batches:
                    xb = torch.randn(b, *shape, generator=torch.Generator().manual_seed(b))
                    with torch.no_grad():
                        refs[b] = (xb.numpy(), model(xb).double().numpy())
                forms = [("onnxruntime", columns[0]), ("generic", columns[1])] if has_inv else [("generic", columns[2])]
                for form, col in forms:
                    for rt in have:
                        cell = cells[(rt, col)]
                        cell.total += 1
                        try:
                            run = runtimes.load(rt, files[form])
                            errs = []
                            for xb, ref in refs.values():
                                got = run({"input": xb})[0].astype(np.float64)
                                errs.append(float(np.abs(got - ref).max() / np.abs(ref).max()))
                        except runtimes.RuntimeRefused as e:
                            cell.refused.append(str(e).split(": ", 1)[-1][:90])
                            continue
                        except Exception as e:  # a runtime failing at run time: a refusal too, say so
                            cell.refused.append(f"run: {str(e).strip().splitlines()[0][:80]}")
                            continue
                        if max(errs) <= TOL:
                            cell.ran += 1
                            cell.worst = max(cell.worst, max(errs))
                        else:
                            cell.refused.append(f"wrong output (rel err {max(errs):.2g})")
                console.print(f"{name} ({mode}): {time.perf_counter() - t0:.1f} s")

    table = Table(title="files that load and match PyTorch (max |err| <= 1e-4 * max |ref|), worst relative error")
    table.add_column("runtime")
    for col in columns:
        table.add_column(col)
    for rt in have:
        table.add_row(rt, *(cells[(rt, col)].text() for col in columns))
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

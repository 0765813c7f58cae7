"""Latency of RepVGG-A0 and RedNet-26 on CPU before and after fusion (through repconv.profile).

    python benchmarks/profile_models.py [--models repvgg_a0,rednet26] [--batch-sizes 1] [--seconds 3]
                                        [--runtime torch,onnxruntime] [--threads N] [--json out.json]

Each model is timed as built (training-time branches, eval mode) and fused, interleaved per
repetition, on each runtime; the table's ratio column is the per-pair fused/original latency with
its interquartile range.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from torch import nn

from repconv.profile.core import ProfileReport, profile_model
from repconv.profile.render import machine_summary, results_table, variants_table
from repconv.profile.report import write_report

MODELS: dict[str, tuple[str, str]] = {
    "repvgg_a0": ("repconv.blocks.models", "repvgg_a0"),
    "rednet26": ("repconv.blocks.rednet", "rednet26"),
}


def factory(name: str) -> Callable[[], nn.Module]:
    module, attr = MODELS[name]
    return getattr(importlib.import_module(module), attr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--seconds", type=float, default=3.0, help="timing budget per runtime and batch size")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runtime", default="torch,onnxruntime")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--json", default=None, help="write all results as one repconv profile report")
    args = p.parse_args(argv)
    console = Console(highlight=False, width=160)
    err = Console(stderr=True, highlight=False)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    reports: list[ProfileReport] = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            p.error(f"unknown model {name!r}; known: {', '.join(MODELS)}")
        try:
            model = factory(name)().eval()
        except (ImportError, AttributeError) as e:
            err.print(f"[yellow]skipping {name}: {e}[/yellow]")
            continue
        err.print(f"[bold]{name}[/bold]")
        reports.append(profile_model(
            model, (1, 3, args.input_size, args.input_size), model_name=name, runtimes=args.runtime.split(","),
            batch_sizes=sizes, threads=args.threads, warmup=args.warmup, seconds=args.seconds,
            progress=lambda msg: err.print(f"[dim]  {escape(msg)}[/dim]")))
    if not reports:
        return 1
    merged = ProfileReport(machine=reports[0].machine, config=reports[0].config,
                           results=[r for rep in reports for r in rep.results],
                           comparisons=[c for rep in reports for c in rep.comparisons],
                           notes=sorted({n for rep in reports for n in rep.notes}), created=reports[0].created)
    console.print(f"machine: {escape(machine_summary(merged.machine))}")
    console.print(results_table(merged, title=f"CPU latency, input {args.input_size}x{args.input_size}"))
    console.print(variants_table(merged))
    for note in merged.notes:
        console.print(f"note: {escape(note)}")
    if args.json:
        write_report(merged, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

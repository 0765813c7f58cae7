"""``repconv fuse`` and ``repconv inspect``."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import click
import torch
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from repconv.graph import FuseReport, region_kind, region_result
from repconv.pipeline import FuseInputError, fuse_with_report
from repconv.verification import DEFAULT_ATOL, DEFAULT_RTOL, VerificationError, VerifyReport

from .common import (
    CheckFailure,
    UsageFailure,
    atomic_output,
    console,
    input_shape_or_exit,
    load_model_or_exit,
    model_options,
)
from .quantize_cmd import calib_options, quant_inspect


@contextlib.contextmanager
def progress(description: str) -> Iterator[Progress]:
    """A spinner that only appears once work has taken over a second."""
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                   transient=True)
    bar.add_task(description, total=None)
    timer = threading.Timer(1.0, bar.start)
    timer.start()
    try:
        yield bar
    finally:
        timer.cancel()
        bar.stop()


def default_output(model: str) -> Path:
    path = Path(model)
    if path.exists():
        return path.with_name(f"{path.stem}.fused.pt")
    return Path(f"{model.rpartition(':')[2] or 'model'}.fused.pt")


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def print_report(report: FuseReport, title: str) -> None:
    table = Table(title=title, title_justify="left")
    for col in ("block", "kind", "branches → 1", "result", "params before", "params after"):
        table.add_column(col, justify="right" if col.startswith(("params", "branches")) else "left")
    for r in report.regions:
        table.add_row(r.block or "(top)", region_kind(r), f"{r.branches} → 1", region_result(r),
                      _fmt_params(r.params_before), _fmt_params(r.params_after))
    if report.regions:
        console.print(table)
    else:
        console.print("[yellow]no re-parameterizable structure found[/yellow]")
    for item in report.left:
        console.print(f"[yellow]left as is:[/yellow] {item.where}: {item.reason}")
    for item in report.untraced:
        console.print(f"[yellow]not traceable, fused its children instead:[/yellow] {item}")
    for note in report.notes:
        console.print(f"[cyan]note:[/cyan] {note}")
    console.print(f"parameters: {_fmt_params(report.params_before)} → {_fmt_params(report.params_after)}; "
                  f"{len(report.regions)} regions fused")


def print_verification(v: VerifyReport) -> None:
    status = "[green]OK[/green]" if v.ok else "[red]MISMATCH[/red]"
    console.print(f"verification {status} over {v.samples} input samples: {v.summary()}")


@click.command("fuse")
@model_options
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), default=None,
              help="Where to write the fused model (default: <model>.fused.pt).")
@click.option("--rtol", type=float, default=DEFAULT_RTOL, show_default=True,
              help="Allowed max |error| relative to max |reference output|.")
@click.option("--atol", type=float, default=DEFAULT_ATOL, show_default=True, help="Absolute error floor.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write the fusion report as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip the numerical check (not recommended).")
def fuse_command(model: str, weights: str | None, allow_pickle: bool, input_shape: str | None,
                 output: str | None, rtol: float, atol: float, report_path: str | None, no_verify: bool) -> None:
    """Collapse every re-parameterizable structure of MODEL into single convs / linears, verify, save."""
    if rtol < 0 or atol < 0:
        raise UsageFailure("--rtol and --atol must be non-negative")
    module = load_model_or_exit(model, weights, allow_pickle)
    shape, inferred = input_shape_or_exit(module, input_shape)
    if inferred:
        console.print(f"input shape {tuple(shape)} inferred from the first layer (override with --input-shape)")
    out = Path(output) if output else default_output(model)
    example = torch.randn(shape)
    try:
        with progress("fusing and verifying" if not no_verify else "fusing"):
            fused, report = fuse_with_report(module, example, verify=not no_verify, rtol=rtol, atol=atol)
    except FuseInputError as e:
        raise UsageFailure(str(e)) from None
    except VerificationError as e:
        print_verification(e.report)
        raise CheckFailure(f"fused model does not match (first diverging layer: {e.report.first_divergence}); "
                           "nothing written") from None
    print_report(report, f"fused {model}")
    if report.verification is not None:
        print_verification(report.verification)
    else:
        console.print("[yellow]verification skipped (--no-verify)[/yellow]")
    scripted = isinstance(module, torch.jit.ScriptModule)
    with atomic_output(out, protect=(model,)) as tmp:
        if scripted:  # TorchScript in, TorchScript out (the fused graph is static: tracing is exact)
            torch.jit.save(torch.jit.trace(fused, example, check_trace=False), str(tmp))
        else:
            torch.save(fused, tmp)
    console.print(f"wrote {out}")
    if report_path:
        with atomic_output(report_path, protect=(model, out)) as tmp:
            data = {"model": model, "output": str(out), **report.to_dict()}
            tmp.write_text(json.dumps(data, indent=2))
        console.print(f"wrote {report_path}")


@click.command("inspect")
@model_options
@click.option("--quant", is_flag=True, help="Also rank the fused layers by INT8 quantization risk (per channel, "
              "with the original branch behind each outlier).")
@calib_options
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write what inspect found (and the --quant analysis) as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="With --quant: a PNG of the riskiest layers' per-channel ranges (needs matplotlib).")
def inspect_command(model: str, weights: str | None, allow_pickle: bool, input_shape: str | None, quant: bool,
                    calib: str | None, calib_random: int | None, mean: str | None, std: str | None,
                    report_path: str | None, plot_path: str | None) -> None:
    """List the re-parameterizable structure found in MODEL; changes nothing."""
    if (plot_path or calib or calib_random is not None) and not quant:
        raise UsageFailure("--plot, --calib and --calib-random go with --quant")
    module = load_model_or_exit(model, weights, allow_pickle)
    shape, inferred = input_shape_or_exit(module, input_shape)
    if inferred:
        console.print(f"input shape {tuple(shape)} inferred from the first layer")
    try:
        fused, report = fuse_with_report(module, torch.randn(shape), verify=False)
    except FuseInputError as e:
        raise UsageFailure(str(e)) from None
    print_report(report, f"re-parameterizable structure in {model}")
    risk = quant_inspect(fused, report, shape, calib, calib_random, mean, std, plot_path, model) if quant else None
    if report_path:
        with atomic_output(report_path, protect=(model,)) as tmp:
            data = {"model": model, **report.to_dict(), **({"quant": risk.to_dict()} if risk else {})}
            tmp.write_text(json.dumps(data, indent=2))
        console.print(f"wrote {report_path}")

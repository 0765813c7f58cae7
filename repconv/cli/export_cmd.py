"""``repconv export MODEL --onnx OUT.onnx``: fuse, export, simplify and check in ONNX Runtime."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import click
import torch
from rich.markup import escape
from rich.table import Table

from repconv.cli.common import (
    CheckFailure,
    FiniteFloat,
    OutputPlan,
    PositiveInt,
    UsageFailure,
    command_help,
    console,
    model_options,
    no_clobber_option,
    prepare_model,
    print_table,
    say_wrote,
    step,
)

OUTPUT_RULE = ("\b\nOutputs (--onnx, --bundle) are checked before any work and written\n"
               "together at the end, only if the whole command succeeds. An existing\n"
               "--onnx file is replaced (and the output says so) unless --no-clobber;\n"
               "an existing bundle only with --force.")


@click.command("export", epilog=command_help(OUTPUT_RULE))
@model_options
@click.option("--onnx", "onnx_path", type=click.Path(), default=None, metavar="OUT.onnx",
              help="Write an ONNX file (checked in ONNX Runtime against PyTorch).")
@click.option("--bundle", "bundle_dir", type=click.Path(), default=None, metavar="DIR",
              help="Also write a self-contained device benchmark folder (ONNX, native op source, "
                   "benchmark.py, README).")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --bundle DIR.")
@click.option("--opset", type=PositiveInt, default=None, help="ONNX opset (default 17).")
@click.option("--dynamic-batch", is_flag=True, help="Make the batch axis symbolic (checked at two batch sizes).")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--no-fuse", is_flag=True, help="Export the model as is, without repconv's fusion pass.")
@click.option("--rtol", type=FiniteFloat(min=0), default=None,
              help="Relative tolerance of the ORT check (default 1e-4; float16: 8 ulps, 7.8e-3).")
@click.option("--atol", type=FiniteFloat(min=0), default=1e-5, show_default=True,
              help="Absolute tolerance of the ORT check.")
@no_clobber_option
def export_command(
    model: str,
    weights: str | None,
    allow_pickle: bool,
    input_shape: str | None,
    dtype: str | None,
    onnx_path: str | None,
    bundle_dir: str | None,
    force: bool,
    opset: int | None,
    dynamic_batch: bool,
    no_simplify: bool,
    no_fuse: bool,
    rtol: float | None,
    atol: float,
    no_clobber: bool,
) -> None:
    """Export MODEL for deployment: fuse, ONNX, onnxsim, ONNX checker, ONNX Runtime vs PyTorch."""
    from repconv.export.onnx import MAX_OPSET, MIN_OPSET

    if onnx_path is None and bundle_dir is None:
        raise UsageFailure("nothing to export: give --onnx OUT.onnx and/or --bundle DIR")
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageFailure(f"--opset {opset} is outside what the exporter supports ({MIN_OPSET}..{MAX_OPSET})")
    if dtype == "bfloat16":
        raise UsageFailure(f"--dtype bfloat16 cannot be exported: ONNX Conv takes bfloat16 only from opset 22, "
                           f"the exporter goes up to {MAX_OPSET}; use float16 or float32")
    if rtol is None:  # half precision: ORT and PyTorch round differently; 8 ulps as verification allows
        rtol = 8 * torch.finfo(torch.float16).eps if dtype == "float16" else 1e-4
    with OutputPlan(no_clobber=no_clobber, protect=[model, weights], say=say_wrote) as plan:
        onnx_out = plan.file(onnx_path, "--onnx", "onnx") if onnx_path else None
        bundle_out = plan.directory(bundle_dir, "--bundle", replace=force, what="bundle",
                                    is_ours=lambda p: (p / "bundle.json").is_file()) if bundle_dir else None
        module, example = prepare_model(model, weights, allow_pickle, input_shape, dtype)
        options = dict(opset=opset, dynamic_batch=dynamic_batch, simplify=not no_simplify, fuse=not no_fuse,
                       rtol=rtol, atol=atol)
        with tempfile.TemporaryDirectory(prefix="repconv-export-") as tmp:
            staged = onnx_out.staged if onnx_out is not None else Path(tmp) / "model.onnx"
            shown = onnx_out.path if onnx_out is not None else Path(bundle_dir or "") / "model.onnx"
            _write_onnx(module, staged, shown, example, **options)
            if bundle_out is not None:
                _write_bundle(staged, bundle_out.staged, bundle_out.path, model, tuple(example.shape),
                              "original" if no_fuse else "fused")


def _write_bundle(onnx_file: Path, staged: Path, shown: Path, spec: str, shape: tuple[int, ...],
                  variant: str) -> None:
    from repconv.profile.bundle import BundleError, write_bundle

    try:
        with step(f"writing the bundle {shown}"):
            write_bundle(onnx_file, staged, shape, model_name=spec, variant=variant, overwrite=True)
    except BundleError as e:
        raise UsageFailure(str(e)) from None
    console.print(f"bundle {escape(str(shown))}: copy it to the device, run "
                  "`python3 benchmark.py --json result.json`, then `repconv profile --import result.json`")


def _write_onnx(module: Any, staged: Path, shown: Path, example: torch.Tensor, **options: Any) -> None:
    from repconv.export.onnx import ExportCheckError, ExportError, export_onnx_with_report

    try:
        with step("exporting"):
            report = export_onnx_with_report(module, staged, example, **options)
    except ExportCheckError as e:
        raise CheckFailure(f"{e} - nothing written") from None
    except ExportError as e:
        raise UsageFailure(str(e)) from None
    _print_report(report, str(shown), example)


def _fmt_shape(shape: Any) -> str:
    return "x".join(str(int(d)) for d in shape)


def _print_report(report: Any, out: str, example: torch.Tensor) -> None:
    console.print(f"[bold green]exported[/bold green] {escape(out)}  (opset {report.opset}, IR {report.ir_version}, "
                  f"{report.exporter} exporter, input {_fmt_shape(example.shape)}, {report.seconds:.1f} s)")
    if report.fused:
        console.print(f"fused: {len(report.fused)} region(s)")
        for line in report.fused[:12]:
            console.print(f"  {line}", markup=False)
        if len(report.fused) > 12:
            console.print(f"  ... and {len(report.fused) - 12} more")
    elif report.fuse_note is None:
        console.print("fused: nothing to fuse")
    if report.fuse_note:  # a skipped fusion means an unfused export: say it loudly
        style = "yellow" if report.fuse_note.startswith("fusion skipped") else "dim"
        console.print(f"[{style}]fusion: {escape(report.fuse_note)}[/{style}]")
    for m in report.involutions:
        console.print(f"recognised involution (unfold code) in {m.where or '<model>'}: K={m.kernel_size} "
                      f"stride={m.stride} dilation={m.dilation} groups={m.groups} -> ai.repconv::Involution")
    if report.simplified:
        console.print(f"nodes: {report.nodes_exported} exported -> {report.nodes_final} after onnxsim")
    else:
        why = report.simplify_note or "simplification off"
        console.print(f"nodes: {report.nodes_final} ({why})")
    if report.custom_nodes:
        console.print(f"custom nodes: {report.custom_nodes} x ai.repconv::Involution "
                      "(model-local function attached: plain ONNX Runtime runs it)")
    else:
        console.print("custom nodes: none (plain ONNX)")
    ops = ", ".join(f"{k} {v}" for k, v in sorted(report.op_counts.items(), key=lambda kv: -kv[1]))
    console.print(f"[dim]ops: {ops}[/dim]")

    table = Table(title="ONNX Runtime vs PyTorch", title_justify="left")
    for col in ("runtime", "batch", "max abs err", "max rel err", "result"):
        table.add_column(col, justify="right" if col in ("batch", "max abs err", "max rel err") else "left")
    for c in report.checks:
        table.add_row(c.runtime, str(c.batch), f"{c.max_abs:.2e}", f"{c.max_rel:.2e}",
                      "[green]ok[/green]" if c.ok else "[red]FAIL[/red]")
    print_table(table)
    if report.custom_nodes:
        if not report.native_available:
            console.print("native kernel: not built (ran the function fallback; "
                          "`repconv build-native` builds it)")
        elif report.native_used:
            console.print("native kernel: [green]used[/green] (repconv.runtime.session_options())")
        else:
            console.print("native kernel: [yellow]registered but not used[/yellow] (ORT ran the function)")
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}")

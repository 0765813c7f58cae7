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
    UsageFailure,
    atomic_output,
    console,
    input_shape_or_exit,
    load_model_or_exit,
    model_options,
)


@click.command("export")
@model_options
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), default=None, metavar="OUT.onnx",
              help="Write an ONNX file (checked in ONNX Runtime against PyTorch).")
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Also write a self-contained device benchmark folder (ONNX, native op source, "
                   "benchmark.py, README).")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --bundle DIR.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 17).")
@click.option("--dynamic-batch", is_flag=True, help="Make the batch axis symbolic (checked at two batch sizes).")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--no-fuse", is_flag=True, help="Export the model as is, without repconv's fusion pass.")
@click.option("--rtol", type=float, default=1e-4, show_default=True, help="Relative tolerance of the ORT check.")
@click.option("--atol", type=float, default=1e-5, show_default=True, help="Absolute tolerance of the ORT check.")
@click.option("--target", type=click.Choice(["generic", "onnxruntime", "openvino", "tract"]), default="generic",
              show_default=True, help="Runtime the file is for: onnxruntime keeps the custom Involution op (native "
                                      "kernel); the others write it as standard ops that every runtime runs.")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True,
              help="torch.export-based exporter, or torch's older TorchScript tracer.")
@click.option("--allow-specialize", is_flag=True,
              help="Export data-dependent Python control flow anyway, keeping the branch the example takes.")
def export_command(
    model: str,
    weights: str | None,
    allow_pickle: bool,
    input_shape: str | None,
    onnx_path: str | None,
    bundle_dir: str | None,
    force: bool,
    opset: int | None,
    dynamic_batch: bool,
    no_simplify: bool,
    no_fuse: bool,
    rtol: float,
    atol: float,
    target: str,
    exporter: str,
    allow_specialize: bool,
) -> None:
    """Export MODEL (a saved model file or package.module:factory) for deployment."""
    if onnx_path is None and bundle_dir is None:
        raise UsageFailure("nothing to export: give --onnx OUT.onnx and/or --bundle DIR")
    if rtol < 0 or atol < 0:
        raise UsageFailure("--rtol and --atol must be >= 0")
    module = load_model_or_exit(model, weights, allow_pickle)
    shape, inferred = input_shape_or_exit(module, input_shape)
    if inferred:
        console.print(f"[dim]input shape {_fmt_shape(shape)} inferred from the first layer "
                      "(pass --input-shape to change)[/dim]")
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    options = dict(opset=opset, dynamic_batch=dynamic_batch, simplify=not no_simplify, fuse=not no_fuse,
                   rtol=rtol, atol=atol, target=target, exporter=exporter, allow_specialize=allow_specialize)
    from repconv.profile.bundle import BUNDLE_TARGET

    with tempfile.TemporaryDirectory() as tmp:
        # the bundle gets the form its on-device benchmark (ONNX Runtime) needs, whatever --target says
        source = str(Path(tmp) / "model.onnx") if bundle_dir is not None else None
        if onnx_path is not None:
            _write_onnx(module, model, onnx_path, example, bundle_onnx=source, **options)
        elif source is not None:
            _write_onnx(module, model, source, example, **{**options, "target": BUNDLE_TARGET})
        if bundle_dir is not None and source is not None:
            _write_bundle(source, bundle_dir, model, tuple(example.shape), "original" if no_fuse else "fused", force)


def _write_bundle(onnx_file: str, bundle_dir: str, spec: str, shape: tuple[int, ...], variant: str,
                  force: bool) -> None:
    from repconv.profile.bundle import BundleError, write_bundle

    try:
        out = write_bundle(onnx_file, bundle_dir, shape, model_name=spec, variant=variant, overwrite=force)
    except BundleError as e:
        raise UsageFailure(str(e)) from None
    console.print(f"bundle {escape(str(out))}: copy it to the device, run "
                  "`python3 benchmark.py --json result.json`, then `repconv profile --import result.json`")


def _write_onnx(module: Any, spec: str, out: str, example: torch.Tensor, bundle_onnx: str | None = None,
                **options: Any) -> None:
    from repconv.export.onnx import ExportCheckError, ExportError, export_onnx_with_report
    from repconv.profile.bundle import BUNDLE_TARGET

    extra = {BUNDLE_TARGET: bundle_onnx} if bundle_onnx else None
    try:
        with atomic_output(out, protect=(spec,)) as tmp:
            report = export_onnx_with_report(module, tmp, example, extra_targets=extra, **options)
    except ExportCheckError as e:
        raise CheckFailure(f"{e} - nothing written") from None
    except ExportError as e:
        raise UsageFailure(str(e)) from None
    _print_report(report, out, example)


def _fmt_shape(shape: Any) -> str:
    return "x".join(str(int(d)) for d in shape)


def _print_report(report: Any, out: str, example: torch.Tensor) -> None:
    console.print(f"[bold green]exported[/bold green] {out}  (opset {report.opset}, IR {report.ir_version}, "
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
    console.print(table)
    if report.custom_nodes:
        if not report.native_available:
            console.print("native kernel: not built (ran the function fallback; "
                          "`repconv build-native` builds it)")
        elif report.native_used:
            console.print("native kernel: [green]used[/green] (repconv.runtime.session_options())")
        else:
            console.print("native kernel: [yellow]registered but not used[/yellow] (ORT ran the function)")
    for note in report.notes:
        console.print(note, markup=False)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}")

"""``repconv compare REF CAND``: per-layer error of one model against another; first diverging layer;
``--sensitivity``: INT8 sensitivity of each layer of REF, quantized alone."""

from __future__ import annotations

import json
from typing import Any

import click
import numpy as np
import torch
from rich.markup import escape
from rich.table import Table

from repconv.cli.common import (
    CheckFailure,
    FiniteFloat,
    OutputPlan,
    UsageFailure,
    command_help,
    console,
    input_shape_or_exit,
    no_clobber_option,
    print_table,
    say_wrote,
)
from repconv.cli.quantize_cmd import _db, batches_or_exit, load_any, load_calibration, warn_random


@click.command("compare", epilog=command_help())
@click.argument("reference", metavar="REF")
@click.argument("candidate", metavar="[CAND]", required=False)
@click.option("--per-layer", is_flag=True, help="Compare every layer the two models share, not only the outputs.")
@click.option("--inputs", default=None, metavar="PATH",
              help="Inputs to compare on: a directory of images or of .npy batches, or one .npy file.")
@click.option("--random", "random_n", type=int, default=None, metavar="N",
              help="Compare on N random normal inputs (the default, with N=4, when --inputs is not given).")
@click.option("--mean", default=None, metavar="M[,M,M]", help="Subtract this from image pixels (in [0, 1]).")
@click.option("--std", default=None, metavar="S[,S,S]", help="Then divide image pixels by this.")
@click.option("--rtol", type=FiniteFloat(min=0), default=1e-4, show_default=True,
              help="A layer diverges when max|err| > atol + rtol * max|ref|.")
@click.option("--atol", type=FiniteFloat(min=0), default=1e-5, show_default=True, help="Absolute error floor.")
@click.option("--min-sqnr", type=FiniteFloat(), default=None, metavar="DB",
              help="Instead of rtol/atol: a layer diverges when its SQNR falls below DB (e.g. 30 for INT8).")
@click.option("--sensitivity", is_flag=True,
              help="Quantize each layer of REF alone (ORT static INT8) and report the output SQNR per layer.")
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="Calibration method for --sensitivity.")
@click.option("--reduce-range/--no-reduce-range", "reduce_range", default=None,
              help="--sensitivity: 7-bit weights (default: on x86 CPUs without VNNI, as `repconv quantize`).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None, help="Write JSON here.")
@click.option("--input-shape", "input_shape", default=None,
              help="Input shape when both models are PyTorch (default: inferred from the first layer).")
@click.option("--allow-pickle", is_flag=True,
              help="Allow loading full pickled modules (runs code from the files; only for trusted files).")
@no_clobber_option
def compare_command(reference: str, candidate: str | None, per_layer: bool, inputs: str | None, random_n: int | None,
                    mean: str | None, std: str | None, rtol: float, atol: float, min_sqnr: float | None,
                    sensitivity: bool, method: str, reduce_range: bool | None, report_path: str | None,
                    input_shape: str | None, allow_pickle: bool, no_clobber: bool) -> None:
    """Compare CAND against REF: a PyTorch model and an ONNX file, two ONNX files (fp32 vs INT8) or two
    PyTorch models. Exit 1 when the outputs (or, with --per-layer, any layer) exceed the tolerance."""
    if candidate is None and not sensitivity:
        raise UsageFailure("give CAND to compare with, or --sensitivity to rank REF's layers for INT8")
    with OutputPlan(no_clobber=no_clobber, protect=[reference, candidate, inputs], say=say_wrote) as plan:
        rep = plan.file(report_path, "--report", "json") if report_path else None
        out = _compare(reference, candidate, per_layer, inputs, random_n, mean, std, rtol, atol, min_sqnr,
                       sensitivity, method, reduce_range, input_shape, allow_pickle)
        if out.get("compare") and not out["compare"]["ok"]:  # a finding, not a result to keep: nothing written
            raise CheckFailure("the candidate exceeds the tolerance" + (
                f" (first diverging layer: {out['compare']['first_divergence']})" if per_layer else ""))
        if rep is not None:
            rep.staged.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


def _compare(reference: str, candidate: str | None, per_layer: bool, inputs: str | None, random_n: int | None,
             mean: str | None, std: str | None, rtol: float, atol: float, min_sqnr: float | None,
             sensitivity: bool, method: str, reduce_range: bool | None, input_shape: str | None,
             allow_pickle: bool) -> dict[str, Any]:
    ref = load_any(reference, allow_pickle)
    cand = load_any(candidate, allow_pickle) if candidate is not None else None
    shape = _shape(ref, cand, input_shape)
    samples, source, random = load_calibration(inputs, random_n, shape, mean, std, default_random=4)
    if random and sensitivity:
        warn_random()
    data = batches_or_exit(samples, shape[0])
    out: dict[str, Any] = {"reference": reference, "candidate": candidate, "inputs": source}
    if cand is not None:
        from repconv.quant.compare import CompareError, compare_models
        from repconv.quant.ort_quant import QuantizeError

        try:
            result = compare_models(ref, cand, data, per_layer=per_layer, rtol=rtol, atol=atol, min_sqnr=min_sqnr)
        except (CompareError, QuantizeError) as e:
            raise UsageFailure(str(e)) from None
        _print_compare(result, reference, candidate, source, per_layer)
        out["compare"] = result.to_dict()
    if sensitivity:
        out["sensitivity"] = _sensitivity(ref, reference, data, method, reduce_range, source, shape)
    return out


def _shape(ref: Any, cand: Any, text: str | None) -> tuple[int, ...]:
    import onnx

    from repconv.quant.ort_quant import QuantizeError, input_info

    shapes = []
    for m in (ref, cand):
        if isinstance(m, onnx.ModelProto):
            try:
                shapes.append(input_info(m)[2])
            except QuantizeError as e:
                raise UsageFailure(str(e)) from None
    if shapes:
        if text:
            raise UsageFailure("--input-shape goes with two PyTorch models; an ONNX file has its own")
        if len(shapes) == 2 and shapes[0] != shapes[1]:
            raise UsageFailure(f"the ONNX files take different inputs: {shapes[0]} vs {shapes[1]}")
        return tuple(shapes[0])
    shape, inferred = input_shape_or_exit(ref, text)
    if inferred:
        console.print(f"input shape {tuple(shape)} inferred from the first layer (override with --input-shape)")
    return tuple(shape)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _print_compare(result: Any, reference: str, candidate: str, source: str, per_layer: bool) -> None:
    crit = (f"SQNR < {result.min_sqnr:g} dB" if result.min_sqnr is not None
            else f"max|err| > {result.atol:g} + {result.rtol:g}*max|ref|")
    if per_layer:
        table = Table(title=f"{candidate} vs {reference}, per layer ({result.matching}; {source})",
                      title_justify="left")
        for col, just in (("layer", "left"), ("op", "left"), ("max abs", "right"), ("max rel", "right"),
                          ("cosine", "right"), ("SQNR dB", "right")):
            table.add_column(col, justify=just)
        for d in result.layers:
            s = d.stats
            table.add_row(escape(d.label), escape(d.op), _fmt(s.max_abs), _fmt(s.max_rel), f"{s.cosine:.6f}",
                          _db(s.sqnr_db), style="red" if d.diverged else None)
        print_table(table)
        if not result.layers:
            console.print("[yellow]no layers matched by name: compared the outputs only[/yellow]")
    o = result.output
    status = "[red]DIFFERS[/red]" if result.output_diverged else "[green]OK[/green]"
    console.print(f"outputs {status}: max abs {_fmt(o.max_abs)}, max rel {_fmt(o.max_rel)}, cosine {o.cosine:.6f}, "
                  f"SQNR {_db(o.sqnr_db)} dB over {result.samples} samples (diverges when {crit})")
    for note in result.notes:
        console.print(f"[cyan]note:[/cyan] {escape(note)}")
    if per_layer:
        console.print(f"first diverging layer: {escape(result.first_divergence or 'none')}")
    elif result.output_diverged:
        console.print("run with --per-layer to find the first diverging layer")


def _sensitivity(ref: Any, spec: str, data: list[np.ndarray], method: str, reduce_range: bool | None, source: str,
                 shape: tuple[int, ...]) -> dict[str, Any]:
    import onnx

    from repconv.export.onnx import ExportError
    from repconv.quant.ort_quant import QuantizeError, export_fp32, is_quantized
    from repconv.quant.sensitivity import sensitivity

    if isinstance(ref, onnx.ModelProto):
        if is_quantized(ref):
            raise UsageFailure("--sensitivity needs an fp32 REF; this ONNX file is already quantized")
        fp32 = ref
    else:
        try:
            fp32, _ = export_fp32(ref, torch.randn(shape, generator=torch.Generator().manual_seed(0)))
        except ExportError as e:
            raise UsageFailure(str(e)) from None
    try:
        rep = sensitivity(fp32, data, data, method=method, reduce_range=reduce_range)
    except QuantizeError as e:
        raise CheckFailure(str(e)) from None
    table = Table(title=f"INT8 sensitivity of {spec}: each layer quantized alone ({method}; calibrated and "
                        f"measured on {source})", title_justify="left")
    for col, just in (("rank", "right"), ("layer", "left"), ("op", "left"), ("output SQNR dB", "right"),
                      ("cosine", "right"), ("max rel", "right"), ("top-1 agreement", "right")):
        table.add_column(col, justify=just)
    for i, lay in enumerate(rep.layers, 1):
        d = lay.drift
        top1 = f"{100 * d.top1_agreement:.1f}%" if d.top1_agreement is not None else "-"
        table.add_row(str(i), escape(lay.label), lay.op, _db(d.sqnr_db), f"{d.cosine:.6f}", _fmt(d.max_rel), top1)
    print_table(table, keys=2)
    for note in rep.notes:
        console.print(f"[cyan]note:[/cyan] {escape(note)}")
    return rep.to_dict()

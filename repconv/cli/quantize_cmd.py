"""``repconv quantize MODEL -o OUT.onnx``: fuse, export fp32, ORT static INT8 quantization, drift and latency.

Also the calibration options and the risk table that ``repconv inspect --quant`` and ``repconv compare``
share."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import numpy as np
import torch
from rich.markup import escape
from rich.table import Table

from repconv.cli.common import (
    CheckFailure,
    OutputPlan,
    UsageFailure,
    command_help,
    console,
    err_console,
    input_shape_or_exit,
    load_model_or_exit,
    no_clobber_option,
    print_table,
    say_wrote,
)

F = TypeVar("F", bound=Callable[..., Any])


# --------------------------------------------------------------------------- calibration options

def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageFailure(f"{what} must be comma-separated numbers, got {text!r}") from None


def calib_options(f: F) -> F:
    """--calib / --calib-random / --mean / --std."""
    f = click.option("--std", default=None, metavar="S[,S,S]",
                     help="Divide image pixels (in [0, 1]) by this per channel, after --mean.")(f)
    f = click.option("--mean", default=None, metavar="M[,M,M]",
                     help="Subtract this from image pixels (in [0, 1]) per channel, e.g. 0.485,0.456,0.406.")(f)
    f = click.option("--calib-random", "calib_random", type=int, default=None, metavar="N",
                     help="Calibrate on N random normal inputs (a smoke test: the figures mean little).")(f)
    f = click.option("--calib", "calib", default=None, metavar="PATH",
                     help="Calibration data: a directory of images or of .npy batches, or one .npy file.")(f)
    return f


def load_calibration(calib: str | None, calib_random: int | None, shape: tuple[int, ...], mean: str | None,
                     std: str | None, *, default_random: int | None = None, seed: int = 0
                     ) -> tuple[np.ndarray, str, bool]:
    """(samples, description, random?) from the calibration options; exits 2 on bad input."""
    from repconv.quant.calib import CalibrationError, load_samples, random_samples

    if calib is not None and calib_random is not None:
        raise UsageFailure("give --calib or --calib-random, not both")
    try:
        if calib is not None:
            samples = load_samples(calib, shape, mean=_floats(mean, "--mean"), std=_floats(std, "--std"))
            return samples, f"{len(samples)} samples from {calib}", False
        n = calib_random if calib_random is not None else default_random
        if n is None:
            raise UsageFailure("no calibration data: give --calib DIR (images or .npy batches) or --calib-random N")
        return random_samples(n, shape, seed), f"{n} random normal samples", True
    except CalibrationError as e:
        raise UsageFailure(str(e)) from None


def warn_random() -> None:
    from repconv.quant.calib import RANDOM_NOTE

    err_console.print(f"[bold yellow]WARNING:[/bold yellow] [yellow]{escape(RANDOM_NOTE)}[/yellow]")


def batches_or_exit(samples: np.ndarray, batch: int) -> list[np.ndarray]:
    from repconv.quant.calib import CalibrationError, batches

    try:
        return batches(samples, batch)
    except CalibrationError as e:
        raise UsageFailure(str(e)) from None


def load_any(spec: str, allow_pickle: bool, weights: str | None = None) -> Any:
    """An fp32 / INT8 ONNX file as a ModelProto, anything else through repconv's model loader."""
    if spec.lower().endswith(".onnx"):
        import onnx

        path = Path(spec)
        if not path.is_file():
            raise UsageFailure(f"{spec}: no such file")
        try:
            return onnx.load(path)
        except Exception as e:
            raise UsageFailure(f"{spec} is not a readable ONNX file: {str(e).splitlines()[0][:160]}") from None
    return load_model_or_exit(spec, weights, allow_pickle)


# --------------------------------------------------------------------------- risk table (inspect --quant)

def _db(v: float) -> str:
    return "inf" if v == float("inf") else f"{v:.1f}"


def _outlier_text(lr: Any) -> str:
    top = lr.top_outlier
    if top is None:
        return "-"
    what, o = top
    text = f"{'act' if what == 'activation' else 'w'} ch {o.channel} x{o.ratio:.1f}"
    if o.top is not None:
        text += f" <- {o.top.label} ({'+'.join(o.top.ops) or '?'}) {100 * o.top.share:.0f}%"
    return text


def _layer_text(lr: Any, blocks: dict[str, str]) -> str:
    """The fused layer's name, with the block name of the fuse table when the layer name does not say it
    (``reparam (0+1)`` for a conv+BN spanning two children of a Sequential)."""
    block = blocks.get(lr.name, lr.block)
    if block and block != lr.name and not lr.name.startswith(f"{block}."):
        return f"{lr.name} ({block})"
    return lr.name


def block_names(fuse_report: Any) -> dict[str, str]:
    """Fused module path -> the block name the fuse table gives its region."""
    from repconv.cli.fuse_cmd import region_names

    if fuse_report is None:
        return {}
    regions = fuse_report.regions
    return {(getattr(r, "module_path", "") or r.target): name for r, name in zip(regions, region_names(regions),
                                                                                 strict=True)}


def print_risk(report: Any, title: str, top: int | None = None, blocks: dict[str, str] | None = None) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("layer", no_wrap=True)
    for col in ("output SQNR dB", "layer SQNR dB", "w / in / out dB", "w max/med (n)", "act max/med (n)"):
        table.add_column(col, justify="right")
    table.add_column("worst outlier <- branch")
    for lr in report.layers[:top]:
        n_out = len(lr.weight_outliers) + len(lr.act_outliers)
        style = "red" if lr.rank == 1 and n_out else None
        table.add_row(str(lr.rank), escape(_layer_text(lr, blocks or {})), _db(lr.risk_sqnr_db), _db(lr.sqnr_db),
                      f"{_db(lr.weight_sqnr_db)} / {_db(lr.input_sqnr_db)} / {_db(lr.output_sqnr_db)}",
                      f"{lr.weight_ratio:.1f} ({len(lr.weight_outliers)})",
                      f"{lr.act_ratio:.1f} ({len(lr.act_outliers)})", escape(_outlier_text(lr)), style=style)
    print_table(table, keys=2)  # rank and layer repeat if the columns must be split
    console.print(f"[dim]output SQNR: the model's output with only that layer in INT8 (per-tensor 8-bit "
                  f"activations, per-channel {'7' if report.reduce_range else '8'}-bit weights as `repconv quantize` "
                  f"makes them here, ranges from {report.samples} calibration samples); "
                  "layer SQNR: that layer's own rounding noise predicted from its weight / input / output ranges; "
                  f"outliers: channels at >= {report.outlier_ratio:g}x the layer's median abs-max[/dim]")
    for note in report.notes:
        console.print(f"[cyan]note:[/cyan] {escape(note)}")


def quant_inspect(fused: torch.nn.Module, fuse_report: Any, shape: tuple[int, ...], calib: str | None,
                  calib_random: int | None, mean: str | None, std: str | None, plot_path: Path | None,
                  spec: str) -> Any:
    """The ``inspect --quant`` part: risk analysis on calibration data, table, optional plot."""
    from repconv.quant.risk import analyze_risk

    samples, source, random = load_calibration(calib, calib_random, shape, mean, std, default_random=8)
    if random:
        warn_random()
    data = [torch.from_numpy(b) for b in batches_or_exit(samples, shape[0])]
    try:
        risk = analyze_risk(fused, fuse_report, data)
    except Exception as e:  # the model does not run on this data
        raise UsageFailure(f"cannot run the fused model on the calibration data: {str(e).splitlines()[0][:200]}"
                           ) from None
    print_risk(risk, f"INT8 quantization risk of {spec} (fused), on {source}", blocks=block_names(fuse_report))
    if plot_path:
        from repconv.profile.plot import PlotUnavailable
        from repconv.quant.plot import plot_risk

        try:
            plot_risk(risk, plot_path)  # a staged path of the caller's OutputPlan
        except PlotUnavailable as e:
            raise UsageFailure(str(e)) from None
    return risk


# --------------------------------------------------------------------------- repconv quantize

@click.command("quantize", epilog=command_help())
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), metavar="OUT.onnx",
              help="Where to write the INT8 ONNX model (QDQ format).")
@calib_options
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="How ONNX Runtime turns calibration activations into ranges.")
@click.option("--reduce-range/--no-reduce-range", "reduce_range", default=None,
              help="7-bit weights (default: on x86 CPUs without VNNI, whose u8 x s8 kernels saturate with 8 bits).")
@click.option("--holdout", type=int, default=None,
              help="Samples kept out of calibration to measure drift (default: a fifth of --calib, at least 1; "
                   "with --calib-random N, N/4 fresh random ones).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write drift, latency and what was quantized as JSON.")
@click.option("--no-latency", is_flag=True, help="Skip the fp32 vs INT8 latency measurement.")
@click.option("--input-shape", "input_shape", default=None,
              help="Input shape, e.g. 1,3,224,224 (default: inferred from the first layer; the batch is the "
                   "calibration batch).")
@click.option("--weights", default=None, type=click.Path(dir_okay=False),
              help="State-dict file for a 'package.module:factory' MODEL.")
@click.option("--allow-pickle", is_flag=True,
              help="Allow loading a full pickled module (runs code from the file; only for trusted files).")
@no_clobber_option
def quantize_command(model: str, output: str, calib: str | None, calib_random: int | None, mean: str | None,
                     std: str | None, method: str, reduce_range: bool | None, holdout: int | None,
                     report_path: str | None, no_latency: bool, input_shape: str | None, weights: str | None,
                     allow_pickle: bool, no_clobber: bool) -> None:
    """Quantize MODEL to INT8 with ONNX Runtime (QDQ, per-channel weights) and measure the drift.

    MODEL is anything `repconv fuse` takes (fused and exported first, as `repconv export` does) or an
    fp32 .onnx file. Nothing is written unless the INT8 model loads and runs in ONNX Runtime."""
    import onnx

    if holdout is not None and holdout < 1:
        raise UsageFailure("--holdout must be at least 1")
    with OutputPlan(no_clobber=no_clobber, protect=[model, weights, calib], say=say_wrote) as plan:
        out = plan.file(output, "-o", "onnx")
        rep = plan.file(report_path, "--report", "json") if report_path else None
        result, random = _quantize(model, calib, calib_random, mean, std, method, reduce_range, holdout,
                                   no_latency, input_shape, weights, allow_pickle)
        _print_quantized(result, model)
        onnx.save(result.model, out.staged)
        if rep is not None:
            rep.staged.write_text(json.dumps({"model": model, "output": output, "random_calibration": random,
                                              **result.to_dict()}, indent=2) + "\n", encoding="utf-8")


def _quantize(model: str, calib: str | None, calib_random: int | None, mean: str | None, std: str | None,
              method: str, reduce_range: bool | None, holdout: int | None, no_latency: bool,
              input_shape: str | None, weights: str | None, allow_pickle: bool) -> tuple[Any, bool]:
    import onnx

    from repconv.export.onnx import ExportCheckError, ExportError
    from repconv.quant.ort_quant import QuantizeError, export_fp32, input_info, quantize_fp32

    loaded = load_any(model, allow_pickle, weights)
    export_note: list[str] = []
    if isinstance(loaded, onnx.ModelProto):
        if input_shape:
            raise UsageFailure("--input-shape goes with a PyTorch MODEL; an ONNX file has its own")
        fp32 = loaded
        try:
            shape = input_info(fp32)[2]
        except QuantizeError as e:
            raise UsageFailure(str(e)) from None
    else:
        shape, inferred = input_shape_or_exit(loaded, input_shape)
        if inferred:
            console.print(f"input shape {tuple(shape)} inferred from the first layer (override with --input-shape)")
        try:
            fp32, exported = export_fp32(loaded, torch.randn(shape, generator=torch.Generator().manual_seed(0)))
        except ExportCheckError as e:
            raise CheckFailure(f"{e} - nothing written") from None
        except ExportError as e:
            raise UsageFailure(str(e)) from None
        console.print(f"fp32 ONNX: {len(fp32.graph.node)} nodes, {len(exported.fused)} fused regions, "
                      f"checked against PyTorch (max abs err {exported.max_abs:.2g})")
        if exported.fuse_note:
            export_note.append(exported.fuse_note)
    samples, source, random = load_calibration(calib, calib_random, shape, mean, std)
    if random:
        warn_random()
        held = holdout or max(1, len(samples) // 4)
        cal, evaluate = samples, load_calibration(None, held, shape, None, None, seed=1)[0]
    else:
        from repconv.quant.calib import CalibrationError, split_holdout

        try:
            cal, evaluate = split_holdout(samples, holdout or max(1, len(samples) // 5))
        except CalibrationError as e:
            raise UsageFailure(str(e)) from None
    try:
        result = quantize_fp32(fp32, cal, evaluate, method=method, reduce_range=reduce_range, calibration=source,
                               latency=not no_latency, notes=export_note)
    except QuantizeError as e:
        raise CheckFailure(f"{e} - nothing written") from None
    except ValueError as e:  # calibration batches (sizes) that do not fit the model
        raise UsageFailure(str(e)) from None
    return result, random




def _print_quantized(result: Any, spec: str) -> None:
    d = result.drift
    bits = "7-bit (reduce range)" if result.reduce_range else "8-bit"
    console.print(f"INT8 (QDQ, per-channel {bits} weights, {result.method} calibration on {result.calib_samples} "
                  f"samples): {result.quantized_nodes} nodes quantized")
    table = Table(title=f"drift of INT8 {spec} vs fp32 on {d.samples} held-out samples", title_justify="left")
    for col in ("SQNR dB", "cosine", "max rel err", "max abs err", "top-1 agreement"):
        table.add_column(col, justify="right")
    top1 = f"{100 * d.top1_agreement:.1f}%" if d.top1_agreement is not None else "n/a (not a classifier)"
    table.add_row(_db(d.sqnr_db), f"{d.cosine:.6f}", f"{d.max_rel:.3g}", f"{d.max_abs:.3g}", top1)
    print_table(table)
    lat = result.latency
    if lat is not None:
        native = ", native ops" if lat.native_ops else ""
        console.print(f"ONNX Runtime latency, batch {lat.batch}{native}: fp32 {lat.fp32_ms:.3f} ms, INT8 "
                      f"{lat.int8_ms:.3f} ms, INT8/fp32 {lat.ratio:.2f} (p25 {lat.ratio_p25:.2f}, p75 "
                      f"{lat.ratio_p75:.2f}; {lat.repetitions} interleaved repetitions)")
    for note in result.notes:
        console.print(f"[cyan]note:[/cyan] {escape(note)}")

"""``repconv profile``: latency before and after fusion (parsing and printing only; see repconv.profile)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.markup import escape

from repconv.cli.common import (
    DTYPES,
    Announcer,
    CheckFailure,
    OutputPlan,
    UsageFailure,
    apply_dtype,
    check_input_size,
    check_runs,
    command_help,
    console,
    example_input,
    input_shape_or_exit,
    load_model_or_exit,
    model_options,
    no_clobber_option,
    print_table,
    say_wrote,
)
from repconv.io import ModelLoadError, parse_shape
from repconv.profile.core import DEFAULT_SECONDS, DEFAULT_WARMUP, ProfileReport, profile_model
from repconv.profile.render import (
    baseline_table,
    machine_summary,
    per_op_tables,
    results_table,
    variants_table,
)
from repconv.profile.report import compare_to_baseline, load_report, write_report
from repconv.profile.runtimes import RUNTIMES, MeasurementError, ProfileError, check_device, runtime_problems


def _positive_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise UsageFailure(f"{what} {text!r} is not a comma-separated list of integers") from None
    if not values or any(v <= 0 for v in values):
        raise UsageFailure(f"{what} must be positive integers, got {text!r}")
    return values


def _runtimes(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [r.strip() for r in text.split(",") if r.strip()]
    if names == ["all"]:
        return names
    unknown = [r for r in names if r not in RUNTIMES]
    if unknown or not names:
        import torch

        usable = [r for r, why in runtime_problems(torch.device("cpu"), modules=True, scripted=False).items()
                  if why is None]
        raise UsageFailure(f"unknown runtime {', '.join(map(repr, unknown)) or repr(text)}; "
                           f"known: {', '.join(RUNTIMES)} (usable here: {', '.join(usable)})")
    return names


def _load(spec: str, weights: str | None, allow_pickle: bool) -> Any:
    """An .onnx path stays a path (onnxruntime only); anything else goes through repconv.io.load_model."""
    if spec.lower().endswith(".onnx"):
        if weights:
            raise UsageFailure("--weights goes with a 'package.module:factory' MODEL, not an ONNX file")
        if not Path(spec).is_file():
            raise UsageFailure(f"{spec}: no such file")
        return Path(spec)
    return load_model_or_exit(spec, weights, allow_pickle)


def _print(renderable: Any, keys: int = 1) -> None:
    # In a terminal the table is fitted to its width without cutting numbers (print_table); a file or
    # pipe has no width to respect, so the table gets its natural width there (at least 160 columns).
    if console.is_terminal:
        print_table(renderable, keys)
        return
    natural = Console(width=100_000).measure(renderable).maximum
    Console(highlight=False, width=max(160, natural)).print(renderable)


MAX_SECONDS = 86400  # a day per runtime and batch size: beyond that it is a typo, not a benchmark
OUTPUT_RULE = ("\b\nOutputs (--json, --plot) are checked before any measurement and written\n"
               "together at the end, only if the whole command succeeds (a --baseline\n"
               "regression, exit 1, writes nothing). An existing file is replaced (and\n"
               "the output says so) unless --no-clobber.")


@click.command("profile", epilog=command_help(
    "\b\nMODEL may also be an .onnx file (onnxruntime only).", OUTPUT_RULE))
@model_options
@click.option("--compare", "compare", default=None, metavar="OTHER",
              help="Profile OTHER (model spec or .onnx) against MODEL instead of MODEL's fused form.")
@click.option("--no-fuse", is_flag=True, help="Profile MODEL as given only (no fused variant).")
@click.option("--runtime", "runtime", default=None, metavar="LIST",
              help=f"Comma-separated runtimes among {', '.join(RUNTIMES)}, or 'all' (default: torch and "
                   "onnxruntime where usable; torch-compile is opt-in because compiling takes long).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (cuda:N).")
@click.option("--batch-sizes", default=None, metavar="LIST",
              help="Comma-separated batch sizes (default: the input shape's batch, 1 when inferred).")
@click.option("--threads", type=int, default=None, help="Intra-op threads for torch and ONNX Runtime "
              "(default: torch's default, usually the physical cores).")
@click.option("--warmup", type=int, default=DEFAULT_WARMUP, show_default=True,
              help="Untimed repetitions before timing (each runs every variant once).")
@click.option("--iters", type=int, default=None, help="Timed repetitions (exclusive with --seconds).")
@click.option("--seconds", type=float, default=None,
              help=f"Timing budget per runtime and batch size, shared by the variants (default {DEFAULT_SECONDS}).")
@click.option("--per-op", is_flag=True, help="Also profile per operator (torch.profiler / ORT profiling).")
@click.option("--top", type=int, default=10, show_default=True, help="Operators listed by --per-op.")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--plot", "plot_out", default=None, type=click.Path(dir_okay=False),
              help="Write a PNG of latency vs batch size (needs matplotlib: pip install 'repconv[plot]').")
@click.option("--baseline", default=None, type=click.Path(dir_okay=False),
              help="Earlier --json report: flag medians worse by more than max(5%, 3 robust sigma); exit 1 if any.")
@click.option("--import", "imports", multiple=True, type=click.Path(dir_okay=False),
              help="JSON report measured elsewhere (e.g. a bundle's benchmark.py) to show beside this run.")
@click.option("--no-flush-denormal", is_flag=True, help="Keep denormal floats on CPU (default: flush to zero).")
@no_clobber_option
def profile_command(model: str | None, weights: str | None, allow_pickle: bool, input_shape: str | None,
                    dtype: str | None, compare: str | None, no_fuse: bool, runtime: str | None, device: str,
                    batch_sizes: str | None,
                    threads: int | None, warmup: int, iters: int | None, seconds: float | None, per_op: bool,
                    top: int, json_out: str | None, plot_out: str | None, baseline: str | None,
                    imports: tuple[str, ...], no_flush_denormal: bool, no_clobber: bool) -> None:
    """Time MODEL as given and fused, side by side (interleaved), on PyTorch and ONNX Runtime.

    MODEL is anything `repconv fuse` accepts, or an .onnx file (then onnxruntime only). torch.compile
    is opt-in (--runtime all). Without MODEL, --import shows reports measured elsewhere."""
    # Cheap checks first: a usage error must not cost a model load or a measurement.
    if model is None and not imports:
        raise UsageFailure("give MODEL to profile, or --import FILE to show results measured elsewhere")
    if model is None and (json_out or baseline or compare):
        raise UsageFailure("--json, --baseline and --compare need MODEL")
    if iters is not None and seconds is not None:
        raise UsageFailure("give --iters or --seconds, not both")
    if iters is not None and iters <= 0:
        raise UsageFailure(f"--iters must be positive, got {iters}")
    if seconds is not None and not (math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS):
        raise UsageFailure(f"--seconds must be positive and finite (at most {MAX_SECONDS}), got {seconds}")
    if warmup < 0:
        raise UsageFailure(f"--warmup must be >= 0, got {warmup}")
    if threads is not None and threads <= 0:
        raise UsageFailure(f"--threads must be positive, got {threads}")
    if top <= 0:
        raise UsageFailure(f"--top must be positive, got {top}")
    sizes = _positive_ints(batch_sizes, "--batch-sizes") if batch_sizes is not None else None
    runtimes = _runtimes(runtime)
    try:
        check_device(device)
        imported = [load_report(p) for p in imports]
        base = load_report(baseline) if baseline else None
    except ProfileError as e:
        raise UsageFailure(str(e)) from None
    if plot_out:
        from repconv.profile.plot import MISSING_MATPLOTLIB

        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageFailure(MISSING_MATPLOTLIB) from None

    protect = [model, compare, weights, baseline, *imports]
    with OutputPlan(no_clobber=no_clobber, protect=protect, say=say_wrote) as plan:
        json_file = plan.file(json_out, "--json", "json") if json_out and model is not None else None
        plot_file = plan.file(plot_out, "--plot", "png") if plot_out else None
        report = _measure(model, weights, allow_pickle, input_shape, dtype, compare, no_fuse, runtimes, device,
                          sizes, threads, warmup, iters, seconds, per_op, top, no_flush_denormal)
        shown = report or imported[0]
        rest = imported if report is not None else imported[1:]
        console.print(f"[bold]machine:[/bold] {escape(machine_summary(shown.machine))}")
        for rep in rest:
            console.print(f"[bold]imported:[/bold] {escape(machine_summary(rep.machine))}")
        keys = 3 + int(len({r.source for rp in [shown, *rest] for r in rp.results}) > 1)
        _print(results_table(shown, rest, title="latency per batch (ratio: per-pair candidate/reference, "
                                                "< 1 is faster)"), keys)
        _print(variants_table(shown))
        for note in shown.notes:
            console.print(f"[yellow]note:[/yellow] {escape(note)}")
        for t in per_op_tables(shown):
            _print(t)

        if json_file is not None and report is not None:
            write_report(report, json_file.staged)
        if plot_file is not None:
            from repconv.profile.plot import plot_latency

            plot_latency([r for rep in [shown, *rest] for r in rep.results], plot_file.staged,
                         title=model or "imported results")
        if base is not None and report is not None:
            checks = compare_to_baseline(report.results, base.results)
            if not checks:
                console.print(f"[yellow]note:[/yellow] no row of {escape(str(baseline))} matches this run")
            else:
                _print(baseline_table(checks))
                bad = [c for c in checks if c.status == "regression"]
                if bad:
                    raise CheckFailure(f"{len(bad)} regression(s) beyond the noise against {baseline}; "
                                       "nothing written")


def _measure(model: str | None, weights: str | None, allow_pickle: bool, input_shape: str | None,
             dtype: str | None, compare: str | None, no_fuse: bool, runtimes: list[str] | None, device: str,
             sizes: list[int] | None, threads: int | None, warmup: int, iters: int | None, seconds: float | None,
             per_op: bool, top: int, no_flush_denormal: bool) -> ProfileReport | None:
    """Load MODEL (and OTHER), check it runs, and profile it; None without MODEL (--import only)."""
    if model is None:
        return None
    target = _load(model, weights, allow_pickle)
    other = _load(compare, None, allow_pickle) if compare else None
    dt = DTYPES[dtype] if dtype else None
    if isinstance(target, Path):
        if dtype:
            raise UsageFailure("--dtype converts a PyTorch model; an .onnx MODEL keeps the dtype it was exported in")
        try:
            shape = parse_shape(input_shape) if input_shape else None
        except ModelLoadError as e:
            raise UsageFailure(str(e)) from None
    else:
        target, dt, dtype_note = apply_dtype(target, dtype)
        if dtype_note:
            console.print(escape(dtype_note))
        if other is not None and not isinstance(other, Path):
            other, _, _ = apply_dtype(other, dtype or str(dt).removeprefix("torch."))
        shape, note = input_shape_or_exit(target, input_shape)
        if note:
            console.print(escape(note))
        check_runs(target, example_input((1, *shape[1:]), dt))  # a model that cannot run: say why now
        for b in sizes or [shape[0]]:
            check_input_size((b, *shape[1:]), dt, what=f"input at batch {b}")
    try:
        with Announcer() as say:
            return profile_model(
                target, shape, compare=other, fuse=not no_fuse, model_name=model, compare_name=compare,
                runtimes=runtimes, device=device, batch_sizes=sizes, threads=threads, warmup=warmup, iters=iters,
                seconds=None if iters is not None else (seconds or DEFAULT_SECONDS), per_op=per_op, top=top,
                flush_denormal=not no_flush_denormal, progress=say, dtype=dt or torch.float32)
    except ProfileError as e:
        raise UsageFailure(str(e)) from None
    except MeasurementError as e:
        raise UsageFailure(str(e)) from None


# MODEL is optional here (``--import`` alone shows results measured elsewhere); model_options makes it
# required for the other commands.
for _param in profile_command.params:
    if isinstance(_param, click.Argument) and _param.name == "model":
        _param.required = False

"""``repconv fuse`` and ``repconv inspect``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import click
import torch
from rich.markup import escape
from rich.table import Table

from repconv.graph import FuseReport, Region, region_kind, region_result
from repconv.pipeline import FuseInputError, fuse_with_report
from repconv.verification import DEFAULT_ATOL, DEFAULT_RTOL, VerificationError, VerifyReport

from .common import (
    CheckFailure,
    FiniteFloat,
    OutputPlan,
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
from .quantize_cmd import calib_options, quant_inspect

OUTPUT_RULE = ("\b\nOutputs (-o, --report) are checked before any work and written together\n"
               "at the end, only if the whole command succeeds. An existing file is\n"
               "replaced (and the output says so) unless --no-clobber; the input never.")


def default_output(model: str) -> Path:
    path = Path(model)
    if path.exists():
        return path.with_name(f"{path.stem}.fused.pt")
    return Path(f"{model.rpartition(':')[2] or 'model'}.fused.pt")


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _source_modules(r: Region) -> list[str]:
    """The module paths a region's ops come from (relative to its block), in graph order."""
    try:
        from repconv.graph.tracing import module_path
    except ImportError:  # pragma: no cover - the graph package reorganised
        return []
    paths: dict[str, None] = {}
    nodes = list(getattr(getattr(r, "value", None), "sources", ()))
    nodes.sort(key=lambda n: (getattr(n, "_sort_key", ()), n.name))  # fx keeps graph order in _sort_key
    for n in nodes:
        p = str(n.target) if n.op == "call_module" else module_path(n)
        if n.op != "call_module" and p == n.name:
            continue  # a functional op at the top level: no module
        if r.block and p.startswith(r.block + "."):
            p = p[len(r.block) + 1:]
        elif r.block and p == r.block:
            continue
        paths[p] = None
    return list(paths)


def region_names(regions: list[Region]) -> list[str]:
    """A unique, readable name per region: its block, or - for a region spanning siblings - the
    modules it spans (``doconv+doconv_bn``); a name that repeats gets its modules added, then ``#n``."""
    def top(r: Region) -> str:
        firsts = dict.fromkeys(p.split(".")[0] for p in _source_modules(r))
        return "+".join(firsts) or r.target or "(model)"

    names = [r.block or top(r) for r in regions]
    counts = Counter(names)
    for i, r in enumerate(regions):
        if counts[names[i]] > 1 and r.block:
            inner = "+".join(dict.fromkeys(p.split(".")[0] for p in _source_modules(r)))
            if inner:
                names[i] = f"{r.block}: {inner}"
    seen: Counter[str] = Counter()
    counts = Counter(names)
    for i, name in enumerate(names):
        if counts[name] > 1:
            seen[name] += 1
            names[i] = f"{name} #{seen[name]}"
    return names


def print_report(report: FuseReport, title: str) -> None:
    table = Table(title=escape(title), title_justify="left")
    for col in ("block", "kind", "branches", "result", "params"):
        table.add_column(col, justify="right" if col in ("branches", "params") else "left")
    for name, r in zip(region_names(report.regions), report.regions, strict=True):
        table.add_row(escape(name), region_kind(r), f"{r.branches} → 1", region_result(r),
                      f"{_fmt_params(r.params_before)} → {_fmt_params(r.params_after)}")
    if report.regions:
        print_table(table)
    else:
        console.print("[yellow]no re-parameterizable structure found[/yellow]")
    for item in report.left:
        console.print(f"[yellow]left as is:[/yellow] {escape(item.where)}: {escape(item.reason)}")
    for item in report.untraced:
        console.print(f"[yellow]not traceable (the submodules it calls were fused, with the inputs they got):"
                      f"[/yellow] {escape(item)}")
    for note in report.notes:
        console.print(f"[cyan]note:[/cyan] {escape(note)}")
    console.print(f"parameters: {_fmt_params(report.params_before)} → {_fmt_params(report.params_after)}; "
                  f"{len(report.regions)} regions fused")


def print_verification(v: VerifyReport) -> None:
    status = "[green]OK[/green]" if v.ok else "[red]MISMATCH[/red]"
    console.print(f"verification {status} over {v.samples} input samples: {escape(v.summary())}")


def _report_json(model: str, out: Path, report: FuseReport) -> str:
    data: dict[str, Any] = {"model": model, "output": str(out), **report.to_dict()}
    for entry, name in zip(data["regions"], region_names(report.regions), strict=True):
        entry["name"] = name
    return json.dumps(data, indent=2)


@click.command("fuse", epilog=command_help(OUTPUT_RULE))
@model_options
@click.option("-o", "--output", "output", type=click.Path(), default=None,
              help="Where to write the fused model (default: <model>.fused.pt).")
@click.option("--rtol", type=FiniteFloat(min=0), default=DEFAULT_RTOL, show_default=True,
              help="Allowed max |error| relative to max |reference output| (float16 / bfloat16 outputs: "
                   "never below 8 ulps of their dtype).")
@click.option("--atol", type=FiniteFloat(min=0), default=DEFAULT_ATOL, show_default=True,
              help="Absolute error floor.")
@click.option("--report", "report_path", type=click.Path(), default=None,
              help="Write the fusion report as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip the numerical check (not recommended).")
@no_clobber_option
def fuse_command(model: str, weights: str | None, allow_pickle: bool, input_shape: str | None, dtype: str | None,
                 output: str | None, rtol: float, atol: float, report_path: str | None, no_verify: bool,
                 no_clobber: bool) -> None:
    """Collapse every re-parameterizable structure of MODEL into single convs / linears, verify, save."""
    with OutputPlan(no_clobber=no_clobber, protect=[model, weights], say=say_wrote) as plan:
        out = plan.file(output or default_output(model), "-o", "model")
        rep = plan.file(report_path, "--report", "json") if report_path else None
        module, example = prepare_model(model, weights, allow_pickle, input_shape, dtype)
        try:
            fused, report = fuse_with_report(module, example, verify=not no_verify, rtol=rtol, atol=atol)
        except FuseInputError as e:
            raise UsageFailure(str(e)) from None
        except VerificationError as e:
            print_verification(e.report)
            where = e.report.first_divergence or "not found"
            raise CheckFailure(f"fused model does not match (first diverging layer: {where}); nothing written") \
                from None
        print_report(report, f"fused {model}")
        if report.verification is not None:
            print_verification(report.verification)
        else:
            console.print("[yellow]verification skipped (--no-verify)[/yellow]")
        with step(f"saving {out.path}"):
            if isinstance(module, torch.jit.ScriptModule):  # TorchScript in, TorchScript out (static graph)
                torch.jit.save(torch.jit.trace(fused, example, check_trace=False), str(out.staged))
            else:
                torch.save(fused, out.staged)
        if rep is not None:
            rep.staged.write_text(_report_json(model, out.path, report) + "\n", encoding="utf-8")


@click.command("inspect", epilog=command_help())
@model_options
@click.option("--quant", is_flag=True, help="Also rank the fused layers by INT8 quantization risk (per channel, "
              "with the original branch behind each outlier).")
@calib_options
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write what inspect found (and the --quant analysis) as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="With --quant: a PNG of the riskiest layers' per-channel ranges (needs matplotlib).")
@no_clobber_option
def inspect_command(model: str, weights: str | None, allow_pickle: bool, input_shape: str | None,
                    dtype: str | None, quant: bool, calib: str | None, calib_random: int | None, mean: str | None,
                    std: str | None, report_path: str | None, plot_path: str | None, no_clobber: bool) -> None:
    """List the re-parameterizable structure found in MODEL; changes nothing."""
    if (plot_path or calib or calib_random is not None) and not quant:
        raise UsageFailure("--plot, --calib and --calib-random go with --quant")
    with OutputPlan(no_clobber=no_clobber, protect=[model, weights, calib], say=say_wrote) as plan:
        rep = plan.file(report_path, "--report", "json") if report_path else None
        plot = plan.file(plot_path, "--plot", "png") if plot_path else None
        module, example = prepare_model(model, weights, allow_pickle, input_shape, dtype)
        try:
            fused, report = fuse_with_report(module, example, verify=False)
        except FuseInputError as e:
            raise UsageFailure(str(e)) from None
        print_report(report, f"re-parameterizable structure in {model}")
        risk = quant_inspect(fused, report, tuple(example.shape), calib, calib_random, mean, std,
                             plot.staged if plot else None, model) if quant else None
        if rep is not None:
            data = {"model": model, **report.to_dict(), **({"quant": risk.to_dict()} if risk else {})}
            rep.staged.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


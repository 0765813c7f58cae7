"""Rich renderables for profile reports (the CLI only prints them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from repconv.profile.core import Comparison, ProfileReport, Result
from repconv.profile.report import BaselineCheck


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_count(v: float | None) -> str:
    """1234567 -> 1.23M; None -> '-'."""
    if v is None:
        return "-"
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def machine_summary(machine: dict[str, Any]) -> str:
    cores = machine.get("usable_cores") or machine.get("cpu_count")
    parts = [f"CPU {machine.get('cpu_model', '?')} ({cores} cores usable)",
             f"threads {machine.get('threads', '?')}"]
    if machine.get("gpu"):
        parts.append(f"GPU {machine['gpu']}")
    libs = [f"torch {machine['torch']}" if machine.get("torch") else None,
            f"onnxruntime {machine['onnxruntime']}" if machine.get("onnxruntime") else None]
    parts.extend(x for x in libs if x)
    return "; ".join(parts)


def _ratio_cell(c: Comparison | None) -> Text:
    if c is None:
        return Text("ref", style="dim")
    text = f"{c.ratio_median:.2f} ({c.ratio_p25:.2f}-{c.ratio_p75:.2f})"
    # Colour only when the whole IQR is on one side of 1: otherwise the difference is within the noise.
    style = "green" if c.ratio_p75 < 1 else "red" if c.ratio_p25 > 1 else ""
    return Text(text, style=style)


def results_table(report: ProfileReport, imported: Sequence[ProfileReport] = (), *, title: str | None = None) -> Table:
    """One row per (runtime, batch, model/variant[, source]); ratio column against the group's reference.

    Imported reports (measured elsewhere, e.g. by a bundle on the target device) follow the local rows
    with a ``source`` column naming their machine."""
    reports = [report, *imported]
    rows = [(i, r) for i, rep in enumerate(reports) for r in rep.results]
    show_source = any(r.source != "local" for _, r in rows)
    show_model = len({r.model for _, r in rows}) > 1
    # (report index, runtime, device, batch, label) -> comparison where that row is the candidate
    cand: dict[tuple[Any, ...], Comparison] = {}
    refs: set[tuple[Any, ...]] = set()
    for i, rep in enumerate(reports):
        for c in rep.comparisons:
            cand[(i, c.runtime, c.device, c.batch_size, c.candidate)] = c
            refs.add((i, c.runtime, c.device, c.batch_size, c.reference))

    show_device = len({r.device for _, r in rows}) > 1
    if not show_device and rows:
        title = f"{title or 'latency'} - {rows[0][1].device}"
    table = Table(title=escape(title) if title else None, title_justify="left", header_style="bold")
    if show_source:
        table.add_column("source")
    table.add_column("runtime")
    if show_device:
        table.add_column("device")
    table.add_column("batch", justify="right")
    table.add_column(escape("model [variant]") if show_model else "variant")
    for name in ("median ms", "p90 ms", "p99 ms", "min ms", "std ms", "items/s", "peak MB"):
        table.add_column(name, justify="right")
    table.add_column("ratio vs ref (IQR)", justify="right")

    runtime_rank: dict[str, int] = {}
    for _, r in rows:  # runtimes in the order they were measured, not alphabetically
        runtime_rank.setdefault(r.runtime, len(runtime_rank))

    def group(item: tuple[int, Result]) -> tuple[Any, ...]:
        i, r = item
        return (i, r.source, runtime_rank[r.runtime], r.device, r.batch_size)

    last = None
    for i, r in sorted(rows, key=group):  # stable: variants keep their measured order
        g = group((i, r))
        if last is not None and g != last:
            table.add_section()
        last = g
        label = f"{r.model} [{r.variant}]"
        key = (i, r.runtime, r.device, r.batch_size, label)
        cells = [escape(r.runtime), str(r.batch_size), escape(label if show_model else r.variant),
                 fmt_ms(r.median_ms), fmt_ms(r.p90_ms), fmt_ms(r.p99_ms), fmt_ms(r.min_ms), fmt_ms(r.std_ms),
                 fmt_count(r.throughput), "-" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.1f}"]
        if show_device:
            cells.insert(1, escape(r.device))
        if show_source:
            cells.insert(0, escape(r.source))
        ratio = _ratio_cell(cand[key]) if key in cand else _ratio_cell(None) if key in refs else Text("")
        table.add_row(*cells, ratio)
    return table


def variants_table(report: ProfileReport) -> Table:
    """Parameters and MACs per item of each variant (they do not depend on runtime or batch size)."""
    t = Table(title="model size", title_justify="left", header_style="bold")
    for name, just in (("model [variant]", "left"), ("params", "right"), ("MACs/item", "right")):
        t.add_column(escape(name), justify=just)  # type: ignore[arg-type]
    seen: set[str] = set()
    for r in report.results:
        label = f"{r.model} [{r.variant}]"
        if label not in seen:
            seen.add(label)
            t.add_row(escape(label), fmt_count(r.params), fmt_count(r.macs))
    return t


def per_op_tables(report: ProfileReport) -> list[Table]:
    tables = []
    for r in report.results:
        if not r.per_op:
            continue
        native = " (repconv native ops registered)" if r.native_ops else ""
        t = Table(title=escape(f"per-op: {r.model} [{r.variant}], {r.runtime}{native}, {r.device}, "
                               f"batch {r.batch_size}"),
                  title_justify="left", header_style="bold")
        t.add_column("op")
        t.add_column("ms / call", justify="right")
        t.add_column("share", justify="right")
        t.add_column("calls", justify="right")
        for op in r.per_op:
            t.add_row(escape(str(op["op"])), fmt_ms(op["time_ms"]), f"{100 * op['share']:.1f}%", f"{op['calls']:g}")
        tables.append(t)
    return tables


def baseline_table(checks: Sequence[BaselineCheck]) -> Table:
    t = Table(title="against the baseline (median; threshold = max(5%, 3 robust sigma of the baseline))",
              title_justify="left", header_style="bold")
    for name, just in (("row", "left"), ("baseline ms", "right"), ("now ms", "right"), ("change", "right"),
                       ("threshold", "right"), ("verdict", "left")):
        t.add_column(name, justify=just)  # type: ignore[arg-type]
    styles = {"regression": "red", "improvement": "green", "same": "dim"}
    for c in checks:
        t.add_row(escape(c.key), fmt_ms(c.baseline_ms), fmt_ms(c.current_ms), f"{100 * c.change:+.1f}%",
                  f"{100 * c.threshold:.1f}%", Text(c.status, style=styles[c.status]))
    return t

"""Latency vs batch size, one line per (source, runtime, model/variant). Needs the optional matplotlib."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from repconv.profile.core import Result


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


# No square brackets: the CLI prints this through rich markup, which would swallow "[plot]".
MISSING_MATPLOTLIB = "--plot needs matplotlib, which is not installed: pip install matplotlib (repconv's 'plot' extra)"


def plot_latency(results: Sequence[Result], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write a PNG: median latency (bars from min to p90) vs batch size, log-log axes."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(MISSING_MATPLOTLIB) from None

    lines: dict[str, list[Result]] = defaultdict(list)
    show_model = len({r.model for r in results}) > 1
    for r in results:
        who = f"{r.model} [{r.variant}]" if show_model else r.variant
        src = "" if r.source == "local" else f"{r.source}: "
        lines[f"{src}{r.runtime}/{r.device} {who}"].append(r)

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    try:
        for label, rows in lines.items():
            rows.sort(key=lambda r: r.batch_size)
            xs = [r.batch_size for r in rows]
            med = [r.median_ms for r in rows]
            lo = [max(0.0, r.median_ms - (r.min_ms if r.min_ms is not None else r.median_ms)) for r in rows]
            hi = [max(0.0, r.p90_ms - r.median_ms) for r in rows]
            ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("latency per batch, ms (median; bars: min to p90)")
        ax.set_title(title or "repconv profile")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out

"""Per-channel range plot of the riskiest layers (PNG; needs the optional matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path

from .risk import RiskReport


def plot_risk(report: RiskReport, path: str | os.PathLike, *, layers: int = 4) -> Path:
    """One row per layer (riskiest first): weight min..max per output channel, and the abs-max of the
    quantized activation per channel; outlier channels in red, the layer median as a dashed line."""
    from repconv.profile.plot import MISSING_MATPLOTLIB, PlotUnavailable

    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(MISSING_MATPLOTLIB) from None
    shown = report.layers[:layers]
    if not shown:
        raise ValueError("no layers to plot")
    fig, axes = plt.subplots(len(shown), 2, figsize=(12, 2.8 * len(shown)), dpi=100, squeeze=False)
    try:
        for row, lr in zip(axes, shown, strict=True):
            ch = list(range(lr.out_channels))
            w_out = {o.channel for o in lr.weight_outliers}
            a_out = {o.channel for o in lr.act_outliers}
            ax = row[0]
            colors = ["tab:red" if c in w_out else "tab:blue" for c in ch]
            ax.vlines(ch, lr.weight_min, lr.weight_max, colors=colors, linewidth=2)
            ax.axhline(0.0, color="grey", linewidth=0.5)
            ax.set_title(f"#{lr.rank} {lr.name}: weights per output channel (max/median {lr.weight_ratio:.1f})",
                         fontsize=9)
            ax.set_xlabel("output channel", fontsize=8)
            ax = row[1]
            colors = ["tab:red" if c in a_out else "tab:green" for c in ch]
            ax.bar(ch, lr.act_absmax, color=colors, width=0.8)
            live = sorted(v for v in lr.act_absmax if v > 0)
            if live:
                ax.axhline(live[len(live) // 2], color="black", linestyle="--", linewidth=0.8)
            after = " after ReLU" if lr.relu_after else ""
            ax.set_title(f"activation abs-max per channel{after} (max/median {lr.act_ratio:.1f}; "
                         f"predicted SQNR {lr.sqnr_db:.1f} dB)", fontsize=9)
            ax.set_xlabel("output channel", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return Path(path)

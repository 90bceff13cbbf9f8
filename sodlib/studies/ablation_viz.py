"""Plots of the ablation tables: paired differences with their intervals, and the mechanisms per row."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from sodlib.io import save_figure

__all__ = ["plot_mechanisms", "plot_paired_deltas", "save_figure"]


def plot_paired_deltas(
    summaries: Mapping[str, pd.DataFrame],
    suptitle: str = "",
    ncols: int = 3,
    label: str = "ours (95% paired interval)",
):
    """One panel per table: each row's paired dAP against the row it is compared with (``vs``), with its 95%
    t-interval, beside the paper's difference, in AP points. ``summaries`` maps a panel title to
    :func:`sodlib.studies.stats.paired_comparison` output. Rows not run yet show no bar.
    Returns the Figure."""
    n = len(summaries)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (title, df) in zip(axes.flat, summaries.items()):
        rows = df[df["row"] != df["vs"]]
        x = np.arange(len(rows))
        ours = rows["dAP"].to_numpy(dtype=float)
        err = np.vstack(
            [ours - rows["ci95_low"].to_numpy(dtype=float), rows["ci95_high"].to_numpy(dtype=float) - ours]
        )
        ax.bar(
            x - 0.2,
            np.nan_to_num(ours),
            0.4,
            yerr=np.nan_to_num(err),
            capsize=3,
            color="tab:blue",
            label=label,
        )
        ax.bar(x + 0.2, rows["dAP paper"].fillna(0), 0.4, label="paper", color="tab:orange")
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xticks(
            x,
            [f"{r}\nvs {v}" for r, v in zip(rows["row"], rows["vs"])],
            fontsize=6.5,
            rotation=20,
            ha="right",
        )
        ax.set(title=title, ylabel="dAP (points)")
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def plot_mechanisms(frame: pd.DataFrame, rows: Sequence[str] = (), suptitle: str = ""):
    """Paper A's mechanisms per row (``metric,row,seed,value`` of
    :func:`sodlib.training.mechanisms.mechanisms_frame`), mean over seeds with each seed as a dot: SPR's
    outside share per decoder layer, SPR's loss share, ST's (t − IoU) per size bucket, SR's Spearman of r with
    difficulty. ``rows`` orders (and selects) the rows."""
    rows = list(rows) or list(dict.fromkeys(frame["row"]))
    groups = [
        ("SPR: points outside the η-box", lambda m: m.startswith("spr_outside_share_l")),
        ("SPR: loss share, last 25%", lambda m: m == "spr_loss_share"),
        ("ST: mean t − IoU by size", lambda m: m.startswith("st_gap_")),
        ("SR: Spearman(r, 1 − IoU)", lambda m: m == "sr_difficulty_spearman"),
    ]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.4 * len(groups), 3.6))
    for ax, (title, pick) in zip(axes, groups):
        sub = frame[frame["metric"].map(pick) & frame["row"].isin(rows)]
        metrics = list(dict.fromkeys(sub["metric"]))
        width = 0.8 / max(len(metrics), 1)
        for j, metric in enumerate(metrics):
            for i, row in enumerate(rows):
                vals = sub[(sub["metric"] == metric) & (sub["row"] == row)]["value"].to_numpy(dtype=float)
                if len(vals) == 0:
                    continue
                xpos = i + (j - (len(metrics) - 1) / 2) * width
                ax.bar(xpos, np.nanmean(vals), width, color=f"C{j}", label=metric if i == 0 else None)
                ax.plot(np.full(len(vals), xpos), vals, "k.", ms=3)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xticks(range(len(rows)), rows, fontsize=6.5, rotation=25, ha="right")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        if metrics:
            ax.legend(fontsize=6)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig

"""Plots: learning curves, boxes on images. Every figure is written atomically as PNG (Agg backend)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from sodlib.runs import atomic_write_bytes


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_learning_curve(run_dirs: dict[str, str | Path], out_png: str | Path, smooth: int = 10,
                        title: str = "") -> Path:
    """Training loss (left, smoothed) and validation AP50 / AP (right) against training seconds.

    ``run_dirs`` maps a legend label to a run folder holding ``log.csv`` and ``eval.csv``.
    """
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, d in run_dirs.items():
        d = Path(d)
        log = pd.read_csv(d / "log.csv")
        line, = ax_loss.plot(log["train_seconds"], log["loss"].rolling(smooth, min_periods=1).mean(), label=label)
        if (d / "eval.csv").exists():
            ev = pd.read_csv(d / "eval.csv")
            ax_ap.plot(ev["train_seconds"], ev["AP50"], "o-", color=line.get_color(), label=f"{label} AP50")
            ax_ap.plot(ev["train_seconds"], ev["AP"], "s--", color=line.get_color(), alpha=0.6, label=f"{label} AP")
    ax_loss.set(xlabel="training seconds", ylabel=f"weighted loss (mean of {smooth} logs)", yscale="log")
    ax_ap.set(xlabel="training seconds", ylabel="validation AP", ylim=(0, 1))
    ax_ap.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_ap.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_png)

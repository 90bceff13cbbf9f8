"""MRQM figures: positives per gt by size bucket, and where the mined auxiliary queries sit (Figure 2).

* :func:`plot_positives_per_gt` — bars by SODA-D bucket of
  :func:`sodlib.studies.mrqm_analysis.positives_table`, dynamic T_I vs fixed T_b vs ATSS's adaptive threshold,
  one panel per model.
* :func:`query_panels` / :func:`plot_mined_queries` — MRQM's "query heatmaps": a validation image with the
  auxiliary positive queries the IoU-aware head mines (:func:`sodlib.studies.mrqm_analysis.mined_queries`),
  their centres over the whole image, then crops around its smallest objects with each query's box, coloured
  by its IoU with the gt it was assigned to (dashed: kept by the best-token rule, below T_I).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.patches import Rectangle
from torchvision.ops import box_convert

from sodlib.studies.mrqm_analysis import POSITIVE_RULES, SODAD_BUCKETS_PX2
from sodlib.studies.viz import crop_to_box

__all__ = ["plot_decoder_losses", "plot_mined_queries", "plot_positives_per_gt", "query_panels"]

_RULE_STYLE = {
    "IoU > T_I": ("tab:blue", None),
    "IoU > T_b": ("tab:orange", None),
    "IoU > ATSS": ("tab:green", None),
    "IoU > T_I (px_px)": ("0.6", None),
    "T_I + best token": ("lightsteelblue", "//"),
    "T_b + best token": ("navajowhite", "//"),
}


def plot_positives_per_gt(
    tables: Mapping[str, pd.DataFrame],
    suptitle: str = "",
    buckets: Sequence[str] = (*SODAD_BUCKETS_PX2, "all"),
):
    """One panel per ``tables`` entry (title → :func:`~sodlib.studies.mrqm_analysis.positives_table`): mean
    positives per gt in each bucket (x labels carry the gt count) under each rule of
    :data:`~sodlib.studies.mrqm_analysis.POSITIVE_RULES` present in the table. Returns the Figure."""
    n = len(tables)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.9), squeeze=False)
    for ax, (title, df) in zip(axes[0], tables.items()):
        t = df.set_index("bucket").loc[list(buckets)]
        rules = [r for r in POSITIVE_RULES if r in t.columns]
        width = 0.8 / max(len(rules), 1)
        x = np.arange(len(t))
        for i, rule in enumerate(rules):
            color, hatch = _RULE_STYLE[rule]
            ax.bar(
                x + (i - (len(rules) - 1) / 2) * width,
                t[rule].fillna(0),
                width,
                label=rule,
                color=color,
                hatch=hatch,
                edgecolor="0.4",
                lw=0.5,
            )
        ax.set_xticks(x, [f"{b}\n{int(g)} gts" for b, g in zip(t.index, t["gts"])], fontsize=8)
        ax.set(title=title, ylabel="positive tokens per gt")
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def plot_decoder_losses(curves: Mapping[str, Sequence[pd.DataFrame]], suptitle: str = ""):
    """The main decoder's loss over training (:func:`~sodlib.studies.mrqm_analysis.decoder_loss_curve`), one
    line per ``curves`` entry (label → one frame per seed: the mean, with the seeds' range shaded). A collapse
    caused by an auxiliary objective shows as a curve that stops falling or rises above the baseline's."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, frames in curves.items():
        if not frames:
            continue
        table = pd.concat([f.set_index("iteration")["decoder_loss"] for f in frames], axis=1).dropna()
        (line,) = ax.plot(table.index, table.mean(axis=1), lw=1.4, label=f"{label} ({len(frames)} seed(s))")
        if len(frames) > 1:
            ax.fill_between(
                table.index, table.min(axis=1), table.max(axis=1), color=line.get_color(), alpha=0.15, lw=0
            )
    ax.set(xlabel="iteration", ylabel="main decoder loss, last layer (weighted)", yscale="log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if suptitle:
        ax.set_title(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def query_panels(
    image: torch.Tensor,
    target: Mapping[str, torch.Tensor],
    mined: Mapping[str, torch.Tensor],
    num_objects: int = 2,
    label: str = "",
) -> list[dict]:
    """A row of :func:`plot_mined_queries` panels for one image [3, H, W]: the whole image with every mined
    query's centre, then a crop around each of its ``num_objects`` smallest gts with that gt's queries.

    ``target``: ``boxes`` [G, 4] normalised cxcywh; ``mined``:
    :func:`~sodlib.studies.mrqm_analysis.mined_queries`.
    """
    h, w = image.shape[-2:]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    gts = box_convert(target["boxes"].float(), "cxcywh", "xyxy") * scale
    queries = box_convert(mined["box"].float(), "cxcywh", "xyxy") * scale
    image_hwc = image.permute(1, 2, 0).numpy()
    common = {"image_hwc": image_hwc, "gt_boxes_xyxy": gts.numpy()}
    panels = [
        {
            **common,
            "query_boxes_xyxy": queries.numpy(),
            "query_iou": mined["iou"].numpy(),
            "query_forced": mined["forced"].numpy(),
            "focus_xyxy": None,
            "title": f"{label}{len(mined['token'])} aux queries, {len(gts)} gts",
        }
    ]
    area = (gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1])
    for j in area.argsort()[:num_objects].tolist():
        sel = mined["gt"] == j
        bucket = next((b for b, (lo, hi) in SODAD_BUCKETS_PX2.items() if lo < area[j] <= hi), "large")
        bw, bh = float(gts[j, 2] - gts[j, 0]), float(gts[j, 3] - gts[j, 1])
        panels.append(
            {
                **common,
                "query_boxes_xyxy": queries[sel].numpy(),
                "query_iou": mined["iou"][sel].numpy(),
                "query_forced": mined["forced"][sel].numpy(),
                "focus_xyxy": gts[j].tolist(),
                "title": f"gt {bw:.0f}×{bh:.0f} px ({bucket}), T_I {float(mined['thresholds'][j]):.2f}\n"
                f"{int(sel.sum())} quer{'y' if int(sel.sum()) == 1 else 'ies'}, "
                f"{int(mined['forced'][sel].sum())} below T_I",
            }
        )
    return panels


def plot_mined_queries(
    panels: Sequence[Sequence[Mapping]], suptitle: str = "", margin: float = 2.0, min_window_px: float = 24.0
):
    """A grid of images with the IoU-aware head's mined auxiliary queries (MRQM's Figure 2).

    ``panels[row][col]``: ``image_hwc``, ``gt_boxes_xyxy`` [G, 4] px (cyan), ``query_boxes_xyxy`` [M, 4] px,
    ``query_iou`` [M] (colour, viridis 0–1), ``query_forced`` [M] bool (dashed box / hollow dot),
    ``focus_xyxy`` (crop to this box grown by ``margin`` box sizes per side, at least ``min_window_px``, and
    draw the query boxes; ``None``: whole image, query centres only), ``title``. Returns the Figure.
    """
    rows, cols = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.8 * cols + 0.8, 2.9 * rows), squeeze=False, layout="constrained"
    )
    cmap, norm = plt.get_cmap("viridis"), matplotlib.colors.Normalize(0.0, 1.0)
    for ax_row, row in zip(axes, panels):
        for ax in ax_row[len(row) :]:
            ax.axis("off")
        for ax, p in zip(ax_row, row):
            image = np.asarray(p["image_hwc"])
            ax.imshow(image, interpolation="nearest")
            focus = p.get("focus_xyxy")
            for x0, y0, x1, y1 in np.asarray(p["gt_boxes_xyxy"], dtype=float).reshape(-1, 4):
                ax.add_patch(
                    Rectangle(
                        (x0, y0),
                        x1 - x0,
                        y1 - y0,
                        fill=False,
                        ec="cyan",
                        lw=0.6,
                        alpha=1.0 if focus is None else 0.5,
                    )
                )
            if focus is not None:
                x0, y0, x1, y1 = (float(v) for v in focus)
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="cyan", lw=1.6))
            boxes = np.asarray(p["query_boxes_xyxy"], dtype=float).reshape(-1, 4)
            ious = np.asarray(p["query_iou"], dtype=float).reshape(-1)
            forced = np.asarray(p["query_forced"], dtype=bool).reshape(-1)
            for (x0, y0, x1, y1), iou, f in zip(boxes, ious, forced):
                c = cmap(norm(iou))
                if focus is not None:
                    ax.add_patch(
                        Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=c, lw=1.0, ls="--" if f else "-")
                    )
                ax.plot(
                    (x0 + x1) / 2,
                    (y0 + y1) / 2,
                    "o",
                    ms=3 if focus is None else 4,
                    mec=c,
                    mfc="none" if f else c,
                    mew=0.8,
                )
            crop_to_box(ax, focus, margin, min_window_px, p.get("title", ""))
    fig.colorbar(
        matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap),
        ax=axes.ravel().tolist(),
        shrink=0.8,
        label="IoU of the query's box with its gt",
    )
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return fig

"""Plots: learning curves, curves and contours of the papers' formulas, box pairs, SPR sampling-point
geometry. ``plot_*`` functions return a Figure; :func:`save_figure` writes it atomically as PNG (Agg).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

from sodlib.io import save_figure
from sodlib.models.detector import eval_mode, postprocess

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from torchvision.ops import box_convert


def plot_learning_curve(
    run_dirs: dict[str, str | Path], out_png: str | Path, smooth: int = 10, title: str = ""
) -> Path:
    """Training loss (left, smoothed) and validation AP50 / AP (right) against the iteration.

    ``run_dirs`` maps a legend label to a run folder holding ``log.csv`` and ``eval.csv``. The x axis is the
    iteration, not the logged wall time, so that a retrained run draws the same figure (its seconds are in
    ``metrics.json``).
    """
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, d in run_dirs.items():
        d = Path(d)
        log = pd.read_csv(d / "log.csv")
        (line,) = ax_loss.plot(
            log["iteration"], log["loss"].rolling(smooth, min_periods=1).mean(), label=label
        )
        if (d / "eval.csv").exists():
            ev = pd.read_csv(d / "eval.csv")
            ax_ap.plot(ev["iteration"], ev["AP50"], "o-", color=line.get_color(), label=f"{label} AP50")
            ax_ap.plot(
                ev["iteration"], ev["AP"], "s--", color=line.get_color(), alpha=0.6, label=f"{label} AP"
            )
    ax_loss.set(xlabel="iteration", ylabel=f"weighted loss (mean of {smooth} logs)", yscale="log")
    ax_ap.set(xlabel="iteration", ylabel="validation AP", ylim=(0, 1))
    ax_ap.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_ap.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_png)


# ---------------------------------------------------------------- generic curves and contours


def plot_lines(
    curves: Mapping[str, tuple],
    xlabel: str,
    ylabel: str,
    title: str = "",
    ax=None,
    points: Mapping[str, tuple] | None = None,
    hlines: Mapping[str, float] | None = None,
    xscale: str = "linear",
    yscale: str = "linear",
    legend_title: str | None = None,
    legend_loc: str = "best",
):
    """Labelled curves ``{label: (x, y)}`` (plus optional scatter ``points`` and dashed ``hlines``).

    Draws into ``ax`` when given, else into a new figure; returns the Figure (save it with
    :func:`save_figure`). The curves are the first ``len(curves)`` entries of ``ax.lines``, in order.
    ``legend_loc``: a matplotlib location, or ``"outside"`` (right of the axes).
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(5.2, 3.8))
    for label, (x, y) in curves.items():
        ax.plot(np.asarray(x), np.asarray(y), label=label)
    for label, (x, y) in (points or {}).items():
        ax.scatter(np.asarray(x), np.asarray(y), s=6, alpha=0.5, label=label, zorder=3)
    for label, y in (hlines or {}).items():
        ax.axhline(float(y), color="0.3", ls="--", lw=1, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xscale=xscale, yscale=yscale)
    ax.grid(alpha=0.3)
    outside = (
        {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)}
        if legend_loc == "outside"
        else {"loc": legend_loc}
    )
    ax.legend(fontsize=8, title=legend_title, title_fontsize=8, **outside)
    return ax.figure


def plot_contour_panels(
    x,
    y,
    panels: Mapping[str, np.ndarray],
    xlabel: str,
    ylabel: str,
    levels=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    yscale: str = "linear",
    suptitle: str = "",
    nan_label: str = "undefined",
):
    """One filled-contour panel per entry of ``panels`` ({title: Z [len(y), len(x)]}), shared colour scale
    [0, 1]; NaN cells are hatched grey and named ``nan_label`` (e.g. an infeasible region).
    Returns the Figure.
    """
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 0.8, 3.4), squeeze=False, sharey=True)
    xx, yy = np.meshgrid(np.asarray(x), np.asarray(y))
    filled = None
    for ax, (title, z) in zip(axes[0], panels.items()):
        z = np.asarray(z, dtype=float)
        ax.set_facecolor("0.85")
        ax.contourf(xx, yy, np.isnan(z).astype(float), levels=[0.5, 1.5], colors="none", hatches=["//"])
        filled = ax.contourf(xx, yy, z, levels=np.linspace(0, 1, 21), cmap="viridis", vmin=0, vmax=1)
        lines = ax.contour(xx, yy, z, levels=list(levels), colors="white", linewidths=0.7)
        ax.clabel(lines, fmt="%.1f", fontsize=7)
        ax.set(title=title, xlabel=xlabel, yscale=yscale)
    axes[0][0].set_ylabel(ylabel)
    fig.colorbar(filled, ax=list(axes[0]), fraction=0.02, pad=0.02)
    fig.suptitle(f"{suptitle}{'; ' if suptitle else ''}hatched: {nan_label}", y=1.04)
    return fig


# ---------------------------------------------------------------- boxes


def _box_patch(xyxy, **kw):
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    return Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, **kw)


def plot_box_pairs(gt_xyxy, preds: Mapping[str, Sequence[float]], unit: str = "px"):
    """One panel per prediction ``{title: xyxy}``: ground truth (green), prediction (red, dashed) and their
    intersection (filled). Same axis limits everywhere, y pointing down as in images. Returns the Figure."""
    boxes = np.array([list(gt_xyxy)] + [list(b) for b in preds.values()], dtype=float)
    lo, hi = boxes[:, :2].min() - 1, boxes[:, 2:].max() + 1
    fig, axes = plt.subplots(1, len(preds), figsize=(3.2 * len(preds), 3.4), squeeze=False)
    for ax, (title, b) in zip(axes[0], preds.items()):
        ix0, iy0 = max(gt_xyxy[0], b[0]), max(gt_xyxy[1], b[1])
        ix1, iy1 = min(gt_xyxy[2], b[2]), min(gt_xyxy[3], b[3])
        if ix1 > ix0 and iy1 > iy0:
            ax.add_patch(
                Rectangle(
                    (ix0, iy0), ix1 - ix0, iy1 - iy0, color="tab:purple", alpha=0.25, label="intersection"
                )
            )
        ax.add_patch(_box_patch(gt_xyxy, ec="tab:green", lw=2, label="ground truth"))
        ax.add_patch(_box_patch(b, ec="tab:red", lw=2, ls="--", label="prediction"))
        ax.set(xlim=(lo, hi), ylim=(hi, lo), aspect="equal", title=title, xlabel=unit)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.2)
    axes[0][0].legend(fontsize=7, loc="lower left")
    return fig


# ---------------------------------------------------------------- SPR sampling-point geometry


def spr_point_geometry(
    sampling_locations: torch.Tensor, ref_boxes_cxcywh: torch.Tensor, eta: float, eps: float = 1e-4
) -> dict[str, torch.Tensor]:
    """Where sampling points lie relative to their query's box, as SPR sees them (Eq. 5, L_atten).

    ``ref_boxes_cxcywh`` [*Q, 4] normalised (the boxes the layer sampled around; ``*Q`` any leading
    shape, e.g. () for one query); ``sampling_locations`` [*Q, ..., 2] normalised (x, y), e.g.
    [*Q, heads, levels, points, 2]; ``eta`` the layer's expansion. Returns ``offsets`` Δp / wh [..., 2];
    ``inside_box`` [...] (the points L_atten calls I); ``inside_expanded`` [...] (zero L_offset);
    ``targets`` [..., 2] normalised: each point clamped to the η-expanded box, Eq. 5's target (the point
    itself when inside). Box sizes are clamped at ``eps`` as in
    :func:`sodlib.losses.formulas.spr_offset_loss`.
    """
    extra = sampling_locations.dim() - ref_boxes_cxcywh.dim()
    box = ref_boxes_cxcywh.reshape(*ref_boxes_cxcywh.shape[:-1], *([1] * extra), 4)
    centre, wh = box[..., :2], box[..., 2:].clamp(min=eps)
    offsets = (sampling_locations - centre) / wh  # Δp in units of the box size
    clamped = offsets.clamp(-eta / 2, eta / 2)  # Eq. 5: nearest point of the η-expanded box
    return {
        "offsets": offsets,
        "inside_box": (offsets.abs() <= 0.5).all(-1),
        "inside_expanded": (offsets == clamped).all(-1),
        "targets": centre + clamped * wh,
    }


_LEVEL_MARKERS = ("o", "s", "^", "D", "v", "P")


def draw_spr_panel(
    ax,
    image_hwc: np.ndarray,
    ref_box_cxcywh,
    eta: float,
    sampling_locations,
    attention_weights,
    gt_box_cxcywh=None,
    title: str = "",
    margin: float = 0.25,
) -> None:
    """One query, one decoder layer: image crop, reference box (yellow), η-expanded box (dashed), ground
    truth (cyan), sampling points (marker = feature level, size ∝ attention weight; green inside the box,
    orange between box and expanded box, red outside with an arrow to Eq. 5's clamped target).

    Coordinates are normalised; ``sampling_locations`` [heads, levels, points, 2], ``attention_weights``
    [heads, levels, points].
    """
    h, w = image_hwc.shape[:2]
    scale = np.array([w, h], dtype=float)
    ref = torch.as_tensor(ref_box_cxcywh, dtype=torch.float32)
    loc = torch.as_tensor(sampling_locations, dtype=torch.float32)
    geo = spr_point_geometry(loc, ref, eta)
    pts, tgt = loc.numpy() * scale, geo["targets"].numpy() * scale
    attn = torch.as_tensor(attention_weights, dtype=torch.float32).numpy()
    exp_box = ref.clone()
    exp_box[2:] *= eta
    corners = np.concatenate([pts.reshape(-1, 2), _cxcywh_corners(exp_box) * scale])
    if gt_box_cxcywh is not None:
        corners = np.concatenate([corners, _cxcywh_corners(torch.as_tensor(gt_box_cxcywh)) * scale])
    (x0, y0), (x1, y1) = corners.min(0), corners.max(0)
    half = (0.5 + margin) * max(x1 - x0, y1 - y0, 8.0)  # a square window around everything drawn
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    ax.set_facecolor("0.5")  # grey beyond the image border
    ax.imshow(image_hwc, extent=(0, w, h, 0), interpolation="nearest")
    ax.set(xlim=(cx - half, cx + half), ylim=(cy + half, cy - half))
    if gt_box_cxcywh is not None:
        ax.add_patch(
            _box_patch(
                _cxcywh_corners(torch.as_tensor(gt_box_cxcywh)).ravel() * np.tile(scale, 2),
                ec="cyan",
                lw=1.2,
                ls=":",
            )
        )
    ax.add_patch(_box_patch(_cxcywh_corners(ref).ravel() * np.tile(scale, 2), ec="yellow", lw=1.5))
    ax.add_patch(_box_patch(_cxcywh_corners(exp_box).ravel() * np.tile(scale, 2), ec="yellow", lw=1, ls="--"))
    colour = np.where(
        geo["inside_box"].numpy(), "lime", np.where(geo["inside_expanded"].numpy(), "orange", "red")
    )
    size = 6 + 90 * attn / max(float(attn.max()), 1e-12)
    for lvl in range(loc.shape[1]):
        ax.scatter(
            pts[:, lvl, :, 0].ravel(),
            pts[:, lvl, :, 1].ravel(),
            s=size[:, lvl].ravel(),
            c=colour[:, lvl].ravel(),
            marker=_LEVEL_MARKERS[lvl % len(_LEVEL_MARKERS)],
            edgecolors="black",
            linewidths=0.4,
            zorder=3,
        )
    outside = ~geo["inside_expanded"].numpy()
    for (px, py), (tx, ty) in zip(pts[outside], tgt[outside]):
        ax.annotate(
            "",
            xy=(tx, ty),
            xytext=(px, py),
            arrowprops={"arrowstyle": "->", "color": "red", "lw": 0.7, "alpha": 0.8},
        )
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _cxcywh_corners(box: torch.Tensor) -> np.ndarray:
    cx, cy, bw, bh = (float(v) for v in box)
    return np.array([[cx - bw / 2, cy - bh / 2], [cx + bw / 2, cy + bh / 2]])


def plot_spr_geometry(image_hwc: np.ndarray, panels: Sequence[Sequence[Mapping]], suptitle: str = ""):
    """A grid of :func:`draw_spr_panel` panels: one row per query, one column per decoder layer.

    ``panels[row][col]`` holds the keyword arguments of :func:`draw_spr_panel` (``ref_box_cxcywh``, ``eta``,
    ``sampling_locations``, ``attention_weights`` and optionally ``gt_box_cxcywh``, ``title``).
    Returns the Figure.
    """
    rows, cols = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.3 * rows + 0.6), squeeze=False)
    for ax_row, row in zip(axes, panels):
        for ax, kw in zip(ax_row, row):
            draw_spr_panel(ax, image_hwc, **kw)
    handles = [
        Line2D([], [], color="yellow", lw=1.5, label="reference box"),
        Line2D([], [], color="yellow", lw=1, ls="--", label="η-expanded box"),
        Line2D([], [], color="cyan", lw=1.2, ls=":", label="matched ground truth"),
        Line2D([], [], ls="", marker="o", mfc="lime", mec="black", label="point inside box"),
        Line2D([], [], ls="", marker="o", mfc="orange", mec="black", label="inside expanded box only"),
        Line2D([], [], ls="", marker="o", mfc="red", mec="black", label="outside: arrow to Eq. 5 target"),
    ]
    handles += [
        Line2D([], [], ls="", marker=_LEVEL_MARKERS[i], mfc="white", mec="black", label=f"level {i}")
        for i in range(np.asarray(panels[0][0]["attention_weights"]).shape[1])
    ]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, frameon=False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


# ---------------------------------------------------------------- predictions and attention heatmaps


def predictions_figure(
    models: Mapping[str, torch.nn.Module],
    samples: Sequence[tuple],
    device="cpu",
    score_threshold: float = 0.3,
    suptitle: str = "",
    num_top: int = 100,
):
    """:func:`plot_predictions_grid` for dataset ``samples`` (``(image [3, S, S], target)`` pairs of one
    square size): each eval-mode model's top-``num_top`` detections per image next to the ground truth.
    Returns the Figure."""
    images = torch.stack([image for image, _ in samples])
    size = images.shape[-1]
    gts = [box_convert(t["boxes"], "cxcywh", "xyxy") * size for _, t in samples]
    predictions = {}
    with torch.no_grad():
        for label, model in models.items():
            with eval_mode(model):
                out = postprocess(
                    model(images.to(device)), [tuple(images.shape[-2:])] * len(samples), num_top=num_top
                )
            predictions[label] = [{k: v.cpu() for k, v in p.items()} for p in out]
    return plot_predictions_grid(
        [image.permute(1, 2, 0).numpy() for image in images],
        gts,
        predictions,
        score_threshold=score_threshold,
        suptitle=suptitle,
    )


def plot_predictions_grid(
    images_hwc: Sequence[np.ndarray],
    gt_boxes_xyxy: Sequence,
    predictions: Mapping[str, Sequence],
    score_threshold: float = 0.3,
    suptitle: str = "",
):
    """One row per image, one column per model: the image, its ground truth (green) and the model's
    predictions scoring at least ``score_threshold`` (red, with the score).

    Boxes are xyxy pixels of the drawn image; ``predictions[label][i]`` is a dict with ``boxes_xyxy`` [n, 4]
    and ``scores`` [n] for image ``i`` (as :func:`sodlib.models.detector.postprocess` returns).
    Returns the Figure.
    """
    rows, cols = len(images_hwc), len(predictions)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 4.0 * rows), squeeze=False)
    for i, (image, gt) in enumerate(zip(images_hwc, gt_boxes_xyxy)):
        for ax, (label, preds) in zip(axes[i], predictions.items()):
            ax.imshow(image, interpolation="nearest")
            for box in np.asarray(gt, dtype=float).reshape(-1, 4):
                ax.add_patch(_box_patch(box, ec="lime", lw=1.0))
            boxes = np.asarray(preds[i]["boxes_xyxy"], dtype=float).reshape(-1, 4)
            scores = np.asarray(preds[i]["scores"], dtype=float).reshape(-1)
            kept = scores >= score_threshold
            for box, score in zip(boxes[kept], scores[kept]):
                ax.add_patch(_box_patch(box, ec="red", lw=1.0, ls="--"))
                ax.text(box[0], box[1] - 1, f"{score:.2f}", color="red", fontsize=5)
            ax.set_title(
                f"{label}: {int(kept.sum())} predictions ≥ {score_threshold:g}, {len(gt)} objects", fontsize=8
            )
            ax.set_xticks([])
            ax.set_yticks([])
    fig.legend(
        handles=[
            Line2D([], [], color="lime", label="ground truth"),
            Line2D([], [], color="red", ls="--", label="prediction"),
        ],
        loc="lower center",
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def crop_to_box(ax, box_xyxy, margin: float, min_window_px: float, title: str = "") -> None:
    """Centre ``ax`` on ``box_xyxy`` (pixels; None leaves the view) in a square window of the box grown by
    ``margin`` box sizes on each side, at least ``min_window_px`` wide; set a small title, hide the ticks."""
    if box_xyxy is not None:
        x0, y0, x1, y1 = (float(v) for v in box_xyxy)
        half = max((0.5 + margin) * max(x1 - x0, y1 - y0), min_window_px / 2)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        ax.set(xlim=(cx - half, cx + half), ylim=(cy + half, cy - half))
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_heatmap_grid(
    panels: Sequence[Sequence[Mapping]],
    suptitle: str = "",
    margin: float = 1.5,
    min_window_px: float = 24.0,
    dilate_px: int = 0,
):
    """A grid of attention heatmaps over images, cropped around a box.

    ``panels[row][col]``: ``image_hwc`` [H, W, 3], ``heat`` [H, W]
    (e.g. :func:`sodlib.inference.heatmaps.splat_attention`), ``box_xyxy`` pixels (drawn in cyan and centred;
    ``None`` shows the whole image), optionally ``boxes_xyxy`` [n, 4] more boxes drawn thin in cyan without
    cropping, ``title``. The window is the box grown by ``margin`` box sizes on each side (at least
    ``min_window_px``). ``dilate_px`` > 0 shows every pixel as the maximum of its (2·dilate_px + 1)²
    neighbourhood, so single points stay visible on whole images (display only). Returns the Figure.
    """
    rows, cols = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.7 * rows), squeeze=False)
    for ax_row, row in zip(axes, panels):
        for ax in ax_row[len(row) :]:
            ax.axis("off")
        for ax, p in zip(ax_row, row):
            image, heat = np.asarray(p["image_hwc"]), np.asarray(p["heat"], dtype=float)
            if dilate_px > 0:
                heat = torch.nn.functional.max_pool2d(
                    torch.as_tensor(heat)[None, None], 2 * dilate_px + 1, stride=1, padding=dilate_px
                )[0, 0].numpy()
            h, w = heat.shape
            ax.set_facecolor("0.5")
            ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest")
            shown = np.ma.masked_where(heat <= 0, heat)
            ax.imshow(
                shown,
                extent=(0, w, h, 0),
                cmap="turbo",
                alpha=0.8,
                interpolation="nearest",
                vmin=0,
                vmax=max(float(heat.max()), 1e-12),
            )
            for box in np.asarray(p.get("boxes_xyxy", np.zeros((0, 4))), dtype=float).reshape(-1, 4):
                ax.add_patch(_box_patch(box, ec="cyan", lw=0.5))
            if p.get("box_xyxy") is not None:
                ax.add_patch(_box_patch(p["box_xyxy"], ec="cyan", lw=1.2))
            crop_to_box(ax, p.get("box_xyxy"), margin, min_window_px, p.get("title", ""))
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- ablation tables


def notebook_image(path: str | Path, max_side: int = 1400, max_bytes: int = 300_000, quality: int = 85):
    """What a notebook should embed for the figure saved at ``path``: the PNG itself when it is at most
    ``max_bytes``, else a JPEG preview (longest side at most ``max_side`` px), so photographic figures do not
    put megabytes into every executed notebook. The full-resolution PNG stays the artefact."""
    import io

    from IPython.display import Image
    from PIL import Image as PILImage

    data = Path(path).read_bytes()
    if len(data) <= max_bytes:
        return Image(data=data, format="png")
    picture = PILImage.open(io.BytesIO(data)).convert("RGB")
    picture.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=quality)
    return Image(data=buf.getvalue(), format="jpeg")

"""Where decoder queries look: attention weights splatted at their sampling points (paper A, Figure 5),
and the share of attention mass that falls inside a ground-truth box (what SPR, §4.1, asks for).

Tensor contract (eval-mode ``model(images, return_sampling=True)["layers"][l]``):
``sampling_locations`` [..., heads, levels, points, 2] normalised (x, y) in [0, 1];
``attention_weights`` [..., heads, levels, points] (softmax over levels × points within each head);
boxes are normalised cxcywh.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou

from sodlib.build import encoder_levels
from sodlib.data.tiling import tile_windows
from sodlib.inference.predict import load_model, output_names, read_image_rgb
from sodlib.io import claim_output_dir, save_figure
from sodlib.models.detector import eval_mode


def splat_attention(
    sampling_locations: Tensor, attention_weights: Tensor, size_hw: tuple[int, int]
) -> Tensor:
    """Heatmap [H, W]: every attention weight added to the pixel its sampling point falls in (nearest
    splat).

    ``sampling_locations`` [..., 2] normalised (x, y); ``attention_weights`` [...] (same leading shape),
    summed over every leading dimension (heads, levels, points, queries). Pixel (row i, col j) covers
    x ∈ [j/W, (j+1)/W), y ∈ [i/H, (i+1)/H); points outside the image are dropped.
    """
    if sampling_locations.shape[:-1] != attention_weights.shape:
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} do not match "
            f"attention_weights {tuple(attention_weights.shape)} (expected [..., 2] and [...])"
        )
    h, w = size_hw
    xy = sampling_locations.detach().float().reshape(-1, 2)
    weights = attention_weights.detach().float().reshape(-1)
    col, row = torch.floor(xy[:, 0] * w).long(), torch.floor(xy[:, 1] * h).long()
    keep = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    heat = torch.zeros(h * w, dtype=torch.float32, device=weights.device)
    heat.index_add_(0, row[keep] * w + col[keep], weights[keep])
    return heat.reshape(h, w)


def attention_density(
    sampling_locations: Tensor,
    attention_weights: Tensor,
    level_strides,
    size_hw: tuple[int, int],
    sigma_per_stride: float = 0.5,
) -> Tensor:
    """Attention as a smooth density [H, W]: every sampling point's weight spread by a Gaussian whose width
    follows its feature level's stride.

    ``sampling_locations`` [..., levels, points, 2] normalised (x, y); ``attention_weights``
    [..., levels, points] (e.g. one query's [heads, levels, points], or several queries'); ``level_strides``
    (L,) the stride of each level in pixels of the *output* grid (a stride-8 level of a 320-px input drawn
    at 960 px: 24); ``size_hw`` the output grid. A point of level l gets σ_l = ``sigma_per_stride`` ·
    stride_l pixels: a bilinear sample of that level reads a 2·stride-wide tent of the image, whose
    standard deviation is stride/√6 ≈ 0.41·stride; 0.5 keeps the picture smooth at that scale.

    Mass: each point's kernel is normalised over the pixels *inside* the grid, so a point near the border
    keeps all its weight, and the density's total is the attention mass of the points inside the image
    (points outside, x or y ∉ [0, 1], are dropped). Pixel (i, j) has centre ((j + 0.5)/W, (i + 0.5)/H).
    Cost: one [H, P] × [P, W] product per level (P points of that level).
    """
    if sampling_locations.shape[:-1] != attention_weights.shape or sampling_locations.dim() < 3:
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} and attention_weights "
            f"{tuple(attention_weights.shape)} must be [..., levels, points, 2] and [..., levels, points]"
        )
    strides = torch.as_tensor(level_strides, dtype=torch.float32).flatten()
    levels = attention_weights.shape[-2]
    if len(strides) != levels or not bool((strides > 0).all()):
        raise ValueError(
            f"level_strides must give {levels} positive strides (one per level), got {level_strides}"
        )
    h, w = int(size_hw[0]), int(size_hw[1])
    xy = sampling_locations.detach().float().movedim(-3, 0).reshape(levels, -1, 2)  # [L, N, 2]
    weights = attention_weights.detach().float().movedim(-2, 0).reshape(levels, -1)  # [L, N]
    cols = torch.arange(w, dtype=torch.float32, device=xy.device) + 0.5
    rows = torch.arange(h, dtype=torch.float32, device=xy.device) + 0.5
    density = torch.zeros(h, w, dtype=torch.float32, device=xy.device)
    for level in range(levels):
        p, a = xy[level], weights[level]
        inside = (p >= 0).all(-1) & (p <= 1).all(-1) & (a != 0)
        if not bool(inside.any()):
            continue
        p, a = p[inside], a[inside]
        sigma = max(float(sigma_per_stride * strides[level]), 0.5)  # at least half a pixel: no underflow
        gx = torch.exp(-0.5 * ((cols[None] - p[:, :1] * w) / sigma) ** 2)  # [N, W]
        gy = torch.exp(-0.5 * ((rows[None] - p[:, 1:] * h) / sigma) ** 2)  # [N, H]
        gx = gx / gx.sum(1, keepdim=True).clamp(min=1e-30)
        gy = gy / gy.sum(1, keepdim=True).clamp(min=1e-30)
        density += (gy * a[:, None]).T @ gx
    return density


def attention_mass_in_boxes(
    sampling_locations: Tensor, attention_weights: Tensor, boxes_cxcywh: Tensor
) -> Tensor:
    """Share of each query's attention mass on points inside its box: Σ_{k inside} A_k / Σ_k A_k.

    ``sampling_locations`` [N, ..., 2], ``attention_weights`` [N, ...], ``boxes_cxcywh`` [N, 4] (one box per
    query, normalised; points on the edge count as inside). Returns [N] in [0, 1] (0 for zero total mass).
    """
    n = boxes_cxcywh.shape[0]
    extra = sampling_locations.dim() - 2
    box = boxes_cxcywh.float().reshape(n, *([1] * extra), 4)
    inside = ((sampling_locations.float() - box[..., :2]).abs() <= box[..., 2:] / 2).all(-1)  # [N, ...]
    weights = attention_weights.float()
    total = weights.reshape(n, -1).sum(1)
    in_box = (weights * inside).reshape(n, -1).sum(1)
    return torch.where(total > 0, in_box / total.clamp(min=1e-12), torch.zeros_like(total))


def query_per_box(pred_boxes_cxcywh: Tensor, scores: Tensor, gt_boxes_cxcywh: Tensor) -> Tensor:
    """For each ground-truth box, the query that detects it best: argmax over queries of score × IoU.

    ``pred_boxes_cxcywh`` [Q, 4], ``scores`` [Q] (best class score), ``gt_boxes_cxcywh`` [G, 4]; returns
    [G] long.
    """
    if len(gt_boxes_cxcywh) == 0:
        return torch.zeros(0, dtype=torch.long)
    iou = box_iou(
        box_convert(gt_boxes_cxcywh.float(), "cxcywh", "xyxy"),
        box_convert(pred_boxes_cxcywh.float(), "cxcywh", "xyxy"),
    )  # [G, Q]
    return (iou * scores.float()[None]).argmax(1)


@torch.no_grad()
def attention_for_objects(
    model: torch.nn.Module, image_chw: Tensor, gt_boxes_cxcywh: Tensor, device="cpu"
) -> dict:
    """Run the eval-mode detector on one image and follow, for every ground-truth box, the query that detects
    it (:func:`query_per_box` on the last layer's boxes and best class scores) through the decoder.

    Returns ``queries`` [G], ``scores`` [G], and per decoder layer (lists of length L):
    ``sampling_locations`` [G, heads, levels, points, 2], ``attention_weights`` [G, heads, levels, points],
    plus ``in_box_share`` [L, G]: :func:`attention_mass_in_boxes` of each query against its own GT box.
    All tensors on the CPU.
    """
    with eval_mode(model):
        out = model(image_chw[None].to(device), return_sampling=True)
    layers = [{k: v[0].float().cpu() for k, v in layer.items()} for layer in out["layers"]]
    gt = gt_boxes_cxcywh.float().cpu().reshape(-1, 4)
    scores = layers[-1]["pred_logits"].sigmoid().amax(-1)  # [Q]
    queries = query_per_box(layers[-1]["pred_boxes"], scores, gt)
    locs = [layer["sampling_locations"][queries] for layer in layers]
    attns = [layer["attention_weights"][queries] for layer in layers]
    share = (
        torch.stack([attention_mass_in_boxes(loc, attn, gt) for loc, attn in zip(locs, attns)])
        if len(gt)
        else torch.zeros(len(layers), 0)
    )
    return {
        "queries": queries,
        "scores": scores[queries],
        "sampling_locations": locs,
        "attention_weights": attns,
        "in_box_share": share,
    }


def in_box_share(model: torch.nn.Module, dataset, num_images: int, device="cpu") -> Tensor:
    """:func:`attention_for_objects`' in-box attention share for every ground-truth object of the first
    ``num_images`` images of ``dataset``, concatenated: [decoder layers, objects]."""
    shares = []
    for i in range(min(num_images, len(dataset))):
        image, target = dataset[i]
        shares.append(attention_for_objects(model, image, target["boxes"], device=device)["in_box_share"])
    return torch.cat(shares, dim=1)


def level_strides(model_cfg) -> tuple[int, ...]:
    """Stride (input pixels) of each decoder level: the encoder's maps (8, 16, 32; from 4 with a stride-4
    level), then each extra level twice the previous one."""

    strides = [2**lv for lv in encoder_levels(model_cfg)]
    while len(strides) < model_cfg.num_levels:
        strides.append(strides[-1] * 2)
    return tuple(strides[: model_cfg.num_levels])


# ---------------------------------------------------------------- one image, chosen objects


@torch.no_grad()
def object_attention(
    model: torch.nn.Module,
    image_uint8: Tensor,
    image_size: int,
    objects: int = 3,
    box_xywh: tuple[float, float, float, float] | None = None,
    slice_size: int | None = None,
    overlap: float = 0.2,
) -> list[dict]:
    """The queries to draw on one image and their attention in every decoder layer.

    The image (or, with ``slice_size``, each overlapping window of it) is resized to ``image_size`` and run
    through the eval-mode detector. Chosen: the ``objects`` queries with the best class scores (across
    windows), or with ``box_xywh`` (pixels) the query that best covers that box (score × IoU,
    :func:`query_per_box`).

    Returns one dict per chosen query: ``window`` (x0, y0, x1, y1) pixels of the image it was run on,
    ``score``, ``label``, ``query``, ``pred_xyxy`` [4] and per layer ``ref_xyxy`` [L, 4] (pixels of the full
    image), and ``sampling_locations`` [L, heads, levels, points, 2] / ``attention_weights``
    [L, heads, levels, points] normalised to the window.
    """
    _, h, w = image_uint8.shape
    device = next(model.parameters()).device
    candidates = []
    for win in _attention_windows(h, w, box_xywh, slice_size, overlap):
        candidates += _window_queries(model, image_uint8, win, image_size, objects, box_xywh, device)
    candidates.sort(key=lambda c: -c["score"])
    return candidates[:1] if box_xywh is not None else candidates[:objects]


def _attention_windows(
    h: int, w: int, box_xywh: tuple | None, slice_size: int | None, overlap: float
) -> list[tuple[int, int, int, int]]:
    """The windows :func:`object_attention` runs the detector on: the whole image, the overlapping
    windows of ``slice_size`` when the image is larger, and with ``box_xywh`` only the window that holds
    the box best (its centre farthest from the window's edge)."""
    windows = (
        tile_windows(w, h, slice_size, round(overlap * slice_size))
        if slice_size and (h > slice_size or w > slice_size)
        else [(0, 0, w, h)]
    )
    if box_xywh is not None:
        x, y, bw, bh = box_xywh
        cx, cy = x + bw / 2, y + bh / 2
        windows = [max(windows, key=lambda win: min(cx - win[0], win[2] - cx, cy - win[1], win[3] - cy))]
    return windows


def _window_queries(
    model: torch.nn.Module,
    image_uint8: Tensor,
    win: tuple[int, int, int, int],
    image_size: int,
    objects: int,
    box_xywh: tuple | None,
    device,
) -> list[dict]:
    """The chosen queries of one window as :func:`object_attention` entries (boxes in image pixels)."""
    x0, y0, x1, y1 = win
    crop = image_uint8[:, y0:y1, x0:x1].to(device).float().div(255)
    crop = torch.nn.functional.interpolate(
        crop[None], size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    with eval_mode(model):
        out = model(crop, return_sampling=True)
    layers = [{k: v[0].float().cpu() for k, v in layer.items()} for layer in out["layers"]]
    scores, labels = layers[-1]["pred_logits"].sigmoid().max(-1)
    scale = torch.tensor([x1 - x0, y1 - y0, x1 - x0, y1 - y0], dtype=torch.float32)
    shift = torch.tensor([x0, y0, x0, y0], dtype=torch.float32)

    def to_pixels(cxcywh: Tensor) -> Tensor:
        return box_convert(cxcywh, "cxcywh", "xyxy") * scale + shift

    if box_xywh is not None:
        x, y, bw, bh = box_xywh
        cx, cy = x + bw / 2, y + bh / 2
        gt = torch.tensor([[(cx - x0) / (x1 - x0), (cy - y0) / (y1 - y0), bw / (x1 - x0), bh / (y1 - y0)]])
        chosen = query_per_box(layers[-1]["pred_boxes"], scores, gt).tolist()
    else:
        chosen = scores.topk(min(objects, len(scores))).indices.tolist()
    return [
        {
            "window": win,
            "query": q,
            "score": float(scores[q]),
            "label": int(labels[q]),
            "pred_xyxy": to_pixels(layers[-1]["pred_boxes"][q]),
            "ref_xyxy": torch.stack([to_pixels(layer["ref_boxes"][q]) for layer in layers]),
            "sampling_locations": torch.stack([layer["sampling_locations"][q] for layer in layers]),
            "attention_weights": torch.stack([layer["attention_weights"][q] for layer in layers]),
        }
        for q in chosen
    ]


def object_density(
    obj: dict, layer: int, strides: tuple[int, ...], image_size: int, size_hw: tuple[int, int]
) -> Tensor:
    """:func:`attention_density` of one :func:`object_attention` entry's ``layer`` on the full image grid
    ``size_hw`` (zero outside its window), as a share of the query's attention (total over all heads = 1)."""
    x0, y0, x1, y1 = obj["window"]
    scale = ((x1 - x0) / image_size * (y1 - y0) / image_size) ** 0.5  # model pixels → image pixels
    weights = obj["attention_weights"][layer]
    heads = weights.shape[0]
    density = torch.zeros(size_hw)
    density[y0:y1, x0:x1] = attention_density(
        obj["sampling_locations"][layer], weights / heads, [s * scale for s in strides], (y1 - y0, x1 - x0)
    )
    return density


def figure_rows(
    found: list[dict],
    model_cfg,
    image_size: int,
    size_hw: tuple[int, int],
    layers: list[int],
    labels: list[str],
) -> list[dict]:
    """:func:`object_attention` entries as the rows :func:`plot_object_attention` draws: the density of
    each of ``layers`` on the image grid ``size_hw``, the boxes, and the row label."""
    strides = level_strides(model_cfg)
    return [
        {
            "densities": [object_density(o, lv, strides, image_size, size_hw).numpy() for lv in layers],
            "ref_xyxy": o["ref_xyxy"].numpy(),
            "pred_xyxy": o["pred_xyxy"].numpy(),
            "label": label,
        }
        for o, label in zip(found, labels)
    ]


# ---------------------------------------------------------------- plotting


def plot_object_attention(
    image_hwc,
    rows: Sequence[Mapping],
    layers: Sequence[int],
    title: str = "",
    context: float = 3.0,
    min_window_px: float = 96.0,
):
    """Each chosen object's attention, one row per object and one panel per decoder layer.

    ``rows[i]``: ``densities`` (one [H, W] map per entry of ``layers``, on the image's own pixel grid: a
    share of the query's attention per pixel), ``ref_xyxy`` [L, 4] (the box each layer sampled around:
    dashed white), ``pred_xyxy`` [4] (the final prediction: solid red), ``label`` (text). The density is
    alpha-blended over the image at full resolution (bilinear display of a smooth map, no pixel is
    dropped); each panel shows the window of ``context`` prediction sizes around the object (at least
    ``min_window_px``); one colour bar per row, shared by its layers, in 10⁻³ of the query's attention per
    pixel. Optional per row: ``image_hwc`` (the row's own image, e.g. a grid of several images' objects),
    ``gt_xyxy`` [4] (a ground-truth box: solid cyan), ``notes`` (one line per layer added to its panel
    title). Returns the Figure.
    """
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("inferno")
    n_rows, n_cols = len(rows), len(layers)
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(2.9 * n_cols + 0.8, 2.9 * n_rows + (0.5 if title else 0.2)),
        squeeze=False,
        layout="constrained",
    )
    for ax_row, row in zip(axes, rows):
        image = row.get("image_hwc", image_hwc)
        _plot_attention_row(fig, ax_row, row, image, layers, cmap, context, min_window_px)
    _attention_legend(fig, rows)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def _plot_attention_row(fig, ax_row, row: Mapping, image, layers, cmap, context: float, min_window_px: float):
    """One row of :func:`plot_object_attention`: a panel per layer and the row's colour bar."""
    import numpy as np
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    h, w = image.shape[:2]
    vmax = max(float(np.max(d)) for d in row["densities"]) * 1e3 or 1e-9
    x0, y0, x1, y1 = (float(v) for v in row["pred_xyxy"])
    half = max(context * max(x1 - x0, y1 - y0), min_window_px) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    for ax, layer, density in zip(ax_row, layers, row["densities"]):
        ax.imshow(image, extent=(0, w, h, 0), interpolation="bilinear")
        # colour by density, and opacity too: where the query does not look, the image stays as it is
        level = np.clip(np.asarray(density, dtype=float) * 1e3 / vmax, 0, 1)
        rgba = cmap(level)
        rgba[..., 3] = 0.85 * np.sqrt(level)
        ax.imshow(rgba, extent=(0, w, h, 0), interpolation="bilinear")
        ax.add_patch(_outline(row["ref_xyxy"][layer], ec="white", lw=1.0, ls="--"))
        ax.add_patch(_outline(row["pred_xyxy"], ec="red", lw=1.2))
        if row.get("gt_xyxy") is not None:
            ax.add_patch(_outline(row["gt_xyxy"], ec="cyan", lw=1.0))
        ax.set(xlim=(cx - half, cx + half), ylim=(cy + half, cy - half), xticks=[], yticks=[])
        note = row["notes"][layers.index(layer)] if row.get("notes") else ""
        ax.set_title(f"layer {layer + 1}" + (f" · {note}" if note else ""), fontsize=8)
    ax_row[0].set_ylabel(row["label"], fontsize=8)
    bar = fig.colorbar(ScalarMappable(Normalize(0, vmax), cmap), ax=list(ax_row), shrink=0.9, pad=0.01)
    bar.set_label("attention per px (10⁻³)", fontsize=7)
    bar.ax.tick_params(labelsize=6)


def _outline(xyxy, **kw):
    """An unfilled rectangle patch over an xyxy box."""
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in xyxy)
    return Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, **kw)


def _attention_legend(fig, rows: Sequence[Mapping]) -> None:
    """The legend of the box outlines below the panels (ground truth only when a row has one)."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color="white", ls="--", label="reference box (sampled around)"),
        Line2D([], [], color="red", label="predicted box"),
    ]
    if any(row.get("gt_xyxy") is not None for row in rows):
        handles.append(Line2D([], [], color="cyan", label="ground truth"))
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=len(handles),
        fontsize=7,
        facecolor="0.35",
        labelcolor="white",
    )


# ---------------------------------------------------------------- the `sodlib heatmap` command


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"x,y,w,h"`` (pixels) → floats; a ValueError names the text."""
    try:
        x, y, w, h = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--box must be x,y,w,h in pixels, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"--box {text!r} has no area")
    return x, y, w, h


def _parse_layers(layer: str, depth: int) -> list[int]:
    """``--layer``: "all" or one decoder layer 1..``depth``, as 0-based indices."""
    if layer == "all":
        return list(range(depth))
    if layer.isdecimal() and layer.isascii() and 1 <= int(layer) <= depth:  # "²" is a digit, not a number
        return [int(layer) - 1]
    raise ValueError(f"--layer must be 'all' or 1..{depth} (the decoder's depth), got {layer!r}")


def heatmap_files(
    checkpoint: str,
    images: list[str],
    out_dir: str,
    layer: str = "all",
    objects: int = 3,
    box: str | None = None,
    slice_size: int | None = None,
    overlap: float = 0.2,
) -> list:
    """``sodlib heatmap``: one figure per image, ``<out_dir>/<stem>_heatmap.png`` (a suffix keeps equal
    stems apart). Everything is checked before the first figure is written: the checkpoint, ``layer``
    ("all" or 1..L), ``objects``, every image's decoding, ``box`` inside every image. Returns the written
    paths."""
    if objects < 1:
        raise ValueError(f"--objects must be at least 1, got {objects}")
    box_xywh = parse_box(box) if box else None
    model, cfg, categories = load_model(checkpoint, with_categories=True)
    layers = _parse_layers(layer, cfg.model.num_decoder_layers)
    decoded = [read_image_rgb(p) for p in images]
    if box_xywh is not None:
        x, y, w, h = box_xywh
        for path, img in zip(images, decoded):
            if x < 0 or y < 0 or x + w > img.shape[2] or y + h > img.shape[1]:
                raise ValueError(f"--box {box} lies outside {path} ({img.shape[2]}x{img.shape[1]} px)")

    out = claim_output_dir(out_dir)  # last of the checks: a refused --out is never created
    names = [c["name"] for c in categories]
    written = []
    for path, img, name in zip(images, decoded, output_names(images, "_heatmap.png")):
        found = object_attention(model, img, cfg.data.image_size, objects, box_xywh, slice_size, overlap)
        rows = figure_rows(
            found,
            cfg.model,
            cfg.data.image_size,
            tuple(img.shape[1:]),
            layers,
            [f"{names[o['label']]} {o['score']:.2f}" for o in found],
        )
        title = _figure_title(path, checkpoint, cfg)
        fig = plot_object_attention(img.permute(1, 2, 0).numpy(), rows, layers, title=title)
        written.append(save_figure(fig, out / name))
    return written


def _figure_title(image_path: str, checkpoint: str, cfg) -> str:
    """``<image> · model <run folder>, trained on <dataset> <root>``."""
    from pathlib import Path

    trained_on = {"synthsod": "SynthSOD"}.get(cfg.data.dataset, cfg.data.dataset)
    return (
        f"{Path(image_path).name} · model {Path(checkpoint).parent.parent.name or Path(checkpoint).name}, "
        f"trained on {trained_on} {cfg.data.root or ''}".rstrip()
    )

"""Where decoder queries look: attention weights splatted at their sampling points (paper A, Figure 5),
and the share of attention mass that falls inside a ground-truth box (what SPR, §4.1, asks for).

Tensor contract (eval-mode ``model(images, return_sampling=True)["layers"][l]``):
``sampling_locations`` [..., heads, levels, points, 2] normalised (x, y) in [0, 1];
``attention_weights`` [..., heads, levels, points] (softmax over levels × points within each head);
boxes are normalised cxcywh.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou


def splat_attention(sampling_locations: Tensor, attention_weights: Tensor, size_hw: tuple[int, int]) -> Tensor:
    """Heatmap [H, W]: every attention weight added to the pixel its sampling point falls in (nearest splat).

    ``sampling_locations`` [..., 2] normalised (x, y); ``attention_weights`` [...] (same leading shape), summed
    over every leading dimension (heads, levels, points, queries). Pixel (row i, col j) covers
    x ∈ [j/W, (j+1)/W), y ∈ [i/H, (i+1)/H); points outside the image are dropped.
    """
    if sampling_locations.shape[:-1] != attention_weights.shape:
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} do not match "
                         f"attention_weights {tuple(attention_weights.shape)} (expected [..., 2] and [...])")
    h, w = size_hw
    xy = sampling_locations.detach().float().reshape(-1, 2)
    weights = attention_weights.detach().float().reshape(-1)
    col, row = torch.floor(xy[:, 0] * w).long(), torch.floor(xy[:, 1] * h).long()
    keep = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    heat = torch.zeros(h * w, dtype=torch.float32, device=weights.device)
    heat.index_add_(0, row[keep] * w + col[keep], weights[keep])
    return heat.reshape(h, w)


def attention_density(sampling_locations: Tensor, attention_weights: Tensor, level_strides, size_hw: tuple[int, int],
                      sigma_per_stride: float = 0.5) -> Tensor:
    """Attention as a smooth density [H, W]: every sampling point's weight spread by a Gaussian whose width
    follows its feature level's stride.

    ``sampling_locations`` [..., levels, points, 2] normalised (x, y); ``attention_weights`` [..., levels, points]
    (e.g. one query's [heads, levels, points], or several queries'); ``level_strides`` (L,) the stride of each
    level in pixels of the *output* grid (a stride-8 level of a 320-px input drawn at 960 px: 24);
    ``size_hw`` the output grid. A point of level l gets σ_l = ``sigma_per_stride`` · stride_l pixels: a
    bilinear sample of that level reads a 2·stride-wide tent of the image, whose standard deviation is
    stride/√6 ≈ 0.41·stride; 0.5 keeps the picture smooth at that scale.

    Mass: each point's kernel is normalised over the pixels *inside* the grid, so a point near the border
    keeps all its weight, and the density's total is the attention mass of the points inside the image
    (points outside, x or y ∉ [0, 1], are dropped). Pixel (i, j) has centre ((j + 0.5)/W, (i + 0.5)/H).
    Cost: one [H, P] × [P, W] product per level (P points of that level).
    """
    if sampling_locations.shape[:-1] != attention_weights.shape or sampling_locations.dim() < 3:
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} and attention_weights "
                         f"{tuple(attention_weights.shape)} must be [..., levels, points, 2] and [..., levels, points]")
    strides = torch.as_tensor(level_strides, dtype=torch.float32).flatten()
    levels = attention_weights.shape[-2]
    if len(strides) != levels or not bool((strides > 0).all()):
        raise ValueError(f"level_strides must give {levels} positive strides (one per level), got {level_strides}")
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


def attention_mass_in_boxes(sampling_locations: Tensor, attention_weights: Tensor, boxes_cxcywh: Tensor) -> Tensor:
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

    ``pred_boxes_cxcywh`` [Q, 4], ``scores`` [Q] (best class score), ``gt_boxes_cxcywh`` [G, 4]; returns [G] long.
    """
    if len(gt_boxes_cxcywh) == 0:
        return torch.zeros(0, dtype=torch.long)
    iou = box_iou(box_convert(gt_boxes_cxcywh.float(), "cxcywh", "xyxy"),
                  box_convert(pred_boxes_cxcywh.float(), "cxcywh", "xyxy"))  # [G, Q]
    return (iou * scores.float()[None]).argmax(1)


@torch.no_grad()
def attention_for_objects(model: torch.nn.Module, image_chw: Tensor, gt_boxes_cxcywh: Tensor, device="cpu") -> dict:
    """Run the eval-mode detector on one image and follow, for every ground-truth box, the query that detects
    it (:func:`query_per_box` on the last layer's boxes and best class scores) through the decoder.

    Returns ``queries`` [G], ``scores`` [G], and per decoder layer (lists of length L):
    ``sampling_locations`` [G, heads, levels, points, 2], ``attention_weights`` [G, heads, levels, points],
    plus ``in_box_share`` [L, G]: :func:`attention_mass_in_boxes` of each query against its own GT box.
    All tensors on the CPU.
    """
    model.eval()
    out = model(image_chw[None].to(device), return_sampling=True)
    layers = [{k: v[0].float().cpu() for k, v in layer.items()} for layer in out["layers"]]
    gt = gt_boxes_cxcywh.float().cpu().reshape(-1, 4)
    scores = layers[-1]["pred_logits"].sigmoid().amax(-1)  # [Q]
    queries = query_per_box(layers[-1]["pred_boxes"], scores, gt)
    locs = [layer["sampling_locations"][queries] for layer in layers]
    attns = [layer["attention_weights"][queries] for layer in layers]
    share = torch.stack([attention_mass_in_boxes(loc, attn, gt) for loc, attn in zip(locs, attns)]) if len(gt) \
        else torch.zeros(len(layers), 0)
    return {"queries": queries, "scores": scores[queries], "sampling_locations": locs, "attention_weights": attns,
            "in_box_share": share}

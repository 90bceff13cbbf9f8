"""MRQM measurements for the notebooks: A_s of a dataset, IAH positives per gt, encoder cost.

* :func:`min_instance_size_px` — A_s of the IoU-aware head: sqrt of the smallest gt area, in pixels of
  the square network input (``data.image_size``).
* :func:`positives_per_gt` — positive tokens per gt under the IAH assignment, dynamic T_I or a fixed
  threshold, with means per SODA-D size bucket (areas in px²: eS (0,144], rS (144,400], gS (400,1024],
  N (1024,2000]).
* :func:`encoder_cost` — GFLOPs (``torch.utils.flop_counter``) and latency of RT-DETR's hybrid encoder,
  BiFPN + SAE and BiFPN + a naive deformable encoder that updates every token of all 4 levels in each of
  ``sae_high_updates + 1`` layers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .config import ModelConfig, RunConfig
from .mrqm_head import assign_one_to_many, dynamic_iou_threshold

__all__ = ["SODAD_BUCKETS_PX2", "encoder_cost", "min_instance_size_px", "positives_per_gt"]

SODAD_BUCKETS_PX2 = {"eS": (0.0, 144.0), "rS": (144.0, 400.0), "gS": (400.0, 1024.0), "N": (1024.0, 2000.0)}


def min_instance_size_px(dataset, image_size: int) -> float:
    """sqrt of the smallest positive gt area after the square resize to ``image_size`` (pixels, a length).

    ``dataset``: a :class:`~sodlib.datasets.CocoDetection` (its training annotations: no crowd, no ignore)
    or a COCO dict (non-crowd, non-ignore annotations).
    """
    coco = dataset if isinstance(dataset, Mapping) else dataset.coco
    sizes = {im["id"]: (float(im["width"]), float(im["height"])) for im in coco["images"]}
    if isinstance(dataset, Mapping):
        anns = [a for a in coco["annotations"] if not a.get("iscrowd", 0) and not a.get("ignore", 0)]
    else:
        anns = [a for i in range(len(dataset)) for a in dataset.training_annotations(i)]
    best = float("inf")
    for a in anns:
        w, h = sizes[a["image_id"]]
        area = a["bbox"][2] * a["bbox"][3] * (image_size / w) * (image_size / h)
        if area > 0:
            best = min(best, area)
    if best == float("inf"):
        raise ValueError("min_instance_size_px: the dataset has no box of positive area")
    return best ** 0.5


def positives_per_gt(gt_boxes_list: Sequence[Tensor], pred_boxes: Tensor, thresholds: str | float = "dynamic",
                     image_hw: tuple[int, int] = (640, 640), as_px: float = 2.0, tb: float = 0.55,
                     k: float = 0.15, p: float = 0.2, valid: Tensor | None = None,
                     force_best: bool = True) -> dict:
    """Positive tokens per gt under :func:`~sodlib.mrqm_head.assign_one_to_many`.

    Args:
        gt_boxes_list: per image [G, 4] normalised cxcywh.
        pred_boxes: [B, N, 4] (or [N, 4] for all images) normalised cxcywh boxes of the tokens (the IAH's
            predictions, or anchors).
        thresholds: ``"dynamic"`` (T_I with ``as_px``, ``tb``, ``k``, ``p``) or a fixed IoU threshold.
        image_hw: input size in pixels (gt sizes are measured in it).
        valid: optional [N] or [B, N] bool mask of usable tokens.
        force_best: the head's best-token rule (every gt >= 1 positive).

    Returns: ``per_gt`` [ΣG] counts, ``area_px2`` [ΣG], ``threshold`` [ΣG], ``buckets`` {eS|rS|gS|N:
    mean count} (NaN for an empty bucket) and ``num_gt`` {bucket: gts}.
    """
    h, w = image_hw
    counts, areas, thrs = [], [], []
    for b, gt in enumerate(gt_boxes_list):
        boxes = pred_boxes if pred_boxes.dim() == 2 else pred_boxes[b]
        mask = None if valid is None else (valid if valid.dim() == 1 else valid[b])
        area = gt[:, 2].float() * w * gt[:, 3].float() * h
        if thresholds == "dynamic":
            thr = dynamic_iou_threshold(area.clamp(min=0).sqrt(), as_px, tb, k, p)
        else:
            thr = torch.full((len(gt),), float(thresholds))
        gt_idx, _, _ = assign_one_to_many(boxes, gt, thr, mask, force_best)
        counts.append(torch.bincount(gt_idx[gt_idx >= 0], minlength=len(gt)))
        areas.append(area)
        thrs.append(thr)
    per_gt, area_px2 = torch.cat(counts).float(), torch.cat(areas)
    buckets, num_gt = {}, {}
    for name, (lo, hi) in SODAD_BUCKETS_PX2.items():
        sel = (area_px2 > lo) & (area_px2 <= hi)
        num_gt[name] = int(sel.sum())
        buckets[name] = float(per_gt[sel].mean()) if sel.any() else float("nan")
    return {"per_gt": per_gt, "area_px2": area_px2, "threshold": torch.cat(thrs), "buckets": buckets,
            "num_gt": num_gt}


# ---------------------------------------------------------------- encoder cost


def _flops_and_latency(module: nn.Module, inputs: list[Tensor], repeats: int) -> tuple[float, float]:
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            module(inputs)
        times = []
        for _ in range(repeats + 1):  # the first run is warm-up
            t0 = time.perf_counter()
            module(inputs)
            times.append(time.perf_counter() - t0)
    return counter.get_total_flops() / 1e9, statistics.median(times[1:]) * 1e3


def _sampling_gflops(cfg: ModelConfig, queries_per_layer: list[int], batch: int) -> float:
    """Bilinear sampling of deformable attention, which the flop counter does not see (grid_sample /
    embedding_bag): per query, head, level (4) and point 4 corners × head_dim multiply-adds."""
    head_dim = cfg.hidden_dim // cfg.num_heads
    per_query = cfg.num_heads * 4 * cfg.num_points * 4 * head_dim * 2  # 2 flops per multiply-add
    return batch * sum(queries_per_layer) * per_query / 1e9


def encoder_cost(cfg: RunConfig | ModelConfig, image_size: int = 640, batch: int = 1, repeats: int = 3,
                 seed: int = 0) -> list[dict]:
    """GFLOPs and latency of the encoders on the backbone maps of a random ``image_size`` image.

    Rows (``encoder``): ``hybrid`` (RT-DETR, C3..C5), ``bifpn`` (BiFPN alone, C2..C5), ``bifpn_sae``
    (BiFPN + SAE), ``bifpn_naive`` (BiFPN + naive deformable encoder), ``sae`` and ``naive`` (the pyramid
    encoders alone, on the BiFPN output). Columns: ``gflops`` (counted matmuls / convolutions),
    ``sampling_gflops`` (deformable sampling, analytic), ``latency_ms`` (median of ``repeats``, no grad,
    current thread count), ``params_m``, ``tokens`` (tokens the encoder's attention updates in total).
    """
    from .detector import build_backbone
    from .encoder import HybridEncoder
    from .mrqm import BiFPNSAEEncoder

    m = cfg.model if isinstance(cfg, RunConfig) else cfg
    torch.manual_seed(seed)
    backbone = build_backbone(m, (2, 3, 4, 5)).eval()
    with torch.no_grad():
        feats = backbone(torch.rand(batch, 3, image_size, image_size))
    hybrid = HybridEncoder(tuple(backbone.out_channels[1:]), m.hidden_dim, m.num_heads, m.encoder_ffn, m.dropout,
                           csp_blocks=m.csp_blocks, expansion=m.expansion).eval()
    sae, naive = (BiFPNSAEEncoder(tuple(backbone.out_channels), m.hidden_dim, m.num_heads, m.num_points,
                                  m.encoder_ffn, m.dropout, m.bifpn_repeats, m.sae_high_updates, naive=flag).eval()
                  for flag in (False, True))
    with torch.no_grad():
        pyramid = sae.bifpn(feats)
    n = [x.shape[2] * x.shape[3] for x in pyramid]
    sae_queries = [sum(n[1:])] * m.sae_high_updates + [n[0]]
    naive_queries = [sum(n)] * (m.sae_high_updates + 1)
    cases = [("hybrid", hybrid, feats[1:], [], n[-1]), ("bifpn", sae.bifpn, feats, [], 0),
             ("bifpn_sae", sae, feats, sae_queries, sum(sae_queries)),
             ("bifpn_naive", naive, feats, naive_queries, sum(naive_queries)),
             ("sae", sae.sae, pyramid, sae_queries, sum(sae_queries)),
             ("naive", naive.sae, pyramid, naive_queries, sum(naive_queries))]
    rows = []
    for name, module, inputs, queries, tokens in cases:
        gflops, ms = _flops_and_latency(module, inputs, repeats)
        rows.append({"encoder": name, "image_size": image_size, "gflops": gflops,
                     "sampling_gflops": _sampling_gflops(m, queries, batch), "latency_ms": ms,
                     "params_m": sum(p.numel() for p in module.parameters()) / 1e6, "tokens": int(tokens)})
    return rows

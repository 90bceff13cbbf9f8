"""MRQM measurements for notebook 06: IAH positives per gt, the encoder's gradient balance, mined queries.

(A_s, the head's training input, is :func:`sodlib.data.datastats.min_instance_size_px`; the encoders' cost
benchmark is :func:`sodlib.studies.bench.encoder_cost`.)

* :func:`positives_per_gt` — positive tokens per gt under the IAH assignment, dynamic T_I or a fixed
  threshold, with means per SODA-D size bucket (areas in px²: eS (0,144], rS (144,400], gS (400,1024],
  N (1024,2000]).
* :func:`trained_positives_per_gt` — the same count on a TRAINED detector with ``model.iah``: its encoder and
  IAH run on images, the head's own predicted boxes and parameters (T_b, k, p, A_s, reading) go through the
  head's assignment under :data:`POSITIVE_RULES` (dynamic T_I, fixed T_b, ATSS's adaptive threshold
  :func:`atss_thresholds` as the control, with and without the best-token rule); :func:`positives_table`
  makes the per-bucket table (:func:`positives_long` its ``rule, bucket, positives_per_gt`` form),
  :func:`positives_verdict` says in words whether small objects get more.
* :func:`threshold_readings` — T_I by gt side under each reading of its units (``model.iah_reading``).
* :func:`encoder_gradient_share` / :func:`gradient_share_table` — how hard the IAH, the auxiliary queries and
  the decoder's own terms pull on the encoder (gradient norms at its output), which sets ``loss.weight_iah``;
  :func:`decoder_loss_curve` — the main decoder's loss from a run's log.csv (with vs without the IAH).
* :func:`mined_queries` — the auxiliary positive queries the trained head mines on one image given its
  targets (the head's own ``forward``), for the query heatmap figure.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

from sodlib.box_ops import box_cxcywh_to_xyxy, box_iou
from sodlib.config import RunConfig
from sodlib.models.detector import eval_mode
from sodlib.models.iou_head import READINGS, assign_one_to_many, dynamic_iou_threshold
from sodlib.studies.runner import run_folder

__all__ = [
    "LOSS_GROUPS",
    "POSITIVE_RULES",
    "SODAD_BUCKETS_PX2",
    "atss_thresholds",
    "decoder_loss_curve",
    "encoder_gradient_share",
    "gradient_share_table",
    "iah_dense_predictions",
    "mined_queries",
    "positives_long",
    "positives_per_gt",
    "positives_table",
    "positives_verdict",
    "threshold_readings",
    "trained_positives_per_gt",
]

SODAD_BUCKETS_PX2 = {"eS": (0.0, 144.0), "rS": (144.0, 400.0), "gS": (400.0, 1024.0), "N": (1024.0, 2000.0)}


def positives_per_gt(
    gt_boxes_list: Sequence[Tensor],
    pred_boxes: Tensor,
    thresholds: str | float = "dynamic",
    image_hw: tuple[int, int] = (640, 640),
    as_px: float = 2.0,
    tb: float = 0.55,
    k: float = 0.15,
    p: float = 0.2,
    valid: Tensor | None = None,
    force_best: bool = True,
    reading: str = "norm_px2",
    level: Tensor | None = None,
) -> dict:
    """Positive tokens per gt under :func:`~sodlib.models.iou_head.assign_one_to_many`.

    Args:
        gt_boxes_list: per image [G, 4] normalised cxcywh.
        pred_boxes: [B, N, 4] (or [N, 4] for all images) normalised cxcywh boxes of the tokens (the IAH's
            predictions, or anchors).
        thresholds: ``"dynamic"`` (T_I with ``as_px``, ``tb``, ``k``, ``p`` and ``reading``), ``"atss"``
            (ATSS's adaptive threshold, :func:`atss_thresholds`) or a fixed IoU threshold.
        image_hw: input size in pixels (gt sizes are measured in it).
        valid: optional [N] or [B, N] bool mask of usable tokens.
        force_best: the head's best-token rule (every gt >= 1 positive).
        reading: units of T_I (:data:`~sodlib.models.iou_head.READINGS`); level: [N] level of each token
            (ATSS).

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
            thr = dynamic_iou_threshold(area.clamp(min=0).sqrt(), as_px, tb, k, p, reading, image_hw)
        elif thresholds == "atss":
            thr = atss_thresholds(boxes, gt, mask, level)
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
    return {
        "per_gt": per_gt,
        "area_px2": area_px2,
        "threshold": torch.cat(thrs),
        "buckets": buckets,
        "num_gt": num_gt,
    }


def atss_thresholds(
    boxes: Tensor, gt_boxes: Tensor, valid: Tensor | None = None, level: Tensor | None = None, topk: int = 9
) -> Tensor:
    """ATSS's adaptive IoU threshold of every gt (Zhang et al. 2020): mean + std of the IoUs of its
    candidates, the ``topk`` tokens nearest to the gt centre on each level (``level`` [N]; all tokens one
    level if None).

    ``boxes`` [N, 4] and ``gt_boxes`` [G, 4] normalised cxcywh; ``valid`` [N] bool. Returns [G]. The control
    rule of :func:`positives_per_gt`: it adapts to each gt's own IoU statistics instead of its size.
    """
    g = gt_boxes.shape[0]
    if g == 0:
        return torch.zeros(0)
    iou = box_iou(box_cxcywh_to_xyxy(boxes.float()), box_cxcywh_to_xyxy(gt_boxes.float()))  # [N, G]
    dist = torch.cdist(boxes[:, :2].float(), gt_boxes[:, :2].float())  # [N, G]
    if valid is not None:
        dist = dist.masked_fill(~valid.reshape(-1, 1), math.inf)
    levels = torch.zeros(len(boxes), dtype=torch.long) if level is None else level.cpu()
    cand = []
    for lvl in levels.unique().tolist():
        idx = (levels == lvl).nonzero().squeeze(1).to(boxes.device)
        near = dist[idx].topk(min(topk, len(idx)), dim=0, largest=False)
        ok = torch.isfinite(near.values)
        cand.append(torch.where(ok, iou[idx].gather(0, near.indices), torch.full_like(near.values, math.nan)))
    cand = torch.cat(cand)  # [candidates, G], NaN = invalid token
    mean = cand.nanmean(0)
    std = ((cand - mean).pow(2).nansum(0) / ((~cand.isnan()).sum(0) - 1).clamp(min=1)).sqrt()
    return (mean + std).nan_to_num(1.0)


def threshold_readings(
    sides_px: Sequence[float] = (4, 8, 16, 32, 64, 128),
    as_px: float = 5.36,
    image_size: int = 320,
    tb: float = 0.55,
    k: float = 0.15,
    p: float = 0.2,
) -> pd.DataFrame:
    """T_I of square gts of ``sides_px`` under every reading of :data:`~sodlib.models.iou_head.READINGS`, for
    A_s = ``as_px`` (the length sqrt(smallest area)) at a square input of ``image_size`` px: one row per
    side."""
    sides = torch.as_tensor(list(sides_px), dtype=torch.float32)
    out = {"side_px": sides.tolist()}
    for reading in READINGS:
        thr = dynamic_iou_threshold(sides, as_px, tb, k, p, reading, (image_size, image_size))
        out[f"T_I {reading}"] = [round(v, 4) for v in thr.tolist()]
    return pd.DataFrame(out)


def decoder_loss_curve(run: str | os.PathLike, window: int = 10) -> pd.DataFrame:
    """The main decoder's loss over training, from a run folder's log.csv: its last layer's weighted
    classification, L1 and GIoU terms (weights from the run's config.json), smoothed over ``window`` logged
    points. Columns ``iteration``, ``decoder_loss``; what the IAH must not pull away (notebook 06)."""
    folder = Path(run)
    log = pd.read_csv(folder / "log.csv")
    loss = json.loads((folder / "config.json").read_text())["loss"]
    cls = next(c for c in ("loss_vfl", "loss_qfl", "loss_tal") if c in log.columns)
    total = (
        loss["weight_vfl"] * log[cls]
        + loss["weight_bbox"] * log["loss_bbox"]
        + loss["weight_giou"] * log["loss_giou"]
    )
    return pd.DataFrame(
        {"iteration": log["iteration"], "decoder_loss": total.rolling(window, min_periods=1).mean()}
    )


def decoder_loss_curves(
    runs: pd.DataFrame, results_dir: str | os.PathLike, window: int = 10
) -> dict[str, list[pd.DataFrame]]:
    """:func:`decoder_loss_curve` of every finished run of a runs frame (``runner.runs_frame``: columns
    ``row`` and ``run``), per row in the table's order; each run read where the table read it (a whole
    retrain on another kind of machine lies in ``machines/<kind>/runs/<run>``)."""
    return {
        row: [decoder_loss_curve(run_folder(results_dir, r), window) for r in group["run"] if r]
        for row, group in runs.groupby("row", sort=False)
    }


# ---------------------------------------------------------------- positives of a trained IoU-aware head

# column of positives_table → (threshold, best-token rule, T_I reading): "dynamic" = the head's T_I (in the
# head's own reading when None), "fixed" = its T_b, "atss" = ATSS's mean + std of the candidates' IoUs
POSITIVE_RULES = {
    "IoU > T_I": ("dynamic", False, None),
    "IoU > T_b": ("fixed", False, None),
    "IoU > ATSS": ("atss", False, None),
    "IoU > T_I (px_px)": ("dynamic", False, "px_px"),
    "T_I + best token": ("dynamic", True, None),
    "T_b + best token": ("fixed", True, None),
}


def _head(model: nn.Module) -> nn.Module:
    head = getattr(model, "aux_head", None)
    if head is None:
        raise ValueError("the detector has no IoU-aware head: build it with model.iah=true")
    if not float(head.as_px) > 0:
        raise ValueError(
            "the IoU-aware head's A_s is not set: load a trained checkpoint (the engine measures "
            "it) or call aux_head.set_min_instance_size(...)"
        )
    return head


@torch.no_grad()
def iah_dense_predictions(model: nn.Module, images: Tensor) -> dict:
    """Eval-mode encoder memory and the IoU-aware head's dense predictions on ``images`` [B, 3, H, W].

    ``model``: a detector built with ``model.iah`` (:class:`~sodlib.models.detector.RTDETR` with
    ``aux_head``). Returns ``memory`` [B, N, C], ``shapes`` (per level (H, W), finest first), ``pred_logits``
    [B, N, K], ``pred_boxes`` [B, N, 4] normalised cxcywh (the boxes the head's assignment compares with the
    gts), ``valid`` [N] bool (tokens the assignment may use) and ``level`` [N] (0 = finest level).
    """
    head = _head(model)
    with eval_mode(model):
        memory, shapes = model.decoder.memory(model.encoder(model.backbone(images)))
        anchors, valid = model.decoder.anchors(shapes, memory.device, memory.dtype)
        logits, boxes = head.predict(memory, anchors, valid)
    level = torch.cat([torch.full((h * w,), i, dtype=torch.long) for i, (h, w) in enumerate(shapes)])
    return {
        "memory": memory,
        "shapes": shapes,
        "pred_logits": logits,
        "pred_boxes": boxes,
        "valid": valid[0, :, 0],
        "level": level.to(memory.device),
    }


def positives_table(per_gt: Mapping[str, Tensor], area_px2: Tensor, threshold: Tensor) -> pd.DataFrame:
    """Mean positives per gt by SODA-D bucket (rows eS, rS, gS, N, then ``all`` = every gt, also > 2000 px²).

    ``per_gt``: column name → [G] counts (e.g. the keys of :data:`POSITIVE_RULES`), ``area_px2`` [G],
    ``threshold`` [G] (the dynamic T_I of each gt). Columns: ``bucket``, ``area px²``, ``gts``, ``mean T_I``,
    one per ``per_gt`` key, and ``dynamic / fixed`` (``IoU > T_I`` over ``IoU > T_b``) when both are given.
    """
    area, thr = area_px2.float().cpu(), threshold.float().cpu()
    counts = {k: v.float().cpu() for k, v in per_gt.items()}
    rows = []
    ranges = {**SODAD_BUCKETS_PX2, "all": (-1.0, float("inf"))}
    for name, (lo, hi) in ranges.items():
        sel = (area > lo) & (area <= hi)
        n = int(sel.sum())
        row = {
            "bucket": name,
            "area px²": "any" if name == "all" else f"({lo:g}, {hi:g}]",
            "gts": n,
            "mean T_I": float(thr[sel].mean()) if n else float("nan"),
        }
        row.update({k: float(v[sel].mean()) if n else float("nan") for k, v in counts.items()})
        if "IoU > T_I" in row and "IoU > T_b" in row:
            fixed = row["IoU > T_b"]
            row["dynamic / fixed"] = row["IoU > T_I"] / fixed if n and fixed > 0 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def trained_positives_per_gt(
    model: nn.Module, dataset, num_images: int | None = None, device="cpu", batch_size: int = 8
) -> pd.DataFrame:
    """Positives per gt of a trained IoU-aware head on the first ``num_images`` of ``dataset`` (all: None).

    The head's predicted boxes (:func:`iah_dense_predictions`) and its own T_b, k, p and A_s go through
    :func:`positives_per_gt` (the head's :func:`~sodlib.models.iou_head.assign_one_to_many`) under every rule
    of :data:`POSITIVE_RULES`: dynamic T_I, fixed T_b or ATSS's adaptive threshold, IoU above the threshold
    only or with the best-token rule the head trains with. ``dataset`` yields (image [3, H, W], target with
    ``boxes`` normalised cxcywh) at the working size. Returns :func:`positives_table`.
    """
    head = _head(model)
    params = {"as_px": float(head.as_px), "tb": float(head.tb), "k": float(head.k), "p": float(head.p)}
    n = len(dataset) if num_images is None else min(num_images, len(dataset))
    counts: dict[str, list[Tensor]] = {k: [] for k in POSITIVE_RULES}
    areas, thresholds = [], []
    for start in range(0, n, batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, n))]
        images = torch.stack([image for image, _ in samples]).to(device)
        gts = [target["boxes"].float().cpu() for _, target in samples]
        dense = iah_dense_predictions(model, images)
        boxes, valid, level = dense["pred_boxes"].float().cpu(), dense["valid"].cpu(), dense["level"].cpu()
        for name, (rule, force, reading) in POSITIVE_RULES.items():
            r = positives_per_gt(
                gts,
                boxes,
                params["tb"] if rule == "fixed" else rule,
                tuple(images.shape[-2:]),
                valid=valid,
                force_best=force,
                reading=reading or head.reading,
                level=level,
                **params,
            )
            counts[name].append(r["per_gt"])
            if name == "IoU > T_I":
                areas.append(r["area_px2"])
                thresholds.append(r["threshold"])
    if not areas:
        raise ValueError("trained_positives_per_gt: no image to measure (empty dataset or num_images=0)")
    return positives_table(
        {k: torch.cat(v) for k, v in counts.items()}, torch.cat(areas), torch.cat(thresholds)
    )


def positives_long(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`positives_table` in long form, columns ``rule, bucket, positives_per_gt`` (SODA-D buckets and
    ``all``; the rules are the table's :data:`POSITIVE_RULES` columns)."""
    rules = [c for c in table.columns if c in POSITIVE_RULES]
    return table.melt(id_vars="bucket", value_vars=rules, var_name="rule", value_name="positives_per_gt")[
        ["rule", "bucket", "positives_per_gt"]
    ]


def positives_verdict(table: pd.DataFrame, label: str = "") -> str:
    """One sentence: does the dynamic T_I give small objects (eS, rS, gS) more positives per gt than the
    fixed T_b (IoU above the threshold, :func:`positives_table` columns), and which bucket keeps the largest
    share of the fixed threshold's positives."""
    t = table.set_index("bucket")
    present = [b for b in SODAD_BUCKETS_PX2 if t.loc[b, "gts"] > 0]
    if not present:
        return f"{label + ': ' if label else ''}no gt in the SODA-D buckets"
    pairs = ", ".join(f"{b} {t.loc[b, 'IoU > T_I']:.2f} vs {t.loc[b, 'IoU > T_b']:.2f}" for b in present)
    small = [b for b in ("eS", "rS", "gS") if b in present]
    diff = [t.loc[b, "IoU > T_I"] - t.loc[b, "IoU > T_b"] for b in small]
    if not small:
        word = "cannot be checked (no small gt)"
    elif all(d > 0 for d in diff):
        word = "MORE positives than the fixed one for every small bucket: the claim holds"
    elif all(d == 0 for d in diff):
        word = "as many positives as the fixed one for every small bucket: the claim is not supported"
    elif all(d <= 0 for d in diff):
        word = (
            "FEWER (or as many) positives than the fixed one for every small bucket: the claim does not hold"
        )
    else:
        word = "more positives for some small buckets and fewer for others: the claim holds only in part"
    ratios = {b: t.loc[b, "dynamic / fixed"] for b in present if t.loc[b, "IoU > T_b"] > 0}
    if ratios:
        hi, lo = max(ratios, key=ratios.get), min(ratios, key=ratios.get)
        share = (
            f"; relative to the fixed threshold, {hi} keeps the largest share of its positives "
            f"({ratios[hi]:.0%}) and {lo} the smallest ({ratios[lo]:.0%})"
        )
    else:
        share = "; no box reaches T_b, so only the best-token rule gives positives"
    return (
        f"{label + ': ' if label else ''}positives per GT above the IoU threshold, dynamic T_I vs fixed T_b: "
        f"{pairs}; the dynamic threshold gives {word}{share}."
    )


LOSS_GROUPS = {
    "decoder": "everything else (matching, denoising, encoder top-K, paper A's terms)",
    "iah": "loss_iah_*",
    "auxq": "loss_auxq_*",
}


def _loss_group(key: str) -> str:
    return "iah" if key.startswith("loss_iah_") else "auxq" if key.startswith("loss_auxq_") else "decoder"


def encoder_gradient_share(
    model: nn.Module, criterion: nn.Module, images: Tensor, targets: list[dict[str, Tensor]]
) -> dict[str, float]:
    """How hard each part of the objective pulls on the encoder: the L2 norm of the gradient that the
    weighted terms of each :data:`LOSS_GROUPS` group send to the encoder's output maps, on one batch.

    ``model`` (training mode is set for the call) and ``criterion`` as the engine builds them. Returns
    ``{group: norm}`` plus ``{group}_loss`` (the group's weighted loss) for the groups present. Used to
    balance the IoU-aware head's dense loss against the decoder's (notebook 06).
    """
    captured = []
    hook = model.encoder.register_forward_hook(lambda _m, _i, out: captured.extend(out))
    was_training = model.training
    model.train()
    try:
        outputs = model(
            images, targets, return_sampling=criterion.needs_sampling, return_hidden=criterion.needs_hidden
        )
    finally:
        hook.remove()
        model.train(was_training)
    weighted = criterion.weighted(criterion(outputs, targets))
    groups: dict[str, list[Tensor]] = {}
    for key, value in weighted.items():
        groups.setdefault(_loss_group(key), []).append(value.float())
    out = {}
    names = [g for g in LOSS_GROUPS if g in groups]
    for i, name in enumerate(names):
        total = torch.stack(groups[name]).sum()
        grads = torch.autograd.grad(total, captured, retain_graph=i < len(names) - 1, allow_unused=True)
        out[name] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
        out[f"{name}_loss"] = float(total.detach())
    return out


def gradient_share_table(
    entries: Mapping[str, RunConfig | tuple[nn.Module, RunConfig]],
    images: Tensor,
    targets: list[dict[str, Tensor]],
    seed: int = 0,
) -> pd.DataFrame:
    """:func:`encoder_gradient_share` on one batch for every ``label → config`` (a freshly initialised
    detector, seeded alike) or ``label → (detector, config)`` (e.g. a trained one, whose criterion the config
    builds): one row per label with each group's gradient norm, its ratio to the decoder's, and its weighted
    loss."""
    from sodlib.build import build_criterion, build_detector

    rows = []
    for label, entry in entries.items():
        torch.manual_seed(seed)
        model, cfg = entry if isinstance(entry, tuple) else (build_detector(entry.model), entry)
        criterion = build_criterion(cfg.loss, cfg.model)
        if cfg.model.iah and not float(model.aux_head.as_px) > 0:
            raise ValueError(f"{label}: set model.iah_as_px (A_s) to measure the IAH")
        share = encoder_gradient_share(model, criterion, images, targets)
        row = {"model": label}
        for group in LOSS_GROUPS:
            if group in share:
                row[f"grad {group}"] = share[group]
                row[f"{group} / decoder"] = share[group] / share["decoder"]
                row[f"loss {group}"] = share[f"{group}_loss"]
        rows.append(row)
    return pd.DataFrame(rows)


@torch.no_grad()
def mined_queries(model: nn.Module, image: Tensor, target: Mapping[str, Tensor], device="cpu") -> dict:
    """The auxiliary positive queries the trained head mines on one image [3, H, W] given its ``target``
    (``boxes`` [G, 4] normalised cxcywh, ``labels`` [G]): the head's own ``forward`` (assignment with T_I,
    best-token rule, ``max_queries`` cap) on the eval-mode encoder memory.

    Returns CPU tensors: ``token`` [M] (each auxiliary query's token, in query order), ``gt`` [M] (its gt),
    ``iou`` [M] (IoU of its box with that gt), ``forced`` [M] bool (kept by the best-token rule, IoU <= T_I),
    ``box`` [M, 4] (the head's predicted box, the query's first reference box; normalised cxcywh),
    ``level`` [M], ``thresholds`` [G] (T_I), ``num_positive`` [G] (positives of each gt before the cap).
    """
    _head(model)  # checks that there is a trained head
    dense = iah_dense_predictions(model, image[None].to(device))
    targets = [{"boxes": target["boxes"].to(device), "labels": target["labels"].to(device)}]
    with eval_mode(model):
        iah = model.aux_head_outputs(dense["memory"], dense["shapes"], targets, tuple(image.shape[-2:]))[
            "iah_outputs"
        ]
    token, gt_idx, thr = iah["aux_token_idx"][0], iah["gt_idx"][0], iah["thresholds"][0]
    gt, iou = gt_idx[token], iah["iou"][0, token]
    return {
        k: v.cpu()
        for k, v in {
            "token": token,
            "gt": gt,
            "iou": iou,
            "forced": iou <= thr[gt],
            "box": iah["pred_boxes"][0, token],
            "level": dense["level"][token],
            "thresholds": thr,
            "num_positive": torch.bincount(gt_idx[gt_idx >= 0], minlength=len(thr)),
        }.items()
    }


# ---------------------------------------------------------------- encoder cost

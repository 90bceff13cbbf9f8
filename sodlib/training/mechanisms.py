"""Is each of paper A's mechanisms acting? Measurements on a trained detector and its training log.

Written by :func:`sodlib.training.engine.train` into every run folder as ``mechanisms.json`` (so they are
committed with the run's metrics, checkpoints are not), and gathered into ``results/tables/mechanisms.csv``
(``metric,row,seed,value``) by :func:`mechanisms_frame`. Metrics (all over the validation split):

* ``spr_outside_share_l{l}``: share of the sampling points of decoder layer l's positive queries (Hungarian
  matched, as in training) that lie outside the layer's η-expanded reference box — what Eq. 5 penalises.
* ``spr_loss_share``: (L_offset + L_atten, weighted, all layers) / total loss over the last 25% of the
  logged training iterations (0 without SPR).
* ``st_gap_{eS,rS,gS,N}``: mean (t − IoU) of the final layer's matched queries per SODA-D size bucket,
  t the run's classification target (ST's c, or the IoU itself without ST: gap 0).
* ``sr_difficulty_spearman``: Spearman correlation of SR's factor r^cls (Eq. 19, before the per-batch
  normalisation, a positive constant) with the difficulty 1 − IoU over the final layer's matched queries.
  Positive: hard positives get more weight, as §4.3 says SR should do.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

from sodlib.build import build_criterion
from sodlib.checkpoints import load_checkpoint
from sodlib.data.datasets import build_dataset, collate_fn
from sodlib.inference.predict import load_model
from sodlib.io import atomic_write_json
from sodlib.losses import formulas as L
from sodlib.losses.criterion import LayerInfo, positive_mask
from sodlib.models.detector import eval_mode

# SODA-D's size buckets on the object's area in pixels (sodlib.evaluation.protocols.SODAD_AREAS),
# Normal left open
SIZE_BUCKETS = (("eS", 0, 12**2), ("rS", 12**2, 20**2), ("gS", 20**2, 32**2), ("N", 32**2, math.inf))


def outside_expanded_box(
    sampling_locations: Tensor, ref_boxes: Tensor, eta: float, mask: Tensor
) -> tuple[int, int]:
    """(points outside the η-expanded box, all points) of the queries in ``mask``.

    ``sampling_locations`` [B, Q, heads, levels, points, 2] normalised (x, y), ``ref_boxes`` [B, Q, 4]
    cxcywh (the box the layer sampled around), ``mask`` [B, Q] bool. A point is outside when
    |Δp| > η/2 in box units along x or y (the points Eq. 5 gives a non-zero loss).
    """
    dp = L._offsets_in_box_units(
        sampling_locations.float(), ref_boxes.float(), mask, eps=1e-6
    )  # as Eq. 5 sees it
    outside = (dp.abs() > eta / 2).any(-1)
    return int(outside.sum()), int(outside.numel())


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation (scipy); NaN with fewer than 3 pairs or a constant input."""
    from scipy.stats import spearmanr

    if len(x) < 3 or bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return float("nan")
    return float(spearmanr(x.cpu().numpy(), y.cpu().numpy()).statistic)


def measure_model(
    model, criterion, dataset, eta_per_layer, device="cpu", batch_size: int = 8
) -> dict[str, float]:
    """``spr_outside_share_l{l}``, ``st_gap_*`` and (with SR) ``sr_difficulty_spearman`` on ``dataset``
    (model and criterion in eval mode meanwhile; their modes are given back)."""
    with eval_mode(model, criterion):
        return _measure(model, criterion, dataset, eta_per_layer, device, batch_size)


@torch.no_grad()
def _measure(model, criterion, dataset, eta_per_layer, device, batch_size) -> dict[str, float]:

    needs_hidden = bool(getattr(criterion, "sr", False))
    outside, total = defaultdict(int), defaultdict(int)
    gaps = defaultdict(list)
    r_all, difficulty = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    for images, targets in loader:
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        out = model(images.to(device), return_sampling=True, return_hidden=needs_hidden)
        layers = out["layers"]
        for i, layer_out in enumerate(layers):
            layer_out = {k: v.float() for k, v in layer_out.items()}
            indices = criterion.matcher(layer_out, targets)
            mask = positive_mask(indices, layer_out["pred_logits"].shape[1]).to(
                layer_out["pred_logits"].device
            )
            o, n = outside_expanded_box(
                layer_out["sampling_locations"], layer_out["ref_boxes"], eta_per_layer[i], mask
            )
            outside[i] += o
            total[i] += n
            if i < len(layers) - 1:
                continue
            m = criterion.matched(layer_out, targets, indices)
            if len(m.query_idx) == 0:
                continue
            info = LayerInfo("final", i)
            t = criterion.positive_target(layer_out, m, info)
            h, w = images.shape[-2:]  # gt areas in pixels of the network input
            area_px = m.gt_boxes[:, 2] * w * m.gt_boxes[:, 3] * h
            for name, lo, hi in SIZE_BUCKETS:
                sel = (area_px >= lo) & (area_px < hi)
                gaps[name] += (t - m.iou)[sel].tolist()
            if needs_hidden:
                logit_cls, _ = criterion._generator_logits(layer_out, m, info)
                r = L.reweight_factor(
                    logit_cls.sigmoid(), t, criterion._matched_score(layer_out, m)
                )  # Eq. 19
                r_all.append(r)
                difficulty.append(1 - m.iou)
    result = {f"spr_outside_share_l{i}": outside[i] / max(total[i], 1) for i in sorted(total)}
    result.update(
        {
            f"st_gap_{name}": (sum(v) / len(v) if v else float("nan"))
            for name, v in ((n, gaps[n]) for n, _, _ in SIZE_BUCKETS)
        }
    )
    if needs_hidden and r_all:
        result["sr_difficulty_spearman"] = spearman(torch.cat(r_all), torch.cat(difficulty))
    return result


def spr_loss_share(log_csv: str | Path, last_fraction: float = 0.25) -> float:
    """Mean of (L_offset + L_atten) / total over the logged iterations in the last ``last_fraction`` of the
    run (weighted terms summed over all layers: the log's ``loss_offset_all`` and ``loss_atten_all``)."""
    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return float("nan")
    last = max(int(r["iteration"]) for r in rows)
    shares = []
    for r in rows:
        if int(r["iteration"]) <= (1 - last_fraction) * last:
            continue
        spr = sum(float(r.get(k) or 0.0) for k in ("loss_offset_all", "loss_atten_all"))
        shares.append(spr / float(r["loss"]) if float(r["loss"]) else 0.0)
    return sum(shares) / len(shares) if shares else float("nan")


def measure_run(folder: str | Path, data_root: str | None = None, device="cpu") -> Path:
    """(Re)write ``mechanisms.json`` of a finished run from its checkpoint (runs trained before the engine
    measured them at the end of training); returns the file's path."""

    folder = Path(folder)
    model, cfg = load_model(folder / "checkpoints" / "last.pt", device=device)
    criterion = build_criterion(cfg.loss, cfg.model).to(device)
    criterion.load_state_dict(load_checkpoint(folder / "checkpoints" / "last.pt")["criterion"])
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False, data_root=data_root)
    found = measure(model, criterion, dataset, cfg.loss.eta_per_layer, folder / "log.csv", device)
    return atomic_write_json(folder / "mechanisms.json", found)


def measure(model, criterion, dataset, eta_per_layer, log_csv: str | Path, device="cpu") -> dict[str, float]:
    """Every metric of this module: :func:`measure_model` on ``dataset`` and :func:`spr_loss_share` of the
    log."""
    return {
        **measure_model(model, criterion, dataset, eta_per_layer, device),
        "spr_loss_share": spr_loss_share(log_csv),
    }


def mechanisms_frame(entries) -> pd.DataFrame:  # noqa: F821 - pandas imported lazily
    """``metric,row,seed,value`` from ``(row label, seed, run folder)`` entries whose folder holds a
    ``mechanisms.json`` (runs without one are skipped)."""
    import json

    import pandas as pd

    rows = []
    for label, seed, folder in entries:
        path = Path(folder) / "mechanisms.json"
        if not path.exists():
            continue
        for metric, value in json.loads(path.read_text()).items():
            rows.append({"metric": metric, "row": label, "seed": seed, "value": value})
    return pd.DataFrame(rows, columns=["metric", "row", "seed", "value"])

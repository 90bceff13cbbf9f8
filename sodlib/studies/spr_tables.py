"""Sample Points Refinement measured on a detector's decoder outputs (notebook 02).

Both functions take ``layers``: the eval-mode per-layer dicts of one image (``model(image[None],
return_sampling=True)["layers"]``, batch 1, float, on the CPU) and ``eta_per_layer`` (``loss.eta_per_layer``).

* :func:`spr_per_query` — for chosen matched (query, object) pairs, per layer: Eq. 5's L_offset and L_atten of
  that query alone, and where its points lie (in the box, outside the η-expanded box); plus the panels that
  :func:`sodlib.studies.viz.plot_spr_geometry` draws.
* :func:`spr_per_layer` — the same over all matched queries of the image, per layer; checks on the way that
  L_offset is the mean of the per-query values ("averaged over positive queries").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sodlib.losses.formulas import spr_attention_loss, spr_offset_loss
from sodlib.studies.viz import spr_point_geometry


def _only(num_queries: int, queries: Sequence[int]) -> Tensor:
    mask = torch.zeros(1, num_queries, dtype=torch.bool)
    mask[0, list(queries)] = True
    return mask


def spr_per_query(
    layers: Sequence[dict],
    eta_per_layer: Sequence[float],
    chosen: Sequence[tuple[int, int]],
    gt_boxes_cxcywh: Tensor,
    scores: Tensor,
) -> tuple[list[dict], list[list[dict]]]:
    """Rows (query, layer, eta, score, points, in box, outside expanded box, L_offset, L_atten) and one list
    of panels per chosen (query, object) pair, a panel per layer."""
    rows, panels = [], []
    for q, obj in chosen:
        only_q = _only(len(scores), [q])
        panels.append([])
        for layer_idx, (layer, eta) in enumerate(zip(layers, eta_per_layer)):
            loc, attn, ref = layer["sampling_locations"], layer["attention_weights"], layer["ref_boxes"]
            offset = float(spr_offset_loss(loc, ref, eta, only_q))  # Eq. 5
            atten = float(spr_attention_loss(loc, attn, ref, only_q))  # L_atten
            geo = spr_point_geometry(loc[0, q], ref[0, q], eta)
            rows.append(
                {
                    "query": q,
                    "layer": layer_idx,
                    "eta": eta,
                    "score": float(scores[q]),
                    "points": geo["inside_box"].numel(),
                    "in box": int(geo["inside_box"].sum()),
                    "outside expanded box": int((~geo["inside_expanded"]).sum()),
                    "L_offset": offset,
                    "L_atten": atten,
                }
            )
            panels[-1].append(
                {
                    "ref_box_cxcywh": ref[0, q],
                    "eta": eta,
                    "sampling_locations": loc[0, q],
                    "attention_weights": attn[0, q],
                    "gt_box_cxcywh": gt_boxes_cxcywh[obj],
                    "title": f"query {q} (score {float(scores[q]):.2f}), layer {layer_idx}, η = {eta:g}\n"
                    f"L_offset = {offset:.3f}   L_atten = {atten:.4f}",
                }
            )
    return rows, panels


def spr_per_layer(layers: Sequence[dict], eta_per_layer: Sequence[float], query_idx: Tensor) -> list[dict]:
    """Per layer over the matched queries ``query_idx``: their count, the share of points outside the box and
    outside the η-expanded box (%), L_offset and L_atten of the image's positives."""
    num_queries = layers[0]["sampling_locations"].shape[1]
    positive = _only(num_queries, query_idx.tolist())
    summary = []
    for layer_idx, (layer, eta) in enumerate(zip(layers, eta_per_layer)):
        loc, attn, ref = layer["sampling_locations"], layer["attention_weights"], layer["ref_boxes"]
        per_query = torch.stack(
            [spr_offset_loss(loc, ref, eta, _only(num_queries, [q])) for q in query_idx.tolist()]
        )
        batch = spr_offset_loss(loc, ref, eta, positive)
        torch.testing.assert_close(per_query.mean(), batch)  # "averaged over positive queries"
        geo = spr_point_geometry(loc[0, query_idx], ref[0, query_idx], eta)
        summary.append(
            {
                "layer": layer_idx,
                "eta": eta,
                "matched queries": len(query_idx),
                "points outside box (%)": 100 * float((~geo["inside_box"]).float().mean()),
                "points outside expanded box (%)": 100 * float((~geo["inside_expanded"]).float().mean()),
                "L_offset": float(batch),
                "L_atten": float(spr_attention_loss(loc, attn, ref, positive)),
            }
        )
    return summary

"""MRQM's IoU-aware head (IAH) and auxiliary positive queries — training only (paper B).

The IAH is a dense Co-DETR-style auxiliary head on the encoder tokens (the decoder's projected memory
[B, ΣHW, C], every level): Linear + LayerNorm, a class Linear and a 3-layer box MLP predicting a
logit-space delta on the decoder's anchor of each token (cxcywh, wh = 0.05·2^level, as RT-DETR's
encoder head). Its positives come from a one-to-many, size-aware IoU assignment (dynamic anchor mining):

* Threshold of a gt box of w×h pixels: ``T_I = max(T_b, T_b + k·(sqrt(w·h)/A_s)^p)`` (T_b = 0.55,
  k = 0.15, p = 0.2). The notes call A_s "the area of the minimal instance" and leave the unit of
  sqrt(w·h) open; :data:`READINGS` are the three we measured (``model.iah_reading``):

  - ``norm_px2`` (default): sqrt(w·h) in the head's own box units (divided by sqrt(H·W) of the input, as
    DETR's normalised cxcywh targets are) over A_s as an AREA in px² of the network input. The ratio is
    far below 1 (1e-4..1e-2 at 320 px), so T_I starts near T_b for the smallest objects and rises with
    size (4 px → 0.582, 128 px → 0.614 with A_s = 5.36² px² at 320 px): the one reading in which the
    dynamic threshold approaches T_b for the smallest objects, as the notes say it should.
  - ``px_px2``: sqrt(w·h) in px over A_s in px² (the notes' words, mixed units): 0.651..0.752.
  - ``px_px``: both lengths in px (A_s = sqrt of the smallest area): the ratio is >= 1 on the training
    set, so every T_I >= T_b + k = 0.70 (0.713..0.833): no mining for small objects.

  The stored A_s (``model.iah_as_px``; measured by the engine on the training set when 0) is always the
  LENGTH sqrt(smallest gt area) in px; the area readings square it. For k >= 0, T_I >= T_b: the dynamic
  threshold never gives MORE positives than a fixed T_b; larger objects get higher thresholds.
* IoU rule (:func:`assign_one_to_many`): IoU between the head's PREDICTED boxes (detached) of the
  valid tokens and the gt boxes. Token i is positive for gt j when IoU(i, j) > T_I(j); a token positive
  for several gts takes the one with the highest IoU. Fixed anchors (0.05·2^level) rarely reach IoU
  0.55 with objects of a few pixels, so, in addition, a gt left without positive gets its best token
  among the still negative valid ones (highest IoU, ties broken by the smallest centre distance),
  greedily, hardest gt first: every gt has >= 1 positive (as long as negative tokens remain), and no
  threshold positive is ever taken from another gt (cf. MaxIoU's ``min_pos_iou`` rule).
* Auxiliary positive queries (Eq. 10): the positives, at most ``max_queries`` per image (forced ones
  first, then by the head's best class score), become queries Q_a = LN(Linear(PE(C_pos))) +
  LN(Linear(F''_pos)) (PE: sine embedding of the predicted box, F''_pos: the token's memory feature,
  not detached so the aux loss trains the encoder; LayerNorms as Co-DETR's pos_trans_norm) with the
  detached predicted box as first reference box. They run through the SAME decoder layers and heads
  (shared weights) in a separate pass (their own padding mask, no interaction with matching or
  denoising queries); each layer is supervised against the assigned gt, no Hungarian matching.

Nothing here runs at inference: ``RTDETR.forward`` calls the head only in training mode with targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from sodlib.box_ops import box_cxcywh_to_xyxy, box_iou
from sodlib.models.decoder import MLP
from sodlib.models.denoising import inverse_sigmoid

__all__ = [
    "READINGS",
    "IoUAwareHead",
    "assign_one_to_many",
    "box_sine_embedding",
    "dynamic_iou_threshold",
    "size_ratio",
]

# model.iah_reading → (unit of sqrt(w·h), unit of A_s); see the module docstring
READINGS = {"norm_px2": ("fraction of the image side", "px²"), "px_px2": ("px", "px²"), "px_px": ("px", "px")}


def _check_reading(reading: str) -> None:
    if reading not in READINGS:
        raise ValueError(f"unknown T_I reading {reading!r}; choose one of {sorted(READINGS)}")


def size_ratio(
    size_px: Tensor, as_px: float, reading: str = "norm_px2", image_hw: tuple[int, int] | None = None
) -> Tensor:
    """sqrt(w·h)/A_s of T_I under ``reading`` (:data:`READINGS`).

    ``size_px``: sqrt(w·h) of the gt boxes in pixels of the network input; ``as_px``: A_s as the LENGTH
    sqrt(smallest gt area) in px; ``image_hw``: the input size (``norm_px2`` divides sqrt(w·h) by sqrt(H·W)).
    """
    if not as_px > 0:
        raise ValueError(f"A_s must be > 0 pixels, got {as_px}")
    _check_reading(reading)
    size = torch.as_tensor(size_px, dtype=torch.float32).clamp(min=0)
    if reading == "px_px":
        return size / as_px
    if reading == "norm_px2":
        if image_hw is None:
            raise ValueError(
                "the 'norm_px2' reading of T_I needs image_hw (sqrt(w·h) is normalised by the image)"
            )
        size = size / math.sqrt(image_hw[0] * image_hw[1])
    return size / as_px**2


def dynamic_iou_threshold(
    size_px: Tensor,
    as_px: float,
    tb: float = 0.55,
    k: float = 0.15,
    p: float = 0.2,
    reading: str = "norm_px2",
    image_hw: tuple[int, int] | None = None,
) -> Tensor:
    """T_I = max(T_b, T_b + k·(sqrt(w·h)/A_s)^p) with the ratio of :func:`size_ratio` (same arguments)."""
    return torch.clamp(tb + k * size_ratio(size_px, as_px, reading, image_hw).pow(p), min=tb)


def box_sine_embedding(boxes: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding [..., dim] of normalised cxcywh boxes [..., 4] (DAB-DETR): dim/4 channels per
    coordinate, [sin, cos] of coordinate·2π / temperature^(2i / (dim/4))."""
    if dim % 8:
        raise ValueError(f"box_sine_embedding: dim must be divisible by 8, got {dim}")
    per = dim // 4
    freq = temperature ** (2 * (torch.arange(per // 2, device=boxes.device, dtype=torch.float32)) / per)
    x = boxes.float().unsqueeze(-1) * (2 * math.pi) / freq  # [..., 4, per/2]
    return torch.cat([x.sin(), x.cos()], -1).flatten(-2).to(boxes.dtype)


@torch.no_grad()
def assign_one_to_many(
    pred_boxes: Tensor,
    gt_boxes: Tensor,
    thresholds: Tensor | float,
    valid: Tensor | None = None,
    force_best: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """One-to-many IoU assignment of one image (see the module docstring for the rule).

    Args:
        pred_boxes: [N, 4] normalised cxcywh (the head's predicted boxes, or anchors).
        gt_boxes: [G, 4] normalised cxcywh.
        thresholds: [G] IoU threshold per gt (or one float).
        valid: optional [N] bool; invalid tokens are never positive.
        force_best: give a gt without positive its best still-negative token (below its threshold).

    Returns: ``gt_idx`` [N] (assigned gt, -1 = negative), ``iou`` [N] (IoU with the assigned gt, 0 for
    negatives) and ``forced`` [N] bool (positives kept by the best-token rule).
    """
    n, g = pred_boxes.shape[0], gt_boxes.shape[0]
    device = pred_boxes.device
    gt_idx = torch.full((n,), -1, dtype=torch.long, device=device)
    forced = torch.zeros(n, dtype=torch.bool, device=device)
    if g == 0 or n == 0:
        return gt_idx, torch.zeros(n, device=device), forced
    iou = box_iou(box_cxcywh_to_xyxy(pred_boxes.float()), box_cxcywh_to_xyxy(gt_boxes.float()))  # [N, G]
    if valid is not None:
        iou = iou.masked_fill(~valid.reshape(n, 1), -1.0)
    thr = torch.as_tensor(thresholds, dtype=iou.dtype, device=device).expand(g)
    cand = torch.where(iou > thr, iou, torch.full_like(iou, -1.0))
    best_iou, best_gt = cand.max(1)
    gt_idx = torch.where(best_iou > -1, best_gt, gt_idx)
    if force_best:
        # ties (e.g. IoU 0 for a tiny box far from every prediction) go to the nearest predicted centre
        dist = (pred_boxes[:, None, :2].float() - gt_boxes[None, :, :2].float()).abs().sum(-1)  # [N, G]
        score = (iou - 1e-6 * dist).masked_fill(iou < 0, -math.inf)  # invalid tokens never
        has_positive = torch.zeros(g, dtype=torch.bool, device=device)
        has_positive[gt_idx[gt_idx >= 0]] = True
        for j in iou.max(0).values.argsort().tolist():  # hardest gt first
            if has_positive[j]:
                continue
            i = int(score[:, j].masked_fill(gt_idx >= 0, -math.inf).argmax())
            if gt_idx[i] >= 0 or score[i, j] == -math.inf:
                continue  # no negative valid token left
            gt_idx[i], forced[i] = j, True
    assigned = iou.gather(1, gt_idx.clamp(min=0).unsqueeze(1)).squeeze(1)
    return gt_idx, torch.where(gt_idx >= 0, assigned.clamp(min=0), torch.zeros_like(assigned)), forced


class IoUAwareHead(nn.Module):
    """The IAH plus the builder of the auxiliary positive queries (module docstring).

    ``forward(memory, shapes, targets, *, anchors, valid, decode, image_hw, return_sampling, return_hidden)``:
    ``anchors`` [1, N, 4] (logit space) and ``valid`` [1, N, 1] are the decoder's token anchors
    (``RTDETRDecoder.anchors``), ``decode`` runs auxiliary queries through the decoder layers
    (``RTDETRDecoder.decode_queries``); :class:`~sodlib.models.detector.RTDETR` passes both. Returns:

    * ``iah_outputs``: ``pred_logits`` [B, N, K], ``pred_boxes`` [B, N, 4] normalised cxcywh (N = ΣHW tokens),
      ``gt_idx`` [B, N] (assigned gt, -1 negative), ``iou`` [B, N] (detached IoU with it), ``indices``
      (per image (token_idx, gt_idx) of the positives, the matcher's format), ``thresholds`` (per image [G]
      T_I), ``aux_token_idx`` (per image the token of each auxiliary query, in query order);
    * ``aux_query_outputs``: one dict per decoder layer over the auxiliary queries [B, M, ...] (M = the
      largest count in the batch; padded queries are masked out of self-attention and never supervised),
      with the decoder's extras when requested; ``aux_query_indices``: per image (query_idx, gt_idx).
      Both are absent when no image has a gt.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_classes: int,
        tb: float = 0.55,
        k: float = 0.15,
        p: float = 0.2,
        as_px: float = 0.0,
        max_queries: int = 300,
        reading: str = "norm_px2",
    ):
        super().__init__()
        _check_reading(reading)
        self.hidden_dim, self.num_classes = hidden_dim, num_classes
        self.tb, self.k, self.p, self.max_queries, self.reading = tb, k, p, max_queries, reading
        self.register_buffer("as_px", torch.tensor(float(as_px)))  # 0 until set (engine: training set)
        self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.score_head = nn.Linear(hidden_dim, num_classes)
        self.bbox_head = MLP(hidden_dim, hidden_dim=hidden_dim, out_dim=4, num_layers=3)
        self.pos_proj = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.feat_proj = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        nn.init.constant_(self.score_head.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(self.bbox_head.layers[-1].weight)
        nn.init.zeros_(self.bbox_head.layers[-1].bias)

    def extra_repr(self) -> str:
        return (
            f"T_b={self.tb}, k={self.k}, p={self.p}, A_s={float(self.as_px):.3g}px, reading={self.reading}, "
            f"max_queries={self.max_queries}"
        )

    def set_min_instance_size(self, as_px: float) -> None:
        """Set A_s (pixels, a length: sqrt of the smallest gt area)."""
        if not as_px > 0:
            raise ValueError(f"A_s must be > 0 pixels, got {as_px}")
        self.as_px.fill_(float(as_px))

    def thresholds(self, gt_boxes: Tensor, image_hw: tuple[int, int]) -> Tensor:
        """T_I [G] of normalised cxcywh gt boxes in an image of ``image_hw`` pixels."""
        as_px = float(self.as_px)
        if as_px <= 0:
            raise ValueError(
                "IoUAwareHead: A_s is not set (model.iah_as_px=0 means 'measure the training set', "
                "which sodlib.training.engine.train does); set model.iah_as_px or call "
                "set_min_instance_size(sodlib.data.datastats.min_instance_size_px(dataset, size))"
            )
        h, w = image_hw
        size_px = (gt_boxes[:, 2].float() * w * gt_boxes[:, 3].float() * h).clamp(min=0).sqrt()
        return dynamic_iou_threshold(size_px, as_px, self.tb, self.k, self.p, self.reading, image_hw)

    def predict(self, memory: Tensor, anchors: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Dense class logits [B, N, K] and boxes [B, N, 4] (normalised cxcywh) from the memory tokens."""
        feat = self.enc_output(memory * valid.to(memory.dtype))
        anchors = torch.where(
            valid, anchors, torch.zeros_like(anchors)
        )  # invalid tokens: finite, never positive
        return self.score_head(feat), torch.sigmoid(self.bbox_head(feat) + anchors)

    def forward(
        self,
        memory: Tensor,
        shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
        *,
        anchors: Tensor,
        valid: Tensor,
        decode: Callable,
        image_hw: tuple[int, int],
        return_sampling: bool = False,
        return_hidden: bool = False,
    ) -> dict:
        with torch.autocast(memory.device.type, enabled=False):  # the head, its boxes and assignment in fp32
            logits, boxes = self.predict(memory.float(), anchors.float(), valid)
        gt_idx, ious, indices, thresholds, queries = [], [], [], [], []
        for b, t in enumerate(targets):
            thr = self.thresholds(t["boxes"], image_hw)
            assigned, iou, forced = assign_one_to_many(boxes[b].detach(), t["boxes"], thr, valid[0, :, 0])
            pos = (assigned >= 0).nonzero().squeeze(1)
            priority = logits[b, pos].detach().float().sigmoid().max(-1).values + 2.0 * forced[pos].float()
            keep = pos[priority.argsort(descending=True)[: self.max_queries]]
            gt_idx.append(assigned), ious.append(iou), thresholds.append(thr)
            indices.append((pos, assigned[pos])), queries.append(keep)
        iah = {
            "pred_logits": logits,
            "pred_boxes": boxes,
            "gt_idx": torch.stack(gt_idx),
            "iou": torch.stack(ious),
            "indices": indices,
            "thresholds": thresholds,
            "aux_token_idx": queries,
        }
        out = {"iah_outputs": iah}
        if max(len(q) for q in queries) == 0:
            return out
        target, ref_unact, blocked = self._aux_queries(memory, boxes.detach(), queries)
        out["aux_query_outputs"] = decode(
            target, ref_unact, memory, shapes, blocked, return_sampling, return_hidden
        )
        out["aux_query_indices"] = [
            (torch.arange(len(q), device=memory.device), gt[q]) for q, gt in zip(queries, gt_idx)
        ]
        return out

    def _aux_queries(self, memory: Tensor, boxes: Tensor, queries: list[Tensor]):
        """Content queries [B, M, C], logit-space reference boxes [B, M, 4] and the padding mask [B, M, M]."""
        bs, m, c = memory.shape[0], max(len(q) for q in queries), memory.shape[-1]
        feats = memory.new_zeros(bs, m, c)
        ref = boxes.new_full((bs, m, 4), 0.5)
        blocked = torch.zeros(bs, m, m, dtype=torch.bool, device=memory.device)  # True = may not attend
        for b, q in enumerate(queries):
            feats[b, : len(q)] = memory[b, q]
            ref[b, : len(q)] = boxes[b, q]
            blocked[b, :, len(q) :] = True
        blocked[:, torch.arange(m), torch.arange(m)] = False  # padded queries attend to themselves only
        target = self.pos_proj(box_sine_embedding(ref, c)) + self.feat_proj(
            feats
        )  # Q_a = Lin(PE(C)) + Lin(F'')
        return target, inverse_sigmoid(ref), blocked

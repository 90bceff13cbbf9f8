"""Hungarian matching between DETR queries and ground-truth objects (RT-DETR's focal-cost matcher)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from sodlib.box_ops import box_cxcywh_to_xyxy, pairwise_giou_xyxy

Indices = list[tuple[Tensor, Tensor]]  # per image: (pred_idx [M], tgt_idx [M]), int64


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising ``cost_class * C_cls + cost_bbox * C_L1 + cost_giou * C_giou``.

    C_cls is the focal cost at the target class, as RT-DETR with ``use_focal_loss``:
    ``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))``, p = sigmoid(logit); the logs are
    computed as softplus of the logit (RT-DETR adds 1e-8 inside the log instead).
    C_L1 is the L1 distance of normalised cxcywh boxes, C_giou = -GIoU.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__()
        costs = {"cost_class": cost_class, "cost_bbox": cost_bbox, "cost_giou": cost_giou}
        for name, value in costs.items():
            if value < 0:
                raise ValueError(f"HungarianMatcher: {name} must be >= 0, got {value}")
        if not any(costs.values()):
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou cannot all be 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
            f"alpha={self.alpha}, gamma={self.gamma}"
        )

    def cost_matrix(self, logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Matching cost [Q, N] of one image: logits [Q, K], boxes [Q, 4] and tgt_boxes [N, 4] cxcywh."""
        logits = logits.float()[:, tgt_labels]  # [Q, N] logit of each target's class
        p = logits.sigmoid()
        pos_cost = self.alpha * (1 - p).pow(self.gamma) * F.softplus(-logits)  # -log p = softplus(-x)
        neg_cost = (1 - self.alpha) * p.pow(self.gamma) * F.softplus(logits)  # -log(1-p) = softplus(x)
        boxes, tgt_boxes = boxes.float(), tgt_boxes.float()
        cost_l1 = torch.cdist(boxes, tgt_boxes, p=1)  # [Q, N]
        cost_giou = -pairwise_giou_xyxy(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))  # [Q, N]
        return self.cost_class * (pos_cost - neg_cost) + self.cost_bbox * cost_l1 + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> Indices:
        """Match each image's queries to its targets.

        outputs: ``pred_logits`` [B, Q, K] (sigmoid logits), ``pred_boxes`` [B, Q, 4] normalised cxcywh.
        targets: B dicts with ``labels`` [N] (int64, 0-based) and ``boxes`` [N, 4] normalised cxcywh.
        Returns B pairs (pred_idx, tgt_idx) of int64 tensors on the predictions' device, of length
        min(Q, N), sorted by pred_idx; empty tensors for an image without targets.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        num_images, num_queries, num_classes = logits.shape
        if len(targets) != num_images:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {num_images} images")
        device = logits.device
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes):
            labels = torch.cat([t["labels"].reshape(-1) for t in targets])
            if bool(((labels < 0) | (labels >= num_classes)).any()):
                raise ValueError(
                    f"HungarianMatcher: target labels must lie in [0, {num_classes}), got "
                    f"{sorted(set(labels.tolist()))}"
                )
        costs = []
        for i, (t, n) in enumerate(zip(targets, sizes)):
            if n == 0:
                continue
            costs.append(
                self.cost_matrix(logits[i], boxes[i], t["labels"].to(device), t["boxes"].to(device)).flatten()
            )
        flat = torch.cat(costs).cpu() if costs else torch.zeros(0)  # one device->host copy for the batch
        if not torch.isfinite(flat).all():
            raise ValueError("HungarianMatcher: the matching cost is not finite (NaN/inf in the predictions)")
        chunks = iter(flat.split([num_queries * n for n in sizes if n > 0]))
        indices = []
        for n in sizes:
            if n == 0:
                empty = torch.zeros(0, dtype=torch.int64, device=device)
                indices.append((empty, empty.clone()))
                continue
            rows, cols = linear_sum_assignment(next(chunks).view(num_queries, n).numpy())
            indices.append(
                (
                    torch.as_tensor(rows, dtype=torch.int64, device=device),
                    torch.as_tensor(cols, dtype=torch.int64, device=device),
                )
            )
        return indices

"""Box format conversions and overlap measures.

Formats: ``cxcywh`` (centre, size), ``xyxy`` (corners), ``xywh`` (COCO: top-left, size).
IoU and GIoU come from torchvision.ops; the element-wise (paired) variants below are what the
losses need and torchvision only offers as full matrices.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou, generalized_box_iou  # noqa: F401  (re-exported)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "xyxy", "cxcywh")


def box_xywh_to_xyxy(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "xywh", "xyxy")


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "xyxy", "xywh")


def box_area_xyxy(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def paired_iou_xyxy(a: Tensor, b: Tensor, eps: float = 1e-7) -> tuple[Tensor, Tensor]:
    """IoU and union of corresponding boxes a[i], b[i] ([..., 4] xyxy). Returns (iou, union)."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area_xyxy(a) + box_area_xyxy(b) - inter
    return inter / union.clamp(min=eps), union


def paired_giou_xyxy(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """Generalised IoU of corresponding boxes ([..., 4] xyxy); finite for degenerate boxes."""
    iou, union = paired_iou_xyxy(a, b, eps)
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    hull = (rb - lt).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=eps)


def pairwise_giou_xyxy(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """GIoU matrix [N, M] between a [N, 4] and b [M, 4] (xyxy).

    Same values as ``torchvision.ops.generalized_box_iou`` for boxes of positive area, but finite
    (no 0/0) for degenerate, zero-area boxes, which the Hungarian matcher must tolerate.
    """
    return paired_giou_xyxy(a[:, None, :], b[None, :, :], eps)  # [N, M]

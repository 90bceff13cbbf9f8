"""Contrastive denoising (DINO / RT-DETR) query groups for training.

Each group holds, for every image, one positive and one negative noised copy of each ground-truth
box (padded to the largest object count in the batch). Positives get box noise below half the box
size (they must reconstruct the object), negatives between one and two halves (they must predict "no
object"); labels are flipped to a random class with probability ``label_noise_ratio / 2``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sodlib.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

__all__ = ["get_contrastive_denoising_training_group", "inverse_sigmoid"]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clipped to [0, 1] and both sides clamped at ``eps`` (RT-DETR's)."""
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def get_contrastive_denoising_training_group(
    targets: list[dict[str, Tensor]],
    num_classes: int,
    num_queries: int,
    class_embed: nn.Module,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, dict | None]:
    """Build the denoising queries that go in front of the ``num_queries`` matching queries.

    Args:
        targets: per image ``boxes`` [N, 4] normalised cxcywh and ``labels`` [N] 0-based.
        class_embed: ``nn.Embedding(num_classes + 1, C)``; index ``num_classes`` is the padding label.
        num_denoising: query budget; groups = max(1, num_denoising // max objects per image).

    Returns:
        ``(dn_embed [B, D, C], dn_boxes_unact [B, D, 4] (inverse-sigmoid cxcywh),
        attn_mask [D+Q, D+Q] bool (True = may not attend), dn_meta)`` with D = 2 · max_objects · groups.
        ``dn_meta``: ``dn_positive_idx`` (list per image of LongTensor indices of its positive queries,
        group-major, so they pair with ``arange(N).repeat(groups)`` ground truths), ``dn_num_group``,
        ``dn_num_split`` = [D, Q]. All four are ``None`` when ``num_denoising == 0`` or no image has
        an object.
    """
    if num_denoising <= 0 or not targets:
        return None, None, None, None
    num_gts = [int(t["labels"].numel()) for t in targets]
    max_gt = max(num_gts)
    if max_gt == 0:
        return None, None, None, None
    device = class_embed.weight.device
    num_group = max(num_denoising // max_gt, 1)
    bs = len(targets)

    labels, boxes, real = _padded_targets(targets, num_gts, max_gt, num_classes, device)
    # layout along the query axis: [group 0: positives (max_gt), negatives (max_gt)], [group 1: ...], ...
    reps = 2 * num_group
    labels = labels.repeat(1, reps)
    boxes = boxes.repeat(1, reps, 1)
    real = real.repeat(1, reps)
    num_dn = max_gt * reps
    negative = ((torch.arange(num_dn, device=device) // max_gt) % 2 == 1).view(1, num_dn, 1)  # [1, D, 1]
    positive_mask = real & ~negative[..., 0]
    dn_positive_idx = [positive_mask[i].nonzero().squeeze(-1) for i in range(bs)]

    if label_noise_ratio > 0:
        flip = (torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5) & real
        new = torch.randint_like(labels, 0, num_classes)
        labels = torch.where(flip, new, labels)

    if box_noise_scale > 0:
        xyxy = box_cxcywh_to_xyxy(boxes)
        diff = (boxes[..., 2:] * 0.5).repeat(1, 1, 2) * box_noise_scale
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        part = torch.rand_like(boxes)
        part = torch.where(negative, part + 1.0, part) * sign
        xyxy = (xyxy + part * diff).clamp(0.0, 1.0)
        boxes = box_xyxy_to_cxcywh(xyxy)
    boxes_unact = inverse_sigmoid(boxes)
    embed = class_embed(labels)  # padding label → zero vector

    attn_mask = _denoising_attn_mask(num_dn, num_queries, max_gt, device)
    dn_meta = {
        "dn_positive_idx": dn_positive_idx,
        "dn_num_group": num_group,
        "dn_num_split": [num_dn, num_queries],
    }
    return embed, boxes_unact, attn_mask, dn_meta


def _padded_targets(
    targets: list[dict[str, Tensor]], num_gts: list[int], max_gt: int, num_classes: int, device
) -> tuple[Tensor, Tensor, Tensor]:
    """Labels [B, max_gt] (padding: ``num_classes``), cxcywh boxes [B, max_gt, 4] (padding: zeros) and the
    mask of real objects [B, max_gt]."""
    bs = len(targets)
    labels = torch.full((bs, max_gt), num_classes, dtype=torch.long, device=device)
    boxes = torch.zeros(bs, max_gt, 4, device=device)
    real = torch.zeros(bs, max_gt, dtype=torch.bool, device=device)
    for i, (t, n) in enumerate(zip(targets, num_gts)):
        if n:
            labels[i, :n] = t["labels"].to(device=device, dtype=torch.long)
            boxes[i, :n] = t["boxes"].to(device=device, dtype=torch.float32)
            real[i, :n] = True
    return labels, boxes, real


def _denoising_attn_mask(num_dn: int, num_queries: int, max_gt: int, device) -> Tensor:
    """[D+Q, D+Q] bool, True = may not attend: the matching queries cannot see the denoising ones, and the
    denoising groups (2 · max_gt queries each) cannot see each other."""
    size = num_dn + num_queries
    attn_mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    attn_mask[num_dn:, :num_dn] = True  # matching queries cannot see the denoising ones
    group = torch.arange(num_dn, device=device) // (2 * max_gt)
    attn_mask[:num_dn, :num_dn] = group[:, None] != group[None, :]  # groups cannot see each other
    return attn_mask

"""The papers' loss formulas as pure functions.

Classification losses take raw ``logits`` [..., K] (sigmoid, one logit per foreground class, no
background class) and a soft ``target`` of the same shape: the quality score (IoU, or paper A's c)
at the matched class of a positive query, 0 everywhere else. All return the element-wise loss
(``reduction="none"``) unless asked to reduce; the criterion sums and divides by the number of boxes.

``pos_weight`` is paper A's Sample Reweighting factor r (Eq. 19), a tensor broadcastable to
``logits``. It REPLACES the weight of the positive term and leaves the negative term untouched
(Eq. 20). Which entries are positive is given by ``positive_mask`` (the one-hot of the matched
class); by default ``target > 0``. Pass the mask explicitly when a positive may have target 0
(a matched prediction that does not overlap its ground truth): RT-DETR treats it as a positive with
weight 0, not as a negative.

Box losses take matched pairs of boxes [M, 4] in normalised cxcywh and return one value per pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .box_ops import box_cxcywh_to_xyxy, paired_giou_xyxy

_REDUCTIONS = ("none", "sum", "mean")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _positive_mask(target: Tensor, positive_mask: Tensor | None) -> Tensor:
    mask = target > 0 if positive_mask is None else positive_mask
    return mask.to(target.dtype)


# ---------------------------------------------------------------- classification


def varifocal_loss(logits: Tensor, target: Tensor, alpha: float = 0.75, gamma: float = 2.0,
                   pos_weight: Tensor | None = None, reduction: str = "none",
                   positive_mask: Tensor | None = None) -> Tensor:
    """Varifocal loss as in RT-DETR (paper A, Eq. 3; Zhang et al. 2021).

    ``weight = alpha * p^gamma * (1 - onehot) + q * onehot`` with p = sigmoid(logits) detached and
    q = ``target`` (IoU at the matched class); loss = weight * BCE-with-logits(logits, target).
    With ``pos_weight`` = r the positive weight q becomes r (Eq. 20); the BCE target stays q.
    """
    target = target.to(logits.dtype)
    positive = _positive_mask(target, positive_mask)
    p = logits.detach().sigmoid()
    # Eq. 3: negatives are suppressed by alpha * p^gamma, positives weighted by their target score q_i
    negative_weight = alpha * p.pow(gamma) * (1 - positive)
    positive_weight = target if pos_weight is None else pos_weight  # Eq. 20: q_i -> r_i
    weight = negative_weight + positive * positive_weight
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight
    return _reduce(loss, reduction)


def quality_focal_loss(logits: Tensor, target: Tensor, beta: float = 2.0, pos_weight: Tensor | None = None,
                       reduction: str = "none", positive_mask: Tensor | None = None) -> Tensor:
    """Quality focal loss of GFL (Li et al. 2020, QFL): ``BCE(sigma, y) * |y - sigma|^beta``.

    y = ``target`` (IoU at the matched class, 0 elsewhere), so negatives get ``BCE(sigma, 0) * sigma^beta``.
    As in GFL and mmdetection the modulating factor is not detached. ``pos_weight`` = r replaces
    ``|y - sigma|^beta`` on the positives (Eq. 20 transferred to GFL, paper A Table 8).
    """
    target = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    modulation = (target - logits.sigmoid()).abs().pow(beta)
    if pos_weight is not None:
        positive = _positive_mask(target, positive_mask)
        modulation = modulation * (1 - positive) + positive * pos_weight
    return _reduce(bce * modulation, reduction)


def task_aligned_target(logits: Tensor, target_iou: Tensor, labels_onehot: Tensor, a: float = 1.0,
                        b: float = 6.0, instance_ids: Tensor | None = None) -> Tensor:
    """TOOD's normalised alignment target t_hat [..., K] (Feng et al. 2021, §3.2), detached.

    t = s^a * u^b at the matched class, s = sigmoid(logits) and u = IoU with the matched ground truth.
    Per instance (all positives assigned to the same ground truth, ``instance_ids`` [...] with -1 for
    negatives): t_hat = t / max_instance(t) * max_instance(u), so the best-aligned positive of an
    instance gets the instance's best IoU as its target.
    Without ``instance_ids`` every positive is its own instance and t_hat = u wherever t > 0: that is
    what TOOD reduces to under DETR's one-to-one matching (one positive per ground truth).
    """
    with torch.no_grad():
        positive = labels_onehot.to(logits.dtype)
        iou = target_iou.to(logits.dtype) * positive  # [..., K]
        t = logits.sigmoid().pow(a) * iou.pow(b) * positive  # TOOD alignment metric: t = s^a * u^b
        tiny = torch.finfo(t.dtype).tiny
        if instance_ids is None:
            return t / t.clamp(min=tiny) * iou
        # one matched class per query: reduce the class axis
        t_q, u_q = t.amax(-1).reshape(-1), iou.amax(-1).reshape(-1)  # [N]
        ids = instance_ids.reshape(-1).to(torch.long)
        valid = ids >= 0
        if not bool(valid.any()):
            return torch.zeros_like(t)
        ids_v = ids[valid]
        n = int(ids_v.max()) + 1
        max_t = t_q.new_zeros(n).scatter_reduce(0, ids_v, t_q[valid], "amax")  # t, u >= 0: zero init is safe
        max_u = u_q.new_zeros(n).scatter_reduce(0, ids_v, u_q[valid], "amax")
        t_hat_q = torch.zeros_like(t_q)
        t_hat_q[valid] = t_q[valid] / max_t[ids_v].clamp(min=tiny) * max_u[ids_v]  # TOOD: t_hat normalisation
        return t_hat_q.reshape(t.shape[:-1])[..., None] * positive


def task_aligned_loss(logits: Tensor, target_iou: Tensor, labels_onehot: Tensor, a: float = 1.0,
                      b: float = 6.0, pos_weight: Tensor | None = None, gamma: float = 2.0,
                      instance_ids: Tensor | None = None, reduction: str = "none") -> Tensor:
    """TOOD's classification loss (Feng et al. 2021, §3.2) on DETR queries.

    L = sum_pos |t_hat - s|^gamma * BCE(s, t_hat) + sum_neg s^gamma * BCE(s, 0), i.e. the quality
    focal loss with the normalised alignment t_hat (:func:`task_aligned_target`) as the soft target.
    ``target_iou``: IoU at the matched class ([..., K], or [..., 1] broadcast over classes);
    ``labels_onehot`` [..., K]: the matched class of each positive (all zero for negatives).
    ``pos_weight`` = r replaces |t_hat - s|^gamma on the positives (Eq. 20 transferred to TOOD).
    """
    t_hat = task_aligned_target(logits, target_iou, labels_onehot, a, b, instance_ids)
    return quality_focal_loss(logits, t_hat, beta=gamma, pos_weight=pos_weight, reduction=reduction,
                              positive_mask=labels_onehot)


# ---------------------------------------------------------------- boxes


def l1_box_loss(pred_cxcywh: Tensor, target_cxcywh: Tensor) -> Tensor:
    """L1 distance of matched boxes [M, 4] (normalised cxcywh), summed over the 4 coordinates -> [M]."""
    return (pred_cxcywh - target_cxcywh).abs().sum(-1)


def giou_box_loss(pred_cxcywh: Tensor, target_cxcywh: Tensor) -> Tensor:
    """1 - GIoU of matched boxes [M, 4] (normalised cxcywh) -> [M]; finite for zero-area boxes."""
    return 1 - paired_giou_xyxy(box_cxcywh_to_xyxy(pred_cxcywh), box_cxcywh_to_xyxy(target_cxcywh))

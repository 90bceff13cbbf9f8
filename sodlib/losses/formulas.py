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

Paper A (§4): :func:`scale_aligned_quality` / :func:`scale_aligned_target` (ST, Eqs. 7-15),
:func:`reweight_factor` (SR, Eq. 19), :func:`spr_offset_loss` (Eq. 5) and :func:`spr_attention_loss`
(L_atten) for Sample Points Refinement. Degenerate (zero-area) boxes never give NaN/inf: areas and box
sizes are clamped at a small ``eps`` (documented per function).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sodlib.box_ops import box_cxcywh_to_xyxy, paired_giou_xyxy

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


def varifocal_loss(
    logits: Tensor,
    target: Tensor,
    alpha: float = 0.75,
    gamma: float = 2.0,
    pos_weight: Tensor | None = None,
    reduction: str = "none",
    positive_mask: Tensor | None = None,
) -> Tensor:
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


def quality_focal_loss(
    logits: Tensor,
    target: Tensor,
    beta: float = 2.0,
    pos_weight: Tensor | None = None,
    reduction: str = "none",
    positive_mask: Tensor | None = None,
) -> Tensor:
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


def task_aligned_target(
    logits: Tensor,
    target_iou: Tensor,
    labels_onehot: Tensor,
    a: float = 1.0,
    b: float = 6.0,
    instance_ids: Tensor | None = None,
) -> Tensor:
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


def task_aligned_loss(
    logits: Tensor,
    target_iou: Tensor,
    labels_onehot: Tensor,
    a: float = 1.0,
    b: float = 6.0,
    pos_weight: Tensor | None = None,
    gamma: float = 2.0,
    instance_ids: Tensor | None = None,
    reduction: str = "none",
) -> Tensor:
    """TOOD's classification loss (Feng et al. 2021, §3.2) on DETR queries.

    L = sum_pos |t_hat - s|^gamma * BCE(s, t_hat) + sum_neg s^gamma * BCE(s, 0), i.e. the quality
    focal loss with the normalised alignment t_hat (:func:`task_aligned_target`) as the soft target.
    ``target_iou``: IoU at the matched class ([..., K], or [..., 1] broadcast over classes);
    ``labels_onehot`` [..., K]: the matched class of each positive (all zero for negatives).
    ``pos_weight`` = r replaces |t_hat - s|^gamma on the positives (Eq. 20 transferred to TOOD).
    """
    t_hat = task_aligned_target(logits, target_iou, labels_onehot, a, b, instance_ids)
    return quality_focal_loss(
        logits, t_hat, beta=gamma, pos_weight=pos_weight, reduction=reduction, positive_mask=labels_onehot
    )


# ---------------------------------------------------------------- boxes


def l1_box_loss(pred_cxcywh: Tensor, target_cxcywh: Tensor) -> Tensor:
    """L1 distance of matched boxes [M, 4] (normalised cxcywh), summed over the 4 coordinates -> [M]."""
    return (pred_cxcywh - target_cxcywh).abs().sum(-1)


def giou_box_loss(pred_cxcywh: Tensor, target_cxcywh: Tensor) -> Tensor:
    """1 - GIoU of matched boxes [M, 4] (normalised cxcywh) -> [M]; finite for zero-area boxes."""
    return 1 - paired_giou_xyxy(box_cxcywh_to_xyxy(pred_cxcywh), box_cxcywh_to_xyxy(target_cxcywh))


# ---------------------------------------------------------------- paper A: scale-aligned target (ST)


def scale_aligned_quality(
    iou: Tensor,
    pred_area: Tensor,
    gt_area: Tensor,
    beta: float = 0.73,
    theta: float = 6.0,
    eps: float = 1e-12,
) -> Tensor:
    """Paper A's quality c of a matched prediction (Eqs. 7-14), element-wise, same shape as ``iou``.

    ``iou`` = u (Eq. 7), ``pred_area`` / ``gt_area`` = A(B) / A(B_hat) in any common unit (only their
    ratio matters). Both areas are clamped at ``eps`` before dividing, so a zero-area box gives a finite
    ρ (0 / 0 reads as ρ = 1). Not detached: the criterion passes detached inputs (c is a target).
    """
    rho = pred_area.clamp(min=eps) / gt_area.clamp(min=eps)  # Eqs. 8, 10: ρ = A(B) / A(B_hat)
    r = rho.sqrt()  # Eq. 12: r = sqrt(ρ)
    v = torch.exp(-theta * (r - 1) ** 2)  # Eq. 13: v = exp(-θ (r - 1)^2)
    return iou.clamp(min=0).pow(beta) * v.pow(1 - beta)  # Eq. 14: c = u^β · v^(1-β)


def scale_aligned_target(
    iou: Tensor,
    pred_area: Tensor,
    gt_area: Tensor,
    score: Tensor | None = None,
    beta: float = 0.73,
    theta: float = 6.0,
    mode: str = "label",
) -> Tensor:
    """Classification target t = c · s of a matched prediction (Eq. 15).

    ``mode="label"``: s is the class target, ``score`` the one-hot (or any class-target tensor that
    broadcasts with c; ``None`` = 1, the matched class): t = c at the matched class, i.e. VFL's target
    with the IoU replaced by c (default; the fixed point of BCE(s, t) is a score equal to c).
    ``mode="pred"``: s is the predicted score, ``score`` required and detached (the literal reading;
    the fixed point of BCE(s, c·s) is s = 0, see notebook 01).
    """
    if mode not in ("label", "pred"):
        raise ValueError(f"scale_aligned_target: mode must be 'label' or 'pred', got {mode!r}")
    c = scale_aligned_quality(iou, pred_area, gt_area, beta, theta)
    if mode == "pred":
        if score is None:
            raise ValueError("scale_aligned_target: mode='pred' needs the predicted score")
        return c * score.detach()  # Eq. 15: t = c · s, s = predicted score
    return c if score is None else c * score  # Eq. 15: t = c · s, s = class target


# ---------------------------------------------------------------- paper A: sample reweighting (SR)


def reweight_factor(w: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """SR factor r = w^(1 - |t - s|) (Eq. 19); w the generator's weight, t the target and s the
    predicted confidence.

    Note: for w in (0, 1), r *grows* with |t - s| (|t - s| = 1 gives r = 1, t = s gives r = w), although
    the paper's prose calls it a decreasing function of the difference; this implements the formula.
    """
    return w.pow(1 - (t - s).abs())  # Eq. 19: r = w^(1 - |t - s|)


# ---------------------------------------------------------------- paper A: sample points refinement (SPR)


def _check_spr_shapes(
    fn: str,
    sampling_locations: Tensor,
    ref_boxes: Tensor,
    positive_mask: Tensor,
    attention_weights: Tensor | None = None,
) -> None:
    """ValueError naming every shape unless they follow the SPR contract."""
    shapes = {
        "sampling_locations": tuple(sampling_locations.shape),
        "ref_boxes": tuple(ref_boxes.shape),
        "positive_mask": tuple(positive_mask.shape),
    }
    expected = (
        "sampling_locations [B, Q, heads, levels, points, 2], ref_boxes [B, Q, 4], positive_mask [B, Q]"
    )
    loc = shapes["sampling_locations"]
    ok = (
        len(loc) == 6
        and loc[-1] == 2
        and shapes["ref_boxes"] == (*loc[:2], 4)
        and shapes["positive_mask"] == loc[:2]
    )
    if attention_weights is not None:
        shapes["attention_weights"] = tuple(attention_weights.shape)
        expected += ", attention_weights [B, Q, heads, levels, points]"
        ok = ok and shapes["attention_weights"] == loc[:5]
    if not ok:
        got = ", ".join(f"{k} {v}" for k, v in shapes.items())
        raise ValueError(f"{fn}: expected {expected}; got {got}")


def _offsets_in_box_units(
    sampling_locations: Tensor, ref_boxes: Tensor, positive_mask: Tensor, eps: float
) -> Tensor:
    """Δp / wh of the positive queries' points: [N, heads, levels, points, 2]."""
    mask = positive_mask.bool()
    loc = sampling_locations[mask]  # [N, heads, levels, points, 2]
    box = ref_boxes[mask][:, None, None, None, :]  # [N, 1, 1, 1, 4]
    return (loc - box[..., :2]) / box[..., 2:].clamp(min=eps)  # Δp in units of the box size


def _mean_over_positives(per_query: Tensor, positive_mask: Tensor) -> Tensor:
    return per_query.sum() / positive_mask.sum().clamp(min=1).to(per_query.dtype)


def spr_offset_loss(
    sampling_locations: Tensor, ref_boxes: Tensor, eta: float, positive_mask: Tensor, eps: float = 1e-4
) -> Tensor:
    """SPR's offset loss L_offset (Eq. 5) of one decoder layer, averaged over the positive queries.

    Args:
        sampling_locations: [B, Q, heads, levels, points, 2] normalised (x, y).
        ref_boxes: [B, Q, 4] normalised cxcywh, the (detached) box the layer sampled around.
        eta: expansion η >= 1 of the box for this layer.
        positive_mask: [B, Q] bool, the matched queries.
        eps: box sizes are clamped at ``eps`` (normalised units, ~0.06 px at 640 px) so that zero-area
            boxes give finite (large) values instead of inf/NaN.

    Δp = location − centre, in units of the box size (Δp / wh: scale invariant). Target: Δp clamped to
    the η-expanded box [−η/2, η/2]. Per point (|Δp_x − tgt_x| + |Δp_y − tgt_y|)^2 (0 inside the
    expanded box), summed over heads, levels and points, averaged over positive queries; 0 without any.
    (The paper prints ||Δp − η·(w, h)||₁² over the outside points; η·(w, h) is read here as the edge of
    the η-expanded box, the nearest point of which is the target.)
    """
    _check_spr_shapes("spr_offset_loss", sampling_locations, ref_boxes, positive_mask)
    dp = _offsets_in_box_units(sampling_locations, ref_boxes, positive_mask, eps)  # [N, M, L, P, 2]
    target = dp.clamp(-eta / 2, eta / 2)  # Eq. 5: the nearest point of the η-expanded box
    per_point = (dp - target).abs().sum(-1).pow(2)  # Eq. 5: ||Δp − target||_1^2, 0 inside
    return _mean_over_positives(per_point, positive_mask)


def spr_attention_loss(
    sampling_locations: Tensor,
    attention_weights: Tensor,
    ref_boxes: Tensor,
    positive_mask: Tensor,
    eps: float = 1e-4,
) -> Tensor:
    """SPR's attention loss L_atten of one decoder layer, averaged over the positive queries.

    ``attention_weights`` [B, Q, heads, levels, points] (softmax over levels × points per head); other
    arguments as :func:`spr_offset_loss` (``eps`` clamps the box size; a zero-area box contains only a
    point exactly at its centre). For each positive query, head m and level l, with I the points inside
    the (unexpanded) box and O those outside: Σ_{k∈O} max(A_k − max_{k'∈I} A_k', 0). A (m, l) with no
    point inside contributes 0. Which points are inside is not differentiated.
    """
    _check_spr_shapes("spr_attention_loss", sampling_locations, ref_boxes, positive_mask, attention_weights)
    dp = _offsets_in_box_units(sampling_locations.detach(), ref_boxes, positive_mask, eps)
    inside = (dp.abs() <= 0.5).all(-1)  # [N, M, L, P]: the point lies in the box
    attn = attention_weights[positive_mask.bool()]  # [N, M, L, P]
    has_inside = inside.any(-1, keepdim=True)  # [N, M, L, 1]
    lowest = torch.finfo(attn.dtype).min
    max_inside = attn.masked_fill(~inside, lowest).amax(-1, keepdim=True)  # max_{k'∈I} A_k'
    max_inside = torch.where(has_inside, max_inside, torch.zeros_like(max_inside))
    hinge = F.relu(attn - max_inside) * (~inside & has_inside).to(attn.dtype)  # L_atten: k ∈ O only
    return _mean_over_positives(hinge, positive_mask)

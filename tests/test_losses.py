import math

import pytest
import torch
from torch.testing import assert_close

from sodlib.losses import (  # the public API of paper A's formulas
    giou_box_loss,
    l1_box_loss,
    quality_focal_loss,
    reweight_factor,
    scale_aligned_quality,
    scale_aligned_target,
    spr_attention_loss,
    spr_offset_loss,
    task_aligned_loss,
    task_aligned_target,
    varifocal_loss,
)

LN2 = math.log(2.0)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _bce(p, t):
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def _tensors():
    # one query, 3 classes: a positive at class 0 (logit 0, target 0.6), negatives at logits 0 and 2
    logits = torch.tensor([[0.0, 0.0, 2.0]], requires_grad=True)
    target = torch.tensor([[0.6, 0.0, 0.0]])
    return logits, target


def test_varifocal_loss_hand_computed():
    logits, target = _tensors()
    loss = varifocal_loss(logits, target, alpha=0.75, gamma=2.0)
    p2 = _sigmoid(2.0)
    expected = [
        0.6 * LN2,  # BCE(0.5, 0.6) = ln 2, weight = q = 0.6
        0.75 * 0.5**2 * LN2,  # negative: alpha * p^gamma * BCE(0.5, 0)
        0.75 * p2**2 * _bce(p2, 0.0),
    ]
    assert_close(loss, torch.tensor([expected]))
    # the weight is detached (RT-DETR): d/dx = weight * (sigmoid(x) - t)
    loss.sum().backward()
    assert_close(logits.grad[0, 0], torch.tensor(0.6 * (0.5 - 0.6)))
    assert_close(logits.grad[0, 1], torch.tensor(0.75 * 0.25 * 0.5))


def test_varifocal_loss_pos_weight_replaces_positive_weight_only():
    logits, target = _tensors()
    base = varifocal_loss(logits, target)
    r = torch.tensor([[0.4, 9.0, 9.0]])  # only the positive entry may be used
    loss = varifocal_loss(logits, target, pos_weight=r)
    assert_close(loss[0, 0], torch.tensor(0.4 * LN2))  # Eq. 20: r * BCE(s, t), target unchanged
    assert_close(loss[0, 1:], base[0, 1:])  # negatives keep alpha * p^gamma


def test_varifocal_loss_positive_with_zero_target_and_reduction():
    logits = torch.tensor([[1.0, -1.0]])
    target = torch.zeros(1, 2)
    onehot = torch.tensor([[1.0, 0.0]])
    loss = varifocal_loss(logits, target, positive_mask=onehot)
    assert loss[0, 0] == 0  # matched but IoU 0: weight q = 0, as in RT-DETR
    p = _sigmoid(-1.0)
    assert_close(loss[0, 1], torch.tensor(0.75 * p**2 * _bce(p, 0.0)))
    assert_close(varifocal_loss(logits, target, positive_mask=onehot, reduction="sum"), loss.sum())
    assert_close(varifocal_loss(logits, target, positive_mask=onehot, reduction="mean"), loss.mean())
    with pytest.raises(ValueError, match="reduction"):
        varifocal_loss(logits, target, reduction="avg")


def test_quality_focal_loss_hand_computed():
    logits, target = _tensors()
    loss = quality_focal_loss(logits, target, beta=2.0)
    p2 = _sigmoid(2.0)
    expected = [LN2 * 0.1**2, LN2 * 0.5**2, _bce(p2, 0.0) * p2**2]  # BCE(s, y) * |y - s|^beta
    assert_close(loss, torch.tensor([expected]))
    r = torch.tensor([[0.4, 9.0, 9.0]])
    loss_r = quality_focal_loss(logits, target, pos_weight=r)
    assert_close(loss_r[0, 0], torch.tensor(0.4 * LN2))
    assert_close(loss_r[0, 1:], loss[0, 1:])


def test_task_aligned_loss_hand_computed_with_instances():
    # three queries, 2 classes: queries 0 and 1 are positives of the same instance (class 1), query 2 negative
    logits = torch.tensor([[0.5, 1.0], [0.0, -0.5], [0.3, -2.0]])
    onehot = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    iou = torch.tensor([[0.0, 0.8], [0.0, 0.5], [0.0, 0.0]])
    ids = torch.tensor([7, 7, -1])
    a, b, gamma = 1.0, 6.0, 2.0
    s0, s1 = _sigmoid(1.0), _sigmoid(-0.5)
    t0, t1 = s0**a * 0.8**b, s1**a * 0.5**b
    tmax, umax = max(t0, t1), 0.8
    th0, th1 = t0 / tmax * umax, t1 / tmax * umax  # TOOD: t_hat = t / max t * max u
    assert_close(task_aligned_target(logits, iou, onehot, a, b, ids)[:, 1], torch.tensor([th0, th1, 0.0]))
    loss = task_aligned_loss(logits, iou, onehot, a, b, gamma=gamma, instance_ids=ids)

    def neg(x):
        p = _sigmoid(x)
        return p**gamma * _bce(p, 0.0)

    expected = torch.tensor(
        [
            [neg(0.5), abs(th0 - s0) ** gamma * _bce(s0, th0)],
            [neg(0.0), abs(th1 - s1) ** gamma * _bce(s1, th1)],
            [neg(0.3), neg(-2.0)],
        ]
    )
    assert_close(loss, expected)
    # pos_weight replaces |t_hat - s|^gamma on the positives only
    r = torch.full((3, 2), 0.3)
    loss_r = task_aligned_loss(logits, iou, onehot, a, b, pos_weight=r, gamma=gamma, instance_ids=ids)
    assert_close(loss_r[:2, 1], torch.tensor([0.3 * _bce(s0, th0), 0.3 * _bce(s1, th1)]))
    assert_close(loss_r[:, 0], loss[:, 0])
    assert_close(loss_r[2], loss[2])


def test_task_aligned_target_one_to_one_is_iou():
    logits = torch.tensor([[0.5, -3.0], [2.0, 0.0]])
    onehot = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    iou = torch.tensor([[0.0, 0.7], [0.4, 0.0]])
    assert_close(task_aligned_target(logits, iou, onehot), iou)
    assert_close(task_aligned_target(logits, iou, onehot, instance_ids=torch.tensor([0, 1])), iou)
    # a [.., 1] IoU broadcasts over the classes
    assert_close(task_aligned_target(logits, iou.sum(-1, keepdim=True), onehot), iou)


def test_box_losses_hand_computed():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]])
    gt = torch.tensor([[0.6, 0.5, 0.2, 0.2], [0.9, 0.5, 0.2, 0.2]])
    assert_close(l1_box_loss(pred, gt), torch.tensor([0.1, 0.4]))
    # overlap: inter 0.02, union 0.06, hull 0.06 -> GIoU 1/3; disjoint: union 0.08, hull 0.12 -> GIoU -1/3
    assert_close(giou_box_loss(pred, gt), torch.tensor([2 / 3, 4 / 3]))


def test_losses_finite_for_extreme_logits_and_degenerate_boxes():
    logits = torch.tensor([[80.0, -80.0], [-80.0, 80.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    onehot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for loss in (
        varifocal_loss(logits, target, positive_mask=onehot),
        quality_focal_loss(logits, target, positive_mask=onehot),
        task_aligned_loss(logits, target, onehot),
    ):
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    boxes = torch.tensor([[0.5, 0.5, 0.0, 0.0]], requires_grad=True)
    loss = giou_box_loss(boxes, torch.tensor([[0.5, 0.5, 0.0, 0.0]])) + l1_box_loss(boxes, boxes.detach())
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(boxes.grad).all()


# ---------------------------------------------------------------- paper A: ST (Eqs. 7-15)


def _c(u, rho, beta=0.73, theta=6.0):  # Eqs. 12-14 by hand
    return u**beta * math.exp(-theta * (math.sqrt(rho) - 1) ** 2) ** (1 - beta)


@pytest.mark.parametrize(
    "iou, pred_area, gt_area, expected",
    [
        (0.5, 0.01, 0.01, 0.5**0.73),  # ρ = 1: v = 1, c = u^β
        (0.6, 0.04, 0.01, 0.6**0.73 * math.exp(-6.0 * 0.27)),  # ρ = 4: r = 2, v = e^-6
        (0.3, 0.0025, 0.01, 0.3**0.73 * math.exp(-6.0 * 0.25 * 0.27)),  # ρ = 1/4: r = 1/2, v = e^-1.5
        (0.8, 2.0, 1.0, _c(0.8, 2.0)),
    ],
)
def test_scale_aligned_quality_hand_computed(iou, pred_area, gt_area, expected):
    c = scale_aligned_quality(
        torch.tensor(iou, dtype=torch.float64),
        torch.tensor(pred_area, dtype=torch.float64),
        torch.tensor(gt_area, dtype=torch.float64),
    )
    assert_close(c, torch.tensor(expected, dtype=torch.float64))


def test_scale_aligned_quality_limits():
    iou = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    pred = torch.tensor([0.01, 0.09, 0.02], dtype=torch.float64)
    gt = torch.tensor([0.04, 0.01, 0.02], dtype=torch.float64)
    rho = [0.25, 9.0, 1.0]
    v = torch.tensor([math.exp(-6.0 * (math.sqrt(r) - 1) ** 2) for r in rho], dtype=torch.float64)
    assert_close(scale_aligned_quality(iou, pred, gt, theta=0.0), iou**0.73)  # θ = 0: v = 1
    assert_close(scale_aligned_quality(iou, pred, gt, beta=0.0), v)  # β = 0: c = v
    assert_close(scale_aligned_quality(iou, pred, gt, beta=1.0), iou)  # β = 1: c = u
    assert_close(scale_aligned_quality(iou, gt, gt, beta=0.4, theta=3.0), iou**0.4)  # ρ = 1
    # the ratio only: areas in pixels give the same c
    assert_close(scale_aligned_quality(iou, pred * 640**2, gt * 640**2), scale_aligned_quality(iou, pred, gt))
    # not symmetric in log ρ: a too-small box (ρ = 1/4, r = 1/2) costs less than a too-large one
    # (ρ = 4, r = 2)
    c = scale_aligned_quality(torch.tensor([0.5, 0.5]), torch.tensor([0.25, 4.0]), torch.tensor([1.0, 1.0]))
    assert c[0] > c[1]


def test_scale_aligned_quality_zero_area_is_finite():
    iou = torch.tensor([0.0, 0.0, 0.3])
    c = scale_aligned_quality(iou, torch.tensor([0.0, 0.0, 0.01]), torch.tensor([0.0, 0.01, 0.0]))
    assert torch.isfinite(c).all() and (c >= 0).all() and (c <= 1).all()
    # the quality of a zero-area prediction of a real box: ρ -> 0, v -> e^-θ
    c = scale_aligned_quality(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.01), beta=0.0)
    assert_close(c, torch.tensor(math.exp(-6.0)), atol=1e-4, rtol=0)


def test_scale_aligned_target_modes():
    iou, pred, gt = torch.tensor([0.5, 0.7]), torch.tensor([0.02, 0.01]), torch.tensor([0.01, 0.01])
    c = torch.tensor([_c(0.5, 2.0), _c(0.7, 1.0)])
    assert_close(scale_aligned_target(iou, pred, gt), c)  # label: s = 1 at the matched class, t = c
    onehot = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert_close(scale_aligned_target(iou[:, None], pred[:, None], gt[:, None], onehot), c[:, None] * onehot)
    score = torch.tensor([0.4, 0.9], requires_grad=True)
    t = scale_aligned_target(iou, pred, gt, score, mode="pred")  # t = c · s, s the predicted score
    assert_close(t, c * torch.tensor([0.4, 0.9]))
    assert not t.requires_grad  # s is detached: t is a target
    assert_close(scale_aligned_target(iou, pred, gt, beta=1.0, theta=2.0), iou)
    with pytest.raises(ValueError, match="predicted score"):
        scale_aligned_target(iou, pred, gt, mode="pred")
    with pytest.raises(ValueError, match="mode"):
        scale_aligned_target(iou, pred, gt, mode="both")


# ---------------------------------------------------------------- paper A: SR factor (Eq. 19)


def test_reweight_factor_values():
    w = torch.tensor([0.5, 0.5, 0.25, 0.81, 0.3])
    t = torch.tensor([0.6, 1.0, 0.8, 0.2, 0.7])
    s = torch.tensor([0.6, 0.0, 0.3, 0.7, 0.7])
    assert_close(reweight_factor(w, t, s), torch.tensor([0.5, 1.0, 0.5, 0.9, 0.3]))  # w^(1-|t-s|)
    # for w in (0, 1), r grows with |t - s| (the formula; the prose says "decreasing")
    d = torch.linspace(0, 1, 11)
    r = reweight_factor(torch.full_like(d, 0.3), d, torch.zeros_like(d))
    assert (r.diff() > 0).all()


# ---------------------------------------------------------------- paper A: SPR (Eq. 5, L_atten)

BOX = (0.5, 0.5, 0.2, 0.1)  # cx, cy, w, h


def _locations(dp, box=BOX):
    """Sampling locations [1, 1, 1, L, P, 2] from offsets in box units dp [L, P, 2]."""
    dp = torch.as_tensor(dp, dtype=torch.float64)
    cx, cy, w, h = box
    return (torch.tensor([cx, cy], dtype=torch.float64) + dp * torch.tensor([w, h], dtype=torch.float64))[
        None, None, None
    ]


def test_spr_offset_loss_hand_computed():
    # eta 1.5: the expanded box spans [-0.75, 0.75] box units around the centre
    dp = [[[1.0, -0.25], [-0.9, 0.95], [0.3, 0.7]]]  # outside in x; outside in x and y; inside
    loc = _locations(dp)
    boxes = torch.tensor([[BOX]], dtype=torch.float64)
    mask = torch.tensor([[True]])
    expected = 0.25**2 + (0.15 + 0.2) ** 2  # (|dx| + |dy|)^2 per point, summed over points
    assert_close(spr_offset_loss(loc, boxes, 1.5, mask), torch.tensor(expected, dtype=torch.float64))
    # a second, all-inside positive halves the mean; a non-positive query far outside is ignored
    loc2 = torch.cat(
        [loc, _locations([[[0.1, 0.1], [0.0, 0.0], [-0.5, 0.5]]]), _locations([[[9.0, 9.0]] * 3])], 1
    )
    boxes2 = boxes.expand(1, 3, 4)
    mask2 = torch.tensor([[True, True, False]])
    assert_close(spr_offset_loss(loc2, boxes2, 1.5, mask2), torch.tensor(expected / 2, dtype=torch.float64))
    # no positives: 0, still differentiable
    loss = spr_offset_loss(loc2.requires_grad_(), boxes2, 1.5, torch.zeros(1, 3, dtype=torch.bool))
    loss.backward()
    assert loss == 0 and (loc2.grad == 0).all()


def test_spr_offset_loss_zero_inside_and_gradient_points_inward():
    g = torch.Generator().manual_seed(0)
    eta = 1.3
    inside = (torch.rand(2, 4, 3, 2, generator=g, dtype=torch.float64) - 0.5) * eta * 0.99  # [heads, L, P, 2]
    loc = _locations(inside.reshape(-1, 3, 2)).reshape(1, 1, 2, 4, 3, 2).requires_grad_()
    boxes = torch.tensor([[BOX]], dtype=torch.float64)
    mask = torch.tensor([[True]])
    loss = spr_offset_loss(loc, boxes, eta, mask)
    loss.backward()
    assert loss == 0 and (loc.grad == 0).all()
    # outside points: the descent direction -grad moves every outside coordinate towards the box
    dp = (torch.rand(2, 4, 3, 2, generator=g, dtype=torch.float64) - 0.5) * 4
    loc = _locations(dp.reshape(-1, 3, 2)).reshape(1, 1, 2, 4, 3, 2).requires_grad_()
    spr_offset_loss(loc, boxes, eta, mask).backward()
    outside = dp.abs() > eta / 2  # per coordinate
    grad = loc.grad[0, 0]
    assert outside.any()
    assert (torch.sign(grad[outside]) == torch.sign(dp[outside])).all()
    point_inside = ~outside.any(-1, keepdim=True).expand_as(dp)
    assert (grad[point_inside] == 0).all()
    # inward steps reduce the loss
    with torch.no_grad():
        stepped = loc - 1e-3 * loc.grad
    assert spr_offset_loss(stepped, boxes, eta, mask) < spr_offset_loss(loc.detach(), boxes, eta, mask)


def _away_from_kinks(dp, edges, margin=0.05):
    """Move offsets that lie within ``margin`` of any edge (|dp| = edge) away from it."""
    for edge in edges:
        near = (dp.abs() - edge).abs() < margin
        dp = torch.where(near, dp + torch.sign(dp) * 2 * margin, dp)
    return dp


def test_spr_offset_loss_gradcheck():
    g = torch.Generator().manual_seed(1)
    B, Q, M, L_, P = 2, 3, 2, 2, 3
    eta = 1.2
    boxes = torch.rand(B, Q, 4, generator=g, dtype=torch.float64) * 0.3 + 0.2
    dp = _away_from_kinks(
        (torch.rand(B, Q, M, L_, P, 2, generator=g, dtype=torch.float64) - 0.5) * 3, [eta / 2]
    )
    loc = (boxes[:, :, None, None, None, :2] + dp * boxes[:, :, None, None, None, 2:]).requires_grad_()
    mask = torch.tensor([[True, False, True], [False, True, True]])
    boxes.requires_grad_()
    assert torch.autograd.gradcheck(lambda lc, bx: spr_offset_loss(lc, bx, eta, mask), (loc, boxes))


def test_spr_attention_loss_hand_computed():
    # 1 head, 2 levels, 3 points; level 0: points 0, 1 inside, 2 outside; level 1: nothing inside
    dp = [[[0.1, 0.2], [-0.4, 0.0], [0.8, 0.1]], [[0.9, 0.0], [0.0, -0.7], [-2.0, 2.0]]]
    loc = _locations(dp)
    boxes = torch.tensor([[BOX]], dtype=torch.float64)
    attn = torch.tensor([[0.1, 0.2, 0.3], [0.25, 0.1, 0.05]], dtype=torch.float64)[None, None, None]
    mask = torch.tensor([[True]])
    # level 0: max(0.3 - max(0.1, 0.2), 0) = 0.1; level 1 has no inside point: 0
    assert_close(spr_attention_loss(loc, attn, boxes, mask), torch.tensor(0.1, dtype=torch.float64))
    # outside weights not above the inside maximum: 0
    attn_ok = torch.tensor([[0.1, 0.3, 0.3], [0.25, 0.0, 0.05]], dtype=torch.float64)[None, None, None]
    assert spr_attention_loss(loc, attn_ok, boxes, mask) == 0
    # two positives average, negatives are ignored
    loc3, attn3 = loc.expand(1, 3, 1, 2, 3, 2), torch.cat([attn, attn_ok, attn], 1)
    mask3 = torch.tensor([[True, True, False]])
    assert_close(
        spr_attention_loss(loc3, attn3, boxes.expand(1, 3, 4), mask3), torch.tensor(0.05, dtype=torch.float64)
    )
    # the gradient lowers the outside weight and raises the inside maximum
    attn_g = attn.clone().requires_grad_()
    spr_attention_loss(loc, attn_g, boxes, mask).backward()
    assert attn_g.grad[0, 0, 0, 0].tolist() == [0.0, -1.0, 1.0]
    assert (attn_g.grad[0, 0, 0, 1] == 0).all()


def test_spr_attention_loss_gradcheck():
    g = torch.Generator().manual_seed(2)
    B, Q, M, L_, P = 2, 3, 2, 2, 4
    boxes = torch.rand(B, Q, 4, generator=g, dtype=torch.float64) * 0.3 + 0.2
    dp = _away_from_kinks((torch.rand(B, Q, M, L_, P, 2, generator=g, dtype=torch.float64) - 0.5) * 2, [0.5])
    loc = boxes[:, :, None, None, None, :2] + dp * boxes[:, :, None, None, None, 2:]
    logits = torch.randn(B, Q, M, L_ * P, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, True]])

    def loss(x):
        attn = x.softmax(-1).view(B, Q, M, L_, P)  # softmax over levels × points per head
        return spr_attention_loss(loc, attn, boxes, mask)

    attn = logits.detach().softmax(-1).view(B, Q, M, L_, P)
    gaps = (attn[..., :, None] - attn[..., None, :]).abs() + torch.eye(P, dtype=torch.float64)
    assert gaps.min() > 1e-4  # no ties: away from the max/hinge kinks
    assert loss(logits) > 0
    assert torch.autograd.gradcheck(loss, (logits,))


def test_spr_losses_zero_area_boxes_are_finite():
    g = torch.Generator().manual_seed(3)
    boxes = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.3, 0.3, 0.0, 0.1]]])
    loc = torch.rand(1, 2, 2, 2, 3, 2, generator=g)
    loc[0, 0, 0, 0, 0] = torch.tensor([0.5, 0.5])  # exactly at the centre of the zero-area box
    loc.requires_grad_()
    attn = torch.rand(1, 2, 2, 2, 3, generator=g).requires_grad_()
    mask = torch.tensor([[True, True]])
    for loss in (spr_offset_loss(loc, boxes, 1.5, mask), spr_attention_loss(loc, attn, boxes, mask)):
        grads = torch.autograd.grad(loss, (loc, attn), allow_unused=True)
        assert torch.isfinite(loss)
        assert all(gr is None or torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize(
    "loc_shape, box_shape, mask_shape, attn_shape",
    [
        ((2, 3, 2, 2, 4, 2), (2, 3, 5), (2, 3), (2, 3, 2, 2, 4)),  # box
        ((2, 3, 2, 2, 4, 2), (2, 3, 4), (2, 4), (2, 3, 2, 2, 4)),  # mask
        ((2, 3, 2, 4, 2), (2, 3, 4), (2, 3), (2, 3, 2, 4)),  # no level axis
        ((2, 3, 2, 2, 4, 2), (2, 3, 4), (2, 3), (2, 3, 2, 2, 3)),  # attention only
    ],
)
def test_spr_losses_reject_mismatched_shapes(loc_shape, box_shape, mask_shape, attn_shape):
    loc, boxes = torch.rand(loc_shape), torch.rand(box_shape)
    mask, attn = torch.ones(mask_shape, dtype=torch.bool), torch.rand(attn_shape)
    shapes = (
        r"got sampling_locations \("
        + ", ".join(map(str, loc_shape))
        + r"\), ref_boxes \("
        + ", ".join(map(str, box_shape))
        + r"\), positive_mask \("
        + ", ".join(map(str, mask_shape))
    )
    with pytest.raises(
        ValueError,
        match=r"spr_attention_loss: .*"
        + shapes
        + r".*attention_weights \("
        + ", ".join(map(str, attn_shape)),
    ):
        spr_attention_loss(loc, attn, boxes, mask)
    if attn_shape == (2, 3, 2, 2, 3):  # everything but the attention weights fits spr_offset_loss
        assert torch.isfinite(spr_offset_loss(loc, boxes, 1.5, mask))
        return
    with pytest.raises(ValueError, match=r"spr_offset_loss: .*" + shapes):
        spr_offset_loss(loc, boxes, 1.5, mask)

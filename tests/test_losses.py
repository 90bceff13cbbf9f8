import math

import pytest
import torch
from torch.testing import assert_close

from sodlib.losses import (
    giou_box_loss,
    l1_box_loss,
    quality_focal_loss,
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
    expected = [0.6 * LN2,  # BCE(0.5, 0.6) = ln 2, weight = q = 0.6
                0.75 * 0.5 ** 2 * LN2,  # negative: alpha * p^gamma * BCE(0.5, 0)
                0.75 * p2 ** 2 * _bce(p2, 0.0)]
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
    assert_close(loss[0, 1], torch.tensor(0.75 * p ** 2 * _bce(p, 0.0)))
    assert_close(varifocal_loss(logits, target, positive_mask=onehot, reduction="sum"), loss.sum())
    assert_close(varifocal_loss(logits, target, positive_mask=onehot, reduction="mean"), loss.mean())
    with pytest.raises(ValueError, match="reduction"):
        varifocal_loss(logits, target, reduction="avg")


def test_quality_focal_loss_hand_computed():
    logits, target = _tensors()
    loss = quality_focal_loss(logits, target, beta=2.0)
    p2 = _sigmoid(2.0)
    expected = [LN2 * 0.1 ** 2, LN2 * 0.5 ** 2, _bce(p2, 0.0) * p2 ** 2]  # BCE(s, y) * |y - s|^beta
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
    t0, t1 = s0 ** a * 0.8 ** b, s1 ** a * 0.5 ** b
    tmax, umax = max(t0, t1), 0.8
    th0, th1 = t0 / tmax * umax, t1 / tmax * umax  # TOOD: t_hat = t / max t * max u
    assert_close(task_aligned_target(logits, iou, onehot, a, b, ids)[:, 1],
                 torch.tensor([th0, th1, 0.0]))
    loss = task_aligned_loss(logits, iou, onehot, a, b, gamma=gamma, instance_ids=ids)

    def neg(x):
        p = _sigmoid(x)
        return p ** gamma * _bce(p, 0.0)

    expected = torch.tensor([[neg(0.5), abs(th0 - s0) ** gamma * _bce(s0, th0)],
                             [neg(0.0), abs(th1 - s1) ** gamma * _bce(s1, th1)],
                             [neg(0.3), neg(-2.0)]])
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
    for loss in (varifocal_loss(logits, target, positive_mask=onehot),
                 quality_focal_loss(logits, target, positive_mask=onehot),
                 task_aligned_loss(logits, target, onehot)):
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    boxes = torch.tensor([[0.5, 0.5, 0.0, 0.0]], requires_grad=True)
    loss = giou_box_loss(boxes, torch.tensor([[0.5, 0.5, 0.0, 0.0]])) + l1_box_loss(boxes, boxes.detach())
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(boxes.grad).all()

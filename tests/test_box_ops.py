import torch
from torch.testing import assert_close
from torchvision.ops import box_iou, generalized_box_iou

from sodlib import box_ops


def _random_xyxy(n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g)
    wh = torch.rand(n, 2, generator=g) * 0.5 + 0.01
    return torch.cat([xy, xy + wh], dim=-1)


def test_conversions_round_trip_and_values():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.0, 0.0]])
    xyxy = box_ops.box_cxcywh_to_xyxy(cxcywh)
    assert_close(xyxy, torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.1, 0.9, 0.1, 0.9]]))
    assert_close(box_ops.box_xyxy_to_cxcywh(xyxy), cxcywh)
    xywh = box_ops.box_xyxy_to_xywh(xyxy)
    assert_close(xywh, torch.tensor([[0.4, 0.3, 0.2, 0.4], [0.1, 0.9, 0.0, 0.0]]))
    assert_close(box_ops.box_xywh_to_xyxy(xywh), xyxy)
    assert_close(box_ops.box_area_xyxy(xyxy), torch.tensor([0.08, 0.0]))


def test_paired_iou_and_giou_equal_torchvision_diagonal():
    a, b = _random_xyxy(6, 0), _random_xyxy(6, 1)
    iou, _ = box_ops.paired_iou_xyxy(a, b)
    assert_close(iou, torch.diag(box_iou(a, b)))
    assert_close(box_ops.paired_giou_xyxy(a, b), torch.diag(generalized_box_iou(a, b)))


def test_pairwise_giou_equals_torchvision_matrix():
    a, b = _random_xyxy(5, 2), _random_xyxy(3, 3)
    assert_close(box_ops.pairwise_giou_xyxy(a, b), generalized_box_iou(a, b))


def test_giou_finite_for_degenerate_boxes():
    point = torch.tensor([[0.3, 0.3, 0.3, 0.3]], requires_grad=True)
    other = torch.tensor([[0.3, 0.3, 0.3, 0.3], [0.5, 0.5, 0.7, 0.7]])
    giou = box_ops.pairwise_giou_xyxy(point, other)
    assert torch.isfinite(giou).all()
    giou.sum().backward()
    assert torch.isfinite(point.grad).all()
    assert torch.isfinite(box_ops.paired_giou_xyxy(point, other[:1])).all()

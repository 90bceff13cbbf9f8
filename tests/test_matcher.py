import itertools
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close
from torchvision.ops import box_convert, generalized_box_iou

from sodlib.losses.matcher import HungarianMatcher


def _batch(sizes, num_queries=7, num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(len(sizes), num_queries, num_classes, generator=g),
        "pred_boxes": torch.rand(len(sizes), num_queries, 4, generator=g) * 0.4 + 0.1,
    }
    targets = [
        {
            "labels": torch.randint(0, num_classes, (n,), generator=g),
            "boxes": torch.rand(n, 4, generator=g) * 0.4 + 0.1,
        }
        for n in sizes
    ]
    return outputs, targets


def test_batched_equals_per_image():
    sizes = [3, 0, 5, 1, 9]  # 9 > 7 queries: every query gets matched
    outputs, targets = _batch(sizes)
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    assert len(batched) == len(sizes)
    for i, (n, (src, tgt)) in enumerate(zip(sizes, batched)):
        single = matcher({k: v[i : i + 1] for k, v in outputs.items()}, [targets[i]])[0]
        assert src.dtype == tgt.dtype == torch.int64
        assert len(src) == len(tgt) == min(n, 7)
        assert torch.equal(src, single[0]) and torch.equal(tgt, single[1])
        assert len(set(src.tolist())) == len(src) and len(set(tgt.tolist())) == len(tgt)


def test_cost_matrix_matches_rtdetr_formula():
    outputs, targets = _batch([4], num_queries=5)
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, alpha=0.25, gamma=2.0)
    logits, boxes = outputs["pred_logits"][0], outputs["pred_boxes"][0]
    labels, tgt = targets[0]["labels"], targets[0]["boxes"]
    p = logits.sigmoid()[:, labels].double()
    neg = 0.75 * p**2 * -(1 - p + 1e-8).log()
    pos = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log()
    l1 = (boxes[:, None, :] - tgt[None, :, :]).abs().sum(-1)
    giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"))
    expected = 2 * (pos - neg) + 5 * l1 - 2 * giou
    assert_close(matcher.cost_matrix(logits, boxes, labels, tgt).double(), expected, atol=1e-5, rtol=1e-5)


def test_matches_brute_force_3x3():
    matcher = HungarianMatcher()
    for seed in range(3):
        outputs, targets = _batch([3], num_queries=3, seed=seed)
        cost = matcher.cost_matrix(
            outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"], targets[0]["boxes"]
        ).numpy()
        best = min(itertools.permutations(range(3)), key=lambda perm: sum(cost[q, perm[q]] for q in range(3)))
        src, tgt = matcher(outputs, targets)[0]
        assert src.tolist() == [0, 1, 2] and tgt.tolist() == list(best)
        best_cost = min(sum(cost[q, perm[q]] for q in range(3)) for perm in itertools.permutations(range(3)))
        assert math.isclose(cost[src.numpy(), tgt.numpy()].sum(), best_cost, rel_tol=1e-6)


def test_empty_targets():
    outputs, targets = _batch([0, 0])
    for src, tgt in HungarianMatcher()(outputs, targets):
        assert src.shape == tgt.shape == (0,) and src.dtype == torch.int64


def test_picks_the_obvious_query_and_tolerates_degenerate_boxes():
    outputs = {"pred_logits": torch.full((1, 4, 2), -5.0), "pred_boxes": torch.full((1, 4, 4), 0.5)}
    outputs["pred_logits"][0, 2, 1] = 5.0
    outputs["pred_boxes"][0, 2] = torch.tensor([0.2, 0.3, 0.0, 0.0])  # zero-area prediction
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.2, 0.3, 0.0, 0.0]])}]
    src, tgt = HungarianMatcher()(outputs, targets)[0]
    assert src.tolist() == [2] and tgt.tolist() == [0]


def test_rejects_bad_inputs():
    outputs, targets = _batch([2])
    targets[0]["labels"] = torch.tensor([0, 3])  # 3 classes: label 3 is out of range
    with pytest.raises(ValueError, match="labels"):
        HungarianMatcher()(outputs, targets)
    outputs, targets = _batch([2])
    outputs["pred_boxes"][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        HungarianMatcher()(outputs, targets)
    with pytest.raises(ValueError, match="all be 0"):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)

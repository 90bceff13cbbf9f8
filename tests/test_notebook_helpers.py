"""Helpers the notebooks call: ST score dynamics (01), SPR tables (02), the prediction grid (03, 07) and the
in-box attention share (05), against hand-computed values and per-image references."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import sodlib
from sodlib.config import get_profile, override
from sodlib.inference.heatmaps import attention_for_objects, in_box_share
from sodlib.losses import formulas
from sodlib.studies.spr_tables import spr_per_layer, spr_per_query
from sodlib.studies.target_dynamics import score_trajectory
from sodlib.studies.viz import predictions_figure


def test_score_trajectory_first_step_and_fixed_points():
    c = float(
        formulas.scale_aligned_quality(torch.tensor(0.6), torch.tensor(1.5), torch.tensor(1.0), 0.73, 6.0)
    )
    # one BCE step on the logit: x1 = x0 - lr * (s0 - t), t = c (label mode)
    s = score_trajectory(0.6, 1.5, "label", 0.5, "BCE", steps=2, lr=2.0)
    assert s[0] == pytest.approx(0.5)
    x1 = 0.0 - 2.0 * (0.5 - c)
    assert s[1] == pytest.approx(1 / (1 + math.exp(-x1)), rel=1e-6)
    # label mode settles at c from either side; pred mode (t = c·s) falls towards its fixed point 0
    for s0 in (0.05, 0.95):
        assert score_trajectory(0.6, 1.5, "label", s0, "BCE", steps=3000)[-1] == pytest.approx(c, abs=1e-4)
    pred = score_trajectory(0.6, 1.5, "pred", 0.5, "BCE", steps=300)
    assert (np.diff(pred) < 0).all() and pred[-1] < 0.05
    with pytest.raises(ValueError, match="BCE or VFL"):
        score_trajectory(0.6, 1.5, "label", 0.5, "L2")


def _layers(inside: bool):
    """One image, 3 queries, 2 heads x 1 level x 2 points, 2 layers; every point inside
    (or far outside) its box."""
    ref = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1], [0.8, 0.7, 0.2, 0.4]]])
    offset = torch.tensor([0.05, -0.05]) if inside else torch.tensor([0.4, -0.4])
    loc = ref[..., None, None, None, :2] + offset * torch.ones(1, 3, 2, 1, 2, 1)
    attn = torch.full((1, 3, 2, 1, 2), 0.25)
    return [{"sampling_locations": loc, "attention_weights": attn, "ref_boxes": ref} for _ in range(2)]


def test_spr_tables_inside_and_outside_the_box():
    scores, gt = torch.tensor([0.9, 0.5, 0.1]), torch.rand(3, 4)
    rows, panels = spr_per_query(_layers(True), (1.5, 1.0), [(0, 2), (2, 0)], gt, scores)
    assert len(rows) == 4 and len(panels) == 2 and len(panels[0]) == 2
    assert all(
        r["L_offset"] == 0 and r["in box"] == r["points"] == 4 and r["outside expanded box"] == 0
        for r in rows
    )
    assert_close(panels[1][0]["gt_box_cxcywh"], gt[0])
    far = spr_per_layer(_layers(False), (1.5, 1.0), torch.tensor([0, 1, 2]))
    assert [r["points outside box (%)"] for r in far] == [100.0, 100.0]
    assert far[0]["L_offset"] > 0 and far[0]["matched queries"] == 3
    near = spr_per_layer(_layers(True), (1.5, 1.0), torch.tensor([1]))
    assert near[1]["L_offset"] == 0 and near[1]["points outside expanded box (%)"] == 0


@pytest.fixture(scope="module")
def tiny_model_and_data():
    cfg = override(get_profile("smoke"), "model.num_queries=20", "model.num_denoising=0")
    torch.manual_seed(0)
    model = sodlib.build_detector(cfg.model).eval()
    samples = []
    for k in range(3):
        boxes = torch.tensor([[0.3 + 0.1 * k, 0.4, 0.1, 0.1], [0.7, 0.6, 0.2, 0.1]])[: k + 1]
        samples.append(
            (torch.rand(3, 64, 64), {"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.long)})
        )
    return model, samples


def test_in_box_share_is_the_per_image_shares_side_by_side(tiny_model_and_data):
    model, samples = tiny_model_and_data
    share = in_box_share(model, samples, num_images=5)  # more than there are: all 3
    per_image = [attention_for_objects(model, image, t["boxes"])["in_box_share"] for image, t in samples]
    assert share.shape == (model.config.num_decoder_layers, 1 + 2 + 2)
    assert_close(share, torch.cat(per_image, dim=1))
    assert ((share >= 0) & (share <= 1)).all()
    assert in_box_share(model, samples, num_images=1).shape[1] == 1


def test_predictions_figure_keeps_the_training_mode(tiny_model_and_data):
    model, samples = tiny_model_and_data
    model.train()
    fig = predictions_figure({"a": model, "b": model}, samples[:2], score_threshold=0.0, suptitle="t")
    assert model.training  # eval only inside
    assert len(fig.axes) == 4
    model.eval()

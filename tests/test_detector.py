import copy

import pytest
import torch
from torch.testing import assert_close

import sodlib
from sodlib.build import build_detector
from sodlib.config import get_profile, override
from sodlib.models.detector import RTDETR, postprocess, to_coco_results

TRAIN_KEYS = {
    "pred_logits",
    "pred_boxes",
    "aux_outputs",
    "enc_outputs",
    "enc_dense_outputs",
    "dn_outputs",
    "dn_meta",
}


@pytest.fixture(scope="module")
def smoke():
    torch.manual_seed(0)
    cfg = get_profile("smoke").model
    return cfg, sodlib.build_detector(cfg)


def _targets(counts=(3, 1)):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.8 + 0.1, torch.full((n, 2), 0.06)], 1),
            "labels": torch.randint(0, 6, (n,), generator=g),
        }
        for n in counts
    ]


def test_lazy_export_and_eval_outputs(smoke):
    cfg, model = smoke
    assert isinstance(model, RTDETR) and model.config == cfg
    model.eval()
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        a = model(images)
        b = model(images)
    assert set(a) == {"pred_logits", "pred_boxes"}
    assert a["pred_logits"].shape == (2, cfg.num_queries, cfg.num_classes)
    assert a["pred_boxes"].shape == (2, cfg.num_queries, 4)
    assert ((a["pred_boxes"] >= 0) & (a["pred_boxes"] <= 1)).all()
    assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=0)  # deterministic in eval
    assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=0)
    with torch.no_grad():
        rich = model(images, return_sampling=True, return_hidden=True)
    assert len(rich["layers"]) == cfg.num_decoder_layers
    assert_close(rich["pred_boxes"], a["pred_boxes"], rtol=0, atol=0)
    assert_close(rich["layers"][-1]["sampling_locations"], rich["sampling_locations"])


def test_training_outputs_and_gradient_reaches_backbone(smoke):
    cfg, model = smoke
    model = copy.deepcopy(model).train()
    # box heads start at zero (RT-DETR init), which blocks the gradient into the trunk: move them off it
    for head in model.decoder.dec_bbox_head:
        torch.nn.init.normal_(head.layers[-1].weight, std=0.01)
    out = model(torch.rand(2, 3, 128, 128), _targets())
    assert set(out) == TRAIN_KEYS
    assert (
        len(out["aux_outputs"]) == cfg.num_decoder_layers - 1
        and len(out["dn_outputs"]) == cfg.num_decoder_layers
    )
    assert out["dn_meta"]["dn_num_group"] == cfg.num_denoising // 3
    out["pred_boxes"].sum().backward()
    stem_grad = model.backbone.stem[0][0].weight.grad
    assert stem_grad is not None and stem_grad.abs().sum() > 0 and torch.isfinite(stem_grad).all()


def test_training_without_objects_or_targets(smoke):
    cfg, model = smoke
    model.train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    out = model(torch.rand(2, 3, 128, 128), empty, return_sampling=True)
    assert set(out) == {
        "pred_logits",
        "pred_boxes",
        "aux_outputs",
        "enc_outputs",
        "enc_dense_outputs",
        "sampling_locations",
        "attention_weights",
        "ref_boxes",
    }
    assert torch.isfinite(out["pred_boxes"]).all()
    out = model(torch.rand(1, 3, 96, 128))  # no targets: no denoising
    assert "dn_outputs" not in out and out["pred_logits"].shape == (1, cfg.num_queries, cfg.num_classes)


def test_p2_values_adds_a_sampled_stride_4_level_and_trains():
    cfg = override(get_profile("smoke"), "model.p2_values=true", "model.num_levels=4").model
    torch.manual_seed(0)
    model = build_detector(cfg).train()
    feats = model.encoder(model.backbone(torch.rand(2, 3, 128, 128)))
    assert [tuple(f.shape[-2:]) for f in feats] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    out = model(torch.rand(2, 3, 128, 128), _targets(), return_sampling=True)
    assert out["sampling_locations"].shape[3] == 4  # the decoder samples all four levels
    # ... but selects queries from strides 8..32 only
    assert out["enc_dense_outputs"]["pred_logits"].shape == (2, 16 * 16 + 8 * 8 + 4 * 4, cfg.num_classes)
    loss = sodlib.build_criterion(get_profile("smoke").loss, cfg)
    total = loss.weighted_total(loss(out, _targets()))
    total.backward()
    grad = model.encoder.light_proj[0][0].weight.grad
    assert torch.isfinite(total) and grad is not None and grad.abs().sum() > 0


def test_paper_profile_parameter_count_matches_rtdetr_r50():
    model = build_detector(get_profile("paper").model)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 42e6) / 42e6 < 0.05, count


def test_other_backbones_and_unknown_encoder():
    cfg = override(get_profile("smoke"), "model.backbone=resnet18", "model.freeze_norm=false").model
    model = build_detector(cfg)
    assert model.backbone.out_channels == (128, 256, 512)
    with pytest.raises(ValueError, match="model.num_levels"):  # MRQM's encoder reads P2..P5
        override(get_profile("smoke"), "model.encoder=bifpn_sae")
    mrqm = build_detector(
        override(get_profile("smoke"), "model.encoder=bifpn_sae", "model.num_levels=4").model
    )
    assert mrqm.backbone.out_strides == (4, 8, 16, 32) and mrqm.encoder.out_channels == (32,) * 4


def test_postprocess_topk_and_pixel_boxes():
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 1, 0] = 3.0  # best: query 1, class 0
    logits[0, 2, 1] = 1.0  # second: query 2, class 1
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 0.2], [0.5, 0.25, 0.1, 0.5]]])
    (det,) = postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]), num_top=2)
    assert det["labels"].tolist() == [0, 1]
    assert_close(det["scores"], torch.tensor([3.0, 1.0]).sigmoid())
    assert_close(det["boxes_xyxy"], torch.tensor([[0.0, 40.0, 100.0, 60.0], [90.0, 0.0, 110.0, 50.0]]))
    results = to_coco_results([det], [7], {0: 3, 1: 9})
    assert results[0] == {
        "image_id": 7,
        "category_id": 3,
        "bbox": [0.0, 40.0, 100.0, 20.0],
        "score": pytest.approx(float(torch.tensor(3.0).sigmoid())),
    }
    assert results[1]["category_id"] == 9 and results[1]["bbox"] == [90.0, 0.0, 20.0, 50.0]
    assert to_coco_results([det], [7])[1]["category_id"] == 2  # default: label + 1
    many = postprocess({"pred_logits": logits, "pred_boxes": boxes}, [[10, 10]], num_top=100)
    assert len(many[0]["scores"]) == 6


def test_postprocess_with_nms_drops_same_class_duplicates_only():
    # queries 0 and 1: the same box (class 0 at 0.95 and 0.9 — a duplicate); query 2 overlaps them with IoU
    # 0.81 but class 1 (kept: per-class NMS); query 3 elsewhere, class 0
    logits = torch.full((1, 4, 2), -10.0)
    logits[0, 0, 0], logits[0, 1, 0], logits[0, 2, 1], logits[0, 3, 0] = 3.0, 2.0, 1.0, 0.0
    boxes = torch.tensor(
        [[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.18, 0.18], [0.2, 0.2, 0.1, 0.1]]]
    )
    out = {"pred_logits": logits, "pred_boxes": boxes}
    (det,) = postprocess(out, [[100, 100]], num_top=4, nms_iou=0.5)
    assert det["labels"].tolist() == [0, 1, 0, 1]  # query 1's class-0 duplicate is gone
    assert_close(det["scores"][:3], torch.tensor([3.0, 1.0, 0.0]).sigmoid())
    assert_close(
        det["boxes_xyxy"][:3], torch.tensor([[40.0, 40, 60, 60], [41, 41, 59, 59], [15, 15, 25, 25]])
    )
    # the fourth slot: the only low-score pair that overlaps nothing of its class (query 3, class 1)
    assert_close(det["boxes_xyxy"][3], torch.tensor([15.0, 15, 25, 25]))
    assert_close(det["scores"][3], torch.tensor(-10.0).sigmoid())
    plain = postprocess(out, [[100, 100]], num_top=4)[0]  # nms_iou=0: RT-DETR's top-K keeps the duplicate
    assert plain["labels"].tolist() == [0, 0, 1, 0]
    (top2,) = postprocess(out, [[100, 100]], num_top=2, nms_iou=0.5)
    assert len(top2["scores"]) == 2

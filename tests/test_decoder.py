import itertools
import warnings

import pytest
import torch
from torch.testing import assert_close

from sodlib.config import get_profile
from sodlib.models.decoder import RTDETRDecoder
from sodlib.models.deform_attn import ms_deform_attn_core
from sodlib.models.denoising import inverse_sigmoid

LAYER_KEYS = {
    "pred_logits",
    "pred_boxes",
    "sampling_locations",
    "attention_weights",
    "ref_boxes",
    "hidden_cls",
    "hidden_reg",
}


def _decoder(**kw):
    cfg = get_profile("smoke").model
    args = {
        "num_classes": cfg.num_classes,
        "in_channels": (16, 16, 16),
        "hidden_dim": cfg.hidden_dim,
        "num_queries": cfg.num_queries,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_decoder_layers,
        "dim_feedforward": cfg.dim_feedforward,
        "num_denoising": cfg.num_denoising,
    }
    args.update(kw)
    torch.manual_seed(0)
    return RTDETRDecoder(**args)


def _feats(bs=2):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(bs, 16, s, s, generator=g) for s in (16, 8, 4)]


def _targets():
    return [
        {
            "boxes": torch.tensor([[0.3, 0.4, 0.1, 0.2], [0.7, 0.6, 0.05, 0.05]]),
            "labels": torch.tensor([0, 3]),
        },
        {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "labels": torch.tensor([5])},
    ]


def test_anchors_and_valid_mask():
    dec = _decoder()  # eps = 0.01
    anchors, valid = dec.anchors([(4, 4), (2, 2)])
    assert anchors.shape == (1, 20, 4) and valid.shape == (1, 20, 1) and valid.all()
    boxes = anchors.sigmoid()
    assert_close(boxes[0, 0], torch.tensor([0.125, 0.125, 0.05, 0.05]))
    assert_close(boxes[0, 16, :2], torch.tensor([0.25, 0.25]))
    assert_close(boxes[0, 16, 2:], torch.tensor([0.1, 0.1]))
    dec_tight = _decoder(eps=0.1)  # wh 0.05 / 0.1 and the outer ring of centres (1/16, 15/16) are invalid
    anchors, valid = dec_tight.anchors([(2, 2), (2, 2), (8, 8)])
    assert not valid[0, :8].any() and valid.sum() == 36  # level 2 (wh 0.2): the 6x6 inner cells
    assert torch.isinf(anchors[~valid.expand(-1, -1, 4)]).all()


def test_training_output_structure_and_ref_box_chain():
    dec = _decoder().train()
    out = dec(_feats(), _targets(), return_sampling=True, return_hidden=True)
    assert set(out) == LAYER_KEYS | {
        "aux_outputs",
        "enc_outputs",
        "enc_dense_outputs",
        "dn_outputs",
        "dn_meta",
    }
    assert len(out["aux_outputs"]) == dec.num_layers - 1 and len(out["dn_outputs"]) == dec.num_layers
    assert set(out["enc_outputs"]) == {"pred_logits", "pred_boxes"}
    # the selected proposals are rows of the dense encoder output (every token's scores and boxes)
    dense = out["enc_dense_outputs"]
    assert dense["pred_logits"].shape == (2, 16 * 16 + 8 * 8 + 4 * 4, 6)
    for key in ("pred_logits", "pred_boxes"):
        gap = (
            torch.cdist(
                out["enc_outputs"][key].detach(),
                dense[key].detach(),
                compute_mode="donot_use_mm_for_euclid_dist",
            )
            .min(-1)
            .values
        )
        assert (gap < 1e-5).all()  # (sigmoid before/after the gather: equal up to rounding)
    layers = out["aux_outputs"] + [out]
    num_dn = out["dn_meta"]["dn_num_split"][0]
    assert num_dn == 2 * 2 * (20 // 2)
    for layer in layers + out["dn_outputs"]:
        assert LAYER_KEYS <= set(layer)
        q = layer["pred_logits"].shape[1]
        assert layer["sampling_locations"].shape == (2, q, 4, 3, 4, 2)
        assert layer["attention_weights"].shape == (2, q, 4, 3, 4)
        assert layer["hidden_cls"].shape == layer["hidden_reg"].shape == (2, q, 32)
        assert not layer["ref_boxes"].requires_grad
    assert {layer["pred_logits"].shape[1] for layer in layers} == {30}
    assert {layer["pred_logits"].shape[1] for layer in out["dn_outputs"]} == {num_dn}
    # layer 0 samples around the selected proposals, layer i around layer i-1's (detached) boxes
    assert_close(layers[0]["ref_boxes"], out["enc_outputs"]["pred_boxes"].detach())
    for prev, nxt in itertools.pairwise(layers):
        assert_close(nxt["ref_boxes"], prev["pred_boxes"].detach())
    # hidden features are exactly what the heads consume
    for i, layer in enumerate(layers):
        assert_close(dec.dec_score_head[i](layer["hidden_cls"]), layer["pred_logits"])
        delta = dec.dec_bbox_head[i].layers[-1](layer["hidden_reg"])
        assert_close((delta + inverse_sigmoid(layer["ref_boxes"])).sigmoid(), layer["pred_boxes"])
        assert (layer["hidden_reg"] >= 0).all()


def test_sampling_outputs_reproduce_cross_attention():
    dec = _decoder().eval()
    feats = _feats()
    captured = {}
    layer_idx = 1
    hook = dec.layers[layer_idx].cross_attn.register_forward_hook(
        lambda mod, args, output: captured.update(out=output[0], query=args[0])
    )
    with torch.no_grad():
        out = dec(feats, return_sampling=True)
        memory, shapes = dec.memory(feats)
    hook.remove()
    layer = out["layers"][layer_idx]
    attn_mod = dec.layers[layer_idx].cross_attn
    with torch.no_grad():
        value = attn_mod.project_value(memory)
        recomputed = attn_mod.output_proj(
            ms_deform_attn_core(
                value, shapes, layer["sampling_locations"], layer["attention_weights"], impl="grid_sample"
            )
        )
        offsets = attn_mod.sampling_offsets(captured["query"]).view(2, 30, 4, 3, 4, 2)
    assert_close(recomputed, captured["out"], atol=1e-5, rtol=1e-4)
    ref = layer["ref_boxes"][:, :, None, None, None, :]
    assert_close(layer["sampling_locations"], ref[..., :2] + offsets / 4 * ref[..., 2:] * 0.5)
    assert_close(layer["attention_weights"].sum((-1, -2)), torch.ones(2, 30, 4))


@pytest.mark.parametrize("training", [True, False])
def test_flags_do_not_change_outputs(training):
    dec = _decoder().train(training)
    feats, targets = _feats(), _targets()
    torch.manual_seed(3)
    plain = dec(feats, targets)
    torch.manual_seed(3)
    rich = dec(feats, targets, return_sampling=True, return_hidden=True)
    assert_close(rich["pred_logits"], plain["pred_logits"], rtol=0, atol=0)
    assert_close(rich["pred_boxes"], plain["pred_boxes"], rtol=0, atol=0)
    if training:
        for key in ("aux_outputs", "dn_outputs"):
            for a, b in zip(plain[key], rich[key]):
                assert set(a) == {"pred_logits", "pred_boxes"}
                assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=0)
    else:
        assert set(plain) == {"pred_logits", "pred_boxes"} and len(rich["layers"]) == dec.num_layers


def test_box_loss_of_a_layer_trains_the_previous_box_head():
    dec = _decoder(num_denoising=0).train()
    out = dec(_feats())
    out["pred_boxes"].sum().backward()  # last layer only
    assert dec.dec_bbox_head[-1].layers[-1].weight.grad.abs().sum() > 0
    assert dec.dec_bbox_head[-2].layers[-1].weight.grad.abs().sum() > 0  # look forward twice
    assert (
        dec.enc_bbox_head.layers[-1].weight.grad is None
        or dec.enc_bbox_head.layers[-1].weight.grad.abs().sum() == 0
    )


def test_more_queries_than_tokens_and_extra_level():
    dec = _decoder(num_queries=500, num_levels=4, in_channels=(16, 16, 16)).eval()
    with torch.no_grad():
        out = dec(_feats(1))
    assert out["pred_boxes"].shape == (1, 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2, 4)


def test_distinct_topk_suppresses_overlapping_proposals():
    from sodlib.models.decoder import distinct_topk

    # image 0: proposals 0 and 1 overlap (IoU 0.90), 2 and 3 are apart; image 1: all apart, scores reversed
    boxes = torch.tensor(
        [
            [[0.2, 0.2, 0.1, 0.1], [0.205, 0.2, 0.1, 0.1], [0.7, 0.7, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1]],
            [[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1], [0.7, 0.7, 0.1, 0.1], [0.9, 0.9, 0.05, 0.05]],
        ]
    )
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    unact = inverse_sigmoid(boxes)
    assert distinct_topk(scores, unact, 3, 0.7).tolist() == [[0, 2, 3], [3, 2, 1]]
    # fewer survivors than k: the suppressed proposal fills the last slot
    assert distinct_topk(scores, unact, 4, 0.7).tolist() == [[0, 2, 3, 1], [3, 2, 1, 0]]
    # a threshold above their IoU keeps both: plain top-k
    assert distinct_topk(scores, unact, 3, 0.95).tolist() == scores.topk(3, dim=1).indices.tolist()


def test_distinct_topk_matches_nms_over_every_proposal():
    """The 4k-candidate pool gives the first k survivors of greedy NMS over all N proposals."""
    from torchvision.ops import box_convert, nms

    from sodlib.models.decoder import distinct_topk

    g = torch.Generator().manual_seed(0)
    n, k = 600, 40
    boxes = torch.cat(
        [torch.rand(2, n, 2, generator=g) * 0.6 + 0.2, torch.rand(2, n, 2, generator=g) * 0.1 + 0.05], -1
    )
    scores = torch.rand(2, n, generator=g)
    got = distinct_topk(scores, inverse_sigmoid(boxes), k, 0.5)
    for i in range(2):
        keep = nms(box_convert(boxes[i], "cxcywh", "xyxy"), scores[i], 0.5)  # every proposal, score order
        assert len(keep) >= k
        assert got[i].tolist() == keep[:k].tolist()


def test_query_nms_selects_distinct_queries_and_keeps_shapes():
    dec = _decoder(query_nms=0.5).eval()
    with torch.no_grad():
        memory, shapes = dec.memory(_feats())
        target, ref_unact, _, _ = dec._select_queries(memory, shapes)
    assert target.shape[:2] == ref_unact.shape[:2] == (2, dec.num_queries)
    from torchvision.ops import box_convert, box_iou

    for boxes in ref_unact.sigmoid():
        xyxy = box_convert(boxes, "cxcywh", "xyxy")
        iou = box_iou(xyxy, xyxy).fill_diagonal_(0)
        survivors = (iou.triu() <= 0.5).all(0)  # queries not overlapping any better-ranked one
        # 30 queries from 336 tokens: every selected proposal is distinct from the better ones
        assert survivors.all()


def test_select_from_level_samples_but_never_selects_the_finest_level():
    dec = _decoder(num_levels=4, in_channels=(16, 16, 16, 16), select_from_level=1).train()
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 16, s, s, generator=g) for s in (16, 8, 4, 2)]
    out = dec(feats, _targets(), return_sampling=True)
    assert out["sampling_locations"].shape[3] == 4
    dense = out["enc_dense_outputs"]["pred_boxes"]
    assert dense.shape == (2, 8 * 8 + 4 * 4 + 2 * 2, 4)
    # box heads start at zero: the proposals are the anchors of the 8x8 map, sized as RT-DETR's level 0
    assert_close(dense[0, 0], torch.tensor([1 / 16, 1 / 16, 0.05, 0.05]))


@pytest.mark.parametrize("fp32_geometry", [False, True])
def test_fp32_geometry_under_bf16_autocast(fp32_geometry):
    """Boxes, reference boxes, sampling locations and attention weights stay float32 under autocast with
    fp32_geometry (bf16 quantises a coordinate near 1 to 1/256 of the image); without it they are bf16."""
    dec = _decoder(fp32_geometry=fp32_geometry).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(_feats(), _targets(), return_sampling=True)
    want = torch.float32 if fp32_geometry else torch.bfloat16
    layers = [out, *out["aux_outputs"], *out["dn_outputs"]]
    for layer in layers:
        for key in ("pred_boxes", "ref_boxes", "sampling_locations", "attention_weights"):
            assert layer[key].dtype == want, key
    assert out["enc_outputs"]["pred_boxes"].dtype == want


def test_fp32_geometry_changes_nothing_in_float32():
    plain, geo = _decoder().eval(), _decoder(fp32_geometry=True).eval()
    a = plain(_feats(), return_sampling=True)
    b = geo(_feats(), return_sampling=True)
    for key in ("pred_logits", "pred_boxes", "sampling_locations", "attention_weights"):
        assert torch.equal(a[key], b[key]), key


def test_bf16_geometry_rounds_boxes_and_locations_like_autocast():
    plain, rounded = _decoder().eval(), _decoder(bf16_geometry=True).eval()
    a = plain(_feats(), return_sampling=True)
    b = rounded(_feats(), return_sampling=True)
    for key in ("pred_boxes", "ref_boxes", "sampling_locations"):
        assert b[key].dtype == torch.float32
        assert torch.equal(b[key], b[key].to(torch.bfloat16).float()), key  # on the bf16 grid
        assert not torch.equal(a[key], b[key]), key
        assert (a[key] - b[key]).abs().max() < 2e-2, key  # the same model, only rounded


def test_more_queries_than_encoder_tokens_is_said_once():
    from sodlib.build import build_detector
    from sodlib.config import get_profile, override

    cfg = override(get_profile("smoke"), "model.num_queries=5000")
    model = build_detector(cfg.model).eval()
    images = torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size)
    with pytest.warns(
        UserWarning,
        match=r"model.num_queries=5000 exceeds the \d+ selectable encoder tokens at this image size; "
        r"\d+ queries",
    ):
        out = model(images)
    assert out["pred_logits"].shape[1] < 5000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(images)  # said once per model

import math

import pytest
import torch
from torch.testing import assert_close

import sodlib
from sodlib.build import build_criterion
from sodlib.config import get_profile, override
from sodlib.losses.criterion import SetCriterion, base_loss_name, one_to_many, positive_mask
from sodlib.losses.matcher import HungarianMatcher

K = 3  # classes
WEIGHTS = {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def _layer(g, batch, queries):
    return {
        "pred_logits": torch.randn(batch, queries, K, generator=g).requires_grad_(),
        "pred_boxes": (torch.rand(batch, queries, 4, generator=g) * 0.4 + 0.1).requires_grad_(),
    }


def _targets(sizes, g):
    return [
        {"labels": torch.randint(0, K, (n,), generator=g), "boxes": torch.rand(n, 4, generator=g) * 0.3 + 0.1}
        for n in sizes
    ]


def _outputs(sizes, num_layers=3, queries=6, groups=2, seed=0):
    """Fake detector output following the contract: final + aux + enc + dn (group by group)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(sizes)
    layers = [_layer(g, batch, queries) for _ in range(num_layers)]
    out = dict(layers[-1], aux_outputs=layers[:-1], enc_outputs=_layer(g, batch, queries))
    max_gt = max(sizes)
    num_dn = groups * 2 * max_gt  # a positive and a negative query per gt slot and group
    out["dn_outputs"] = [_layer(g, batch, num_dn) for _ in range(num_layers)]
    out["dn_meta"] = {
        "dn_positive_idx": [
            torch.tensor([grp * 2 * max_gt + j for grp in range(groups) for j in range(n)], dtype=torch.long)
            for n in sizes
        ],
        "dn_num_group": groups,
        "dn_num_split": [num_dn, queries],
    }
    return out, _targets(sizes, g)


def _leaves(out):
    layers = [out, *out["aux_outputs"], out["enc_outputs"], *out["dn_outputs"]]
    return [t for layer in layers for t in (layer["pred_logits"], layer["pred_boxes"])]


def _criterion(losses=("vfl", "boxes")):
    return SetCriterion(HungarianMatcher(), K, WEIGHTS, losses=losses)


def test_keys_and_indices():
    out, targets = _outputs([2, 1], num_layers=3)
    losses, indices = _criterion()(out, targets, return_indices=True)
    expected = set()
    for suffix in ["", "_aux_0", "_aux_1", "_enc_0", "_dn_0", "_dn_1", "_dn_2"]:
        expected |= {f"loss_vfl{suffix}", f"loss_bbox{suffix}", f"loss_giou{suffix}"}
    assert set(losses) == expected
    assert set(indices) == {"final", "aux_0", "aux_1", "enc_0", "dn_0", "dn_1", "dn_2"}
    # denoising: positive j of each group -> gt j mod N, no Hungarian matching
    src, tgt = indices["dn_0"][0]
    assert src.tolist() == [0, 1, 4, 5] and tgt.tolist() == [0, 1, 0, 1]
    assert [len(s) for s, _ in indices["final"]] == [2, 1]
    mask = positive_mask(indices["final"], 6)
    assert mask.shape == (2, 6) and mask.sum() == 3


def test_denoising_terms_use_fixed_matching_and_group_normalisation():
    out, targets = _outputs([2, 1], num_layers=2, groups=2)
    losses = _criterion()(out, targets)
    dn = out["dn_outputs"][1]
    pred = torch.cat([dn["pred_boxes"][0, [0, 1, 4, 5]], dn["pred_boxes"][1, [0, 4]]])
    gt = torch.cat([targets[0]["boxes"][[0, 1, 0, 1]], targets[1]["boxes"][[0, 0]]])
    assert_close(losses["loss_bbox_dn_1"], (pred - gt).abs().sum() / (3 * 2))


def test_vfl_value_matches_hand_computation():
    # one image, two queries, one gt of class 1 matched to query 0 whose box is the gt's left half
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    out = {
        "pred_logits": torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]),
        "pred_boxes": torch.tensor([[[0.45, 0.5, 0.1, 0.2], [0.9, 0.9, 0.05, 0.05]]]),
    }
    losses = _criterion()(out, [{"labels": torch.tensor([1]), "boxes": gt}])
    iou = 0.5
    ln2 = math.log(2)
    # positive: q * BCE(0.5, q) = 0.5 ln 2; 5 negatives at p = 0.5: 0.75 * 0.25 * ln 2 each; num_boxes = 1
    assert_close(losses["loss_vfl"], torch.tensor(iou * ln2 + 5 * 0.75 * 0.25 * ln2))
    assert_close(losses["loss_bbox"], torch.tensor(0.05 + 0.1))
    assert_close(losses["loss_giou"], torch.tensor(1 - iou))


@pytest.mark.parametrize("sizes", [[3, 0, 1], [0, 0]])
@pytest.mark.parametrize("cls_loss", ["vfl", "qfl", "tal"])
def test_finite_losses_and_gradients_with_empty_images(sizes, cls_loss):
    out, targets = _outputs(sizes, num_layers=2)
    criterion = SetCriterion(
        HungarianMatcher(), K, {**WEIGHTS, f"loss_{cls_loss}": 1.0}, losses=(cls_loss, "boxes")
    )
    losses = criterion(out, targets)
    assert f"loss_{cls_loss}_dn_1" in losses and all(torch.isfinite(v) for v in losses.values())
    total = criterion.weighted_total(losses)
    grads = torch.autograd.grad(total, _leaves(out), allow_unused=True)
    assert all(gr is None or torch.isfinite(gr).all() for gr in grads)
    if sum(sizes) == 0:
        assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0


def test_degenerate_boxes_give_finite_losses():
    out, targets = _outputs([2, 1], num_layers=2)
    targets[0]["boxes"][0, 2:] = 0.0  # zero-area gt
    with torch.no_grad():
        out["pred_boxes"][:, :, 2:] = 0.0  # zero-area predictions
    criterion = _criterion()
    losses = criterion(out, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    grads = torch.autograd.grad(criterion.weighted_total(losses), _leaves(out), allow_unused=True)
    assert all(gr is None or torch.isfinite(gr).all() for gr in grads)


def test_weighted_total_equals_manual_weighting():
    out, targets = _outputs([2, 1], num_layers=2)
    criterion = _criterion()
    losses = criterion(out, targets)
    manual = sum(v * WEIGHTS[k.split("_aux")[0].split("_enc")[0].split("_dn")[0]] for k, v in losses.items())
    assert_close(criterion.weighted_total(losses), manual)
    weighted = criterion.weighted(losses)
    assert_close(weighted["loss_bbox_aux_0"], 5.0 * losses["loss_bbox_aux_0"])
    assert base_loss_name("loss_giou_dn_5") == "loss_giou"
    with pytest.raises(KeyError, match="loss_foo"):
        criterion.weighted({"loss_foo_aux_0": torch.tensor(1.0)})


def test_perfect_predictions_give_near_zero_box_losses():
    g = torch.Generator().manual_seed(1)
    targets = _targets([3, 2], g)
    logits = torch.full((2, 5, K), -20.0)
    boxes = torch.tensor([0.9, 0.9, 0.05, 0.05]).repeat(2, 5, 1)
    slots = [[4, 0, 2], [1, 3]]
    for b, t in enumerate(targets):
        for j, q in enumerate(slots[b]):
            logits[b, q, t["labels"][j]] = 20.0
            boxes[b, q] = t["boxes"][j]
    losses, indices = _criterion()({"pred_logits": logits, "pred_boxes": boxes}, targets, return_indices=True)
    assert losses["loss_bbox"] < 1e-6 and losses["loss_giou"] < 1e-6 and losses["loss_vfl"] < 1e-6
    for b in range(2):
        src, tgt = indices["final"][b]
        assert sorted(zip(tgt.tolist(), src.tolist())) == list(enumerate(slots[b]))


def test_build_criterion_from_config():
    cfg = get_profile("smoke")
    criterion = sodlib.build_criterion(cfg.loss, cfg.model)
    assert isinstance(criterion, SetCriterion) and criterion.num_classes == cfg.model.num_classes
    assert criterion.weight_dict == {
        "loss_vfl": cfg.loss.weight_vfl,
        "loss_bbox": cfg.loss.weight_bbox,
        "loss_giou": cfg.loss.weight_giou,
    }
    matcher = criterion.matcher
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou, matcher.alpha) == (2, 5, 2, 0.25)
    assert (criterion.alpha, criterion.gamma) == (cfg.loss.alpha, cfg.loss.gamma)
    tal = override(cfg, "loss.cls_loss=tal", "loss.weight_vfl=0.5")
    criterion = build_criterion(tal.loss, tal.model)
    assert criterion.losses == ("tal", "boxes") and criterion.weight_dict["loss_tal"] == 0.5
    assert type(criterion) is SetCriterion and not (criterion.needs_sampling or criterion.needs_hidden)
    with pytest.raises(ValueError, match="unknown losses"):
        SetCriterion(HungarianMatcher(), K, WEIGHTS, losses=("focal",))


def test_extension_points_for_paper_a_terms():
    class Extended(SetCriterion):  # how ST / SR / SPR plug in: hooks and new loss-map entries
        def positive_target(self, outputs, matched, layer):
            return torch.ones_like(matched.iou)

        def sample_weights(self, outputs, matched, target, layer, task):
            return torch.full_like(matched.iou, 0.0 if task == "cls" else 2.0)

        def loss_map(self):
            return {**super().loss_map(), "layer": self.loss_layer}

        def loss_layer(self, outputs, targets, indices, num_boxes, layer):
            index = -1 if layer.decoder_layer is None else layer.decoder_layer
            return {"loss_layer": torch.tensor(float(index))}

    gt = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    out = {
        "pred_logits": torch.zeros(1, 2, 3),
        "pred_boxes": torch.tensor([[[0.45, 0.5, 0.1, 0.2], [0.9, 0.9, 0.05, 0.05]]]),
    }
    out["aux_outputs"] = [dict(out)]
    out["enc_outputs"] = dict(out["aux_outputs"][0])
    criterion = Extended(
        HungarianMatcher(), K, {**WEIGHTS, "loss_layer": 1.0}, losses=("vfl", "boxes", "layer")
    )
    losses = criterion(out, [{"labels": torch.tensor([1]), "boxes": gt}])
    ln2 = math.log(2)
    assert_close(losses["loss_vfl"], torch.tensor(5 * 0.75 * 0.25 * ln2))  # positive weight r = 0
    assert_close(losses["loss_bbox"], torch.tensor(2 * 0.15))
    assert_close(losses["loss_giou"], torch.tensor(2 * 0.5))
    layer_terms = [losses[f"loss_layer{suffix}"].item() for suffix in ("", "_aux_0", "_enc_0")]
    assert layer_terms == [1.0, 0.0, -1.0]  # final = decoder layer L-1 = 1, encoder = None


def test_one_to_many_matches_each_target_k_times():
    g = torch.Generator().manual_seed(3)
    outputs = _layer(g, 2, 12)
    targets = _targets([3, 0], g)
    indices = one_to_many(HungarianMatcher(), outputs, targets, 2)
    src, tgt = indices[0]
    assert len(set(src.tolist())) == 6  # six distinct queries ...
    assert sorted(tgt.tolist()) == [0, 0, 1, 1, 2, 2]  # ... two per target
    assert len(indices[1][0]) == len(indices[1][1]) == 0


def test_encoder_one_to_many_terms():
    out, targets = _outputs([2, 1], num_layers=2)
    g = torch.Generator().manual_seed(5)
    out["enc_dense_outputs"] = _layer(g, 2, 10)
    assert set(_criterion()(out, targets)) == set(_criterion()(dict(out, enc_dense_outputs=None), targets))
    crit = SetCriterion(HungarianMatcher(), K, WEIGHTS, enc_o2m=3)
    losses, indices = crit(out, targets, return_indices=True)
    assert base_loss_name("loss_giou_o2m_0") == "loss_giou"
    pred = out["enc_dense_outputs"]["pred_boxes"]
    l1 = sum(
        (pred[i, src] - targets[i]["boxes"][tgt]).abs().sum() for i, (src, tgt) in enumerate(indices["o2m_0"])
    )
    assert sum(len(s) for s, _ in indices["o2m_0"]) == 9
    assert_close(losses["loss_bbox_o2m_0"], l1 / (3 * 3))  # normalised by targets x k
    assert all(torch.isfinite(v) for v in losses.values())

"""Paper A's criterion (ST, SR, SPR) on hand-made outputs and on a smoke-sized RT-DETR."""

import dataclasses
import inspect
import math

import pytest
import torch
from torch.testing import assert_close

import sodlib
from sodlib.build import build_criterion
from sodlib.config import LossConfig, ModelConfig, get_profile, override
from sodlib.losses import formulas as L
from sodlib.losses.criterion import SetCriterion, positive_mask
from sodlib.losses.matcher import HungarianMatcher
from sodlib.losses.sampling import BetterSamplingCriterion

K, C = 3, 8  # classes, hidden width
LN2 = math.log(2.0)
NEG = 0.75 * 0.25 * LN2  # VFL negative term at logit 0: alpha * p^gamma * BCE(0.5, 0)
WEIGHTS = {
    "loss_vfl": 1.0,
    "loss_bbox": 5.0,
    "loss_giou": 2.0,
    "loss_qfl": 1.0,
    "loss_tal": 1.0,
    "loss_offset": 1.0,
    "loss_atten": 1.0,
    "loss_sr_gen": 1.0,
}


def _criterion(cls_loss="vfl", **switches):
    return BetterSamplingCriterion(
        HungarianMatcher(),
        K,
        WEIGHTS,
        losses=(cls_loss, "boxes"),
        hidden_dim=C,
        eta_per_layer=(1.5, 1.2, 1.0),
        **switches,
    )


def _extras(g, batch, queries, heads=2, levels=2, points=3):
    boxes = torch.rand(batch, queries, 4, generator=g) * 0.3 + 0.2
    dp = (torch.rand(batch, queries, heads, levels, points, 2, generator=g) - 0.5) * 3
    return {
        "hidden_cls": torch.randn(batch, queries, C, generator=g).requires_grad_(),
        "hidden_reg": torch.randn(batch, queries, C, generator=g).requires_grad_(),
        "ref_boxes": boxes,
        "sampling_locations": (
            boxes[:, :, None, None, None, :2] + dp * boxes[:, :, None, None, None, 2:]
        ).requires_grad_(),
        "attention_weights": torch.randn(batch, queries, heads, levels * points, generator=g)
        .softmax(-1)
        .view(batch, queries, heads, levels, points)
        .requires_grad_(),
    }


def _layer(g, batch, queries, extras=True):
    out = {
        "pred_logits": torch.randn(batch, queries, K, generator=g).requires_grad_(),
        "pred_boxes": (torch.rand(batch, queries, 4, generator=g) * 0.4 + 0.1).requires_grad_(),
    }
    return {**out, **_extras(g, batch, queries)} if extras else out


def _outputs(sizes, num_layers=3, queries=6, groups=2, seed=0):
    """Detector-like output: final + aux + enc (no extras, as the detector) + dn, with all extras."""
    g = torch.Generator().manual_seed(seed)
    batch = len(sizes)
    layers = [_layer(g, batch, queries) for _ in range(num_layers)]
    out = dict(layers[-1], aux_outputs=layers[:-1], enc_outputs=_layer(g, batch, queries, extras=False))
    num_dn = groups * 2 * max(sizes)
    out["dn_outputs"] = [_layer(g, batch, num_dn) for _ in range(num_layers)]
    out["dn_meta"] = {
        "dn_positive_idx": [
            torch.tensor(
                [grp * 2 * max(sizes) + j for grp in range(groups) for j in range(n)], dtype=torch.long
            )
            for n in sizes
        ],
        "dn_num_group": groups,
        "dn_num_split": [num_dn, queries],
    }
    targets = [
        {"labels": torch.randint(0, K, (n,), generator=g), "boxes": torch.rand(n, 4, generator=g) * 0.3 + 0.1}
        for n in sizes
    ]
    return out, targets


def _hand_case(num_gt=1, logits=None):
    """q0 = the left half of gt0 (IoU 0.5, ρ = 1/2), q1 = gt1 exactly (IoU 1), q2 far away."""
    gts = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]])[:num_gt]
    boxes = torch.tensor([[[0.45, 0.5, 0.1, 0.2], [0.2, 0.2, 0.1, 0.1], [0.9, 0.9, 0.05, 0.05]]])
    if num_gt == 1:
        boxes = boxes[:, [0, 2]]
    q = boxes.shape[1]
    g = torch.Generator().manual_seed(0)
    out = {
        "pred_logits": (torch.zeros(1, q, K) if logits is None else logits).requires_grad_(),
        "pred_boxes": boxes.requires_grad_(),
        "hidden_cls": torch.randn(1, q, C, generator=g).requires_grad_(),
        "hidden_reg": torch.randn(1, q, C, generator=g).requires_grad_(),
    }
    return out, [{"labels": torch.tensor([1, 0])[:num_gt], "boxes": gts}]


def _constant_generator(criterion, w):
    """Make the generator output w for every query: Conv3 constant, so BN leaves its bias."""
    with torch.no_grad():
        for branch in (criterion.generator.cls, criterion.generator.reg):
            branch.conv3.weight.zero_()
            branch.norm.bias.fill_(math.log(w / (1 - w)))


# ---------------------------------------------------------------- all off == baseline


@pytest.mark.parametrize("cls_loss", ["vfl", "qfl", "tal"])
def test_all_switches_off_equals_baseline(cls_loss):
    out, targets = _outputs([2, 0, 1])
    base = SetCriterion(HungarianMatcher(), K, WEIGHTS, losses=(cls_loss, "boxes"))(out, targets)
    paper_a = _criterion(cls_loss)(out, targets)
    assert set(paper_a) == set(base)
    for key in base:
        assert torch.equal(paper_a[key], base[key]), key


# ---------------------------------------------------------------- ST


def test_scale_aligned_target_replaces_the_iou():
    out, targets = _hand_case()
    c = 0.5**0.73 * math.exp(-6.0 * (math.sqrt(0.5) - 1) ** 2) ** 0.27  # Eqs. 12-14 with u = 0.5, ρ = 1/2
    assert_close(_criterion()(out, targets)["loss_vfl"], torch.tensor(0.5 * LN2 + 5 * NEG))  # baseline
    # label mode: t = c, VFL weights the positive by its target t and BCE(0.5, t) = ln 2
    assert_close(_criterion(st=True)(out, targets)["loss_vfl"], torch.tensor(c * LN2 + 5 * NEG))
    # pred mode: t = c · s with s = sigmoid(0) = 0.5
    assert_close(
        _criterion(st=True, st_mode="pred")(out, targets)["loss_vfl"], torch.tensor(0.5 * c * LN2 + 5 * NEG)
    )
    crit = _criterion(st=True, beta=1.0)  # β = 1: c = IoU, the baseline
    assert_close(crit(out, targets)["loss_vfl"], torch.tensor(0.5 * LN2 + 5 * NEG))


@pytest.mark.parametrize("cls_loss", ["qfl", "tal"])
@pytest.mark.parametrize("sr", [False, True])
def test_st_and_sr_with_qfl_and_tal(cls_loss, sr):
    logits = torch.zeros(1, 2, K)
    logits[0, 0, 1] = 1.0  # the matched query's score at the gt class
    out, targets = _hand_case(logits=logits)
    c = 0.5**0.73 * math.exp(-6.0 * (math.sqrt(0.5) - 1) ** 2) ** 0.27
    s = 1 / (1 + math.exp(-1.0))
    bce = -(c * math.log(s) + (1 - c) * math.log(1 - s))
    # ST replaces the IoU target (TAL under one-to-one matching: t_hat = c); SR with a single positive
    # gives r = the mean of what it replaces, |t - s|^2 itself
    positive = bce * abs(c - s) ** 2
    expected = positive + 5 * LN2 * 0.25  # negatives: BCE(0.5, 0) * 0.5^2
    losses = _criterion(cls_loss, st=True, sr=sr)(out, targets)
    assert_close(losses[f"loss_{cls_loss}"], torch.tensor(expected))


# ---------------------------------------------------------------- SR


def test_sample_reweighting_hand_computed():
    out, targets = _hand_case(num_gt=2)
    crit = _criterion(sr=True, sr_grad="difficulty")  # the one mode with the generator's own BCE
    _constant_generator(crit, 0.25)
    losses = crit(out, targets)
    # s = 0.5 everywhere; t = IoU = (0.5, 1) -> r = (w, w^0.5) = (0.25, 0.5) -> mean-normalised (2/3, 4/3),
    # times the mean of what r replaces: VFL's q = t, mean 0.75 (classification); 1 (boxes)
    r = torch.tensor([2 / 3, 4 / 3])
    assert_close(losses["loss_vfl"], (0.75 * r.sum() * LN2 + 7 * NEG) / 2)  # r replaces q on the positives
    assert_close(losses["loss_bbox"], (r[0] * 0.15) / 2)  # r^reg scales L1 ...
    assert_close(losses["loss_giou"], (r[0] * 0.5) / 2)  # ... and GIoU
    # the generator's own objective: BCE(w, 1 - t) for both heads, 1 - t = (0.5, 0)
    bce = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75)) - math.log(0.75)
    assert_close(losses["loss_sr_gen"], torch.tensor(2 * bce / 2))


def test_sample_reweighting_gradients_difficulty_vs_end_to_end():
    out, targets = _hand_case(num_gt=2)
    crit = _criterion(sr=True, sr_grad="difficulty")
    losses = crit(out, targets)
    detector_terms = losses["loss_vfl"] + losses["loss_bbox"] + losses["loss_giou"]
    grads = torch.autograd.grad(detector_terms, list(crit.generator.parameters()), allow_unused=True)
    assert all(gr is None for gr in grads)  # r is detached: Eq. 22's terms do not train the generator
    grads = torch.autograd.grad(
        losses["loss_sr_gen"], [out["hidden_cls"], out["hidden_reg"]], allow_unused=True
    )
    assert all(gr is None for gr in grads)  # ... and the generator's BCE does not train the detector
    # end to end: r stays in the graph; with mean-normalised r the gradient is driven by the positives'
    # loss differences, so give them different scores
    out, targets = _hand_case(
        num_gt=2, logits=torch.randn(1, 3, K, generator=torch.Generator().manual_seed(1))
    )
    e2e = _criterion(sr=True, sr_grad="end_to_end")
    losses = e2e(out, targets)
    assert "loss_sr_gen" not in losses
    grads = torch.autograd.grad(losses["loss_vfl"], [e2e.generator.conv1.weight, out["hidden_cls"]])
    assert all(torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads)


def test_sample_reweighting_single_positive_and_encoder():
    out, targets = _hand_case()
    out["enc_outputs"] = {k: out[k] for k in ("pred_logits", "pred_boxes")}  # no head features
    losses = _criterion(sr=True)(out, targets)
    assert_close(
        losses["loss_vfl"], torch.tensor(0.5 * LN2 + 5 * NEG)
    )  # one positive: r = q (IoU 0.5), as without SR
    base = SetCriterion(HungarianMatcher(), K, WEIGHTS)(out, targets)
    assert_close(losses["loss_vfl_enc_0"], base["loss_vfl_enc_0"])  # encoder keeps the baseline weights
    assert "loss_sr_gen_enc_0" not in losses
    del out["hidden_cls"]
    with pytest.raises(ValueError, match="return_hidden"):
        _criterion(sr=True)(out, targets)


# ---------------------------------------------------------------- SPR


@pytest.mark.parametrize("spr_denoising", [False, True])
def test_spr_terms_per_decoder_layer(spr_denoising):
    out, targets = _outputs([2, 1])
    crit = _criterion(spr=True, spr_denoising=spr_denoising)
    losses, indices = crit(out, targets, return_indices=True)
    layers = {"": out, "_aux_0": out["aux_outputs"][0], "_aux_1": out["aux_outputs"][1]}
    etas = {"": 1.0, "_aux_0": 1.5, "_aux_1": 1.2}
    if spr_denoising:
        layers.update({f"_dn_{i}": dn for i, dn in enumerate(out["dn_outputs"])})
        etas.update({"_dn_0": 1.5, "_dn_1": 1.2, "_dn_2": 1.0})
    assert {k for k in losses if k.startswith(("loss_offset", "loss_atten"))} == {
        f"loss_{t}{s}" for t in ("offset", "atten") for s in layers
    }
    for suffix, layer in layers.items():
        name = suffix.lstrip("_") or "final"
        mask = positive_mask(indices[name], layer["pred_logits"].shape[1])
        assert_close(
            losses[f"loss_offset{suffix}"],
            L.spr_offset_loss(layer["sampling_locations"], layer["ref_boxes"], etas[suffix], mask),
        )
        assert_close(
            losses[f"loss_atten{suffix}"],
            L.spr_attention_loss(
                layer["sampling_locations"], layer["attention_weights"], layer["ref_boxes"], mask
            ),
        )
        assert losses[f"loss_offset{suffix}"] > 0
    # Eq. 22: the total adds L_offset and L_atten with their weights
    plain = {k: v for k, v in losses.items() if not k.startswith(("loss_offset", "loss_atten"))}
    spr = sum(v for k, v in losses.items() if k.startswith(("loss_offset", "loss_atten")))
    assert_close(crit.weighted_total(losses), crit.weighted_total(plain) + spr)


def test_spr_needs_sampling_outputs():
    out, targets = _outputs([1])
    del out["sampling_locations"]
    with pytest.raises(ValueError, match="return_sampling"):
        _criterion(spr=True)(out, targets)


# ---------------------------------------------------------------- builder and the real detector


def test_build_criterion_with_switches():
    cfg = get_profile("smoke")
    on = override(
        cfg,
        "loss.st=true",
        "loss.sr=true",
        "loss.spr=true",
        "loss.weight_offset=0.5",
        "loss.weight_sr_gen=0.1",
        "loss.sr_grad=difficulty",
    )
    crit = build_criterion(on.loss, on.model)
    assert isinstance(crit, BetterSamplingCriterion) and crit.needs_sampling and crit.needs_hidden
    assert crit.weight_dict == {
        "loss_vfl": 1.0,
        "loss_bbox": 5.0,
        "loss_giou": 2.0,
        "loss_offset": 0.5,
        "loss_atten": 1.0,
        "loss_sr_gen": 0.1,
    }
    assert crit.generator.dim == cfg.model.hidden_dim and crit.eta_per_layer == cfg.loss.eta_per_layer
    st = build_criterion(override(cfg, "loss.st=true", "loss.st_mode=pred").loss, cfg.model)
    assert (st.st_mode, st.generator, st.needs_sampling, st.needs_hidden) == ("pred", None, False, False)
    e2e = build_criterion(override(cfg, "loss.sr=true", "loss.sr_grad=end_to_end").loss, cfg.model)
    assert "loss_sr_gen" not in e2e.weight_dict and e2e.needs_hidden and not e2e.needs_sampling
    assert "loss_offset" not in e2e.weight_dict


def _smoke(*switches):
    return override(get_profile("smoke"), *switches)


def test_methods_are_training_only():
    """The detector never sees LossConfig: same parameters, same graph, same predictions."""
    assert list(inspect.signature(sodlib.build_detector).parameters) == ["model_cfg"]
    loss_fields = {f.name for f in dataclasses.fields(LossConfig)}
    assert not loss_fields & {f.name for f in dataclasses.fields(ModelConfig)}
    off = _smoke()
    on = _smoke("loss.st=true", "loss.sr=true", "loss.spr=true")
    assert on.model == off.model
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    models = []
    for cfg in (off, on):
        torch.manual_seed(0)
        models.append(sodlib.build_detector(cfg.model).eval())
    sd_off, sd_on = (m.state_dict() for m in models)
    assert list(sd_off) == list(sd_on) and all(torch.equal(sd_off[k], sd_on[k]) for k in sd_off)
    with torch.no_grad():
        pred_off, pred_on = (m(images) for m in models)
    assert set(pred_off) == set(pred_on) == {"pred_logits", "pred_boxes"}
    assert all(torch.equal(pred_off[k], pred_on[k]) for k in pred_off)
    # the SR weight generator belongs to the criterion only
    crit = build_criterion(on.loss, on.model)
    generator_params = {id(p) for p in crit.generator.parameters()}
    assert generator_params and generator_params <= {id(p) for p in crit.parameters()}
    assert not generator_params & {id(p) for p in models[1].parameters()}
    assert "generator.conv1.weight" in crit.state_dict()
    assert not any("generator" in k for k in sd_on)


@pytest.mark.parametrize("sr_grad", ["difficulty", "end_to_end"])
def test_all_switches_on_smoke_detector_gives_finite_losses_and_gradients(sr_grad):
    cfg = _smoke("loss.st=true", "loss.sr=true", "loss.spr=true", f"loss.sr_grad={sr_grad}")
    torch.manual_seed(0)
    model = sodlib.build_detector(cfg.model).train()
    crit = build_criterion(cfg.loss, cfg.model).train()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=g)
    targets = [
        {
            "labels": torch.tensor([0, 2]),
            "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.6, 0.5, 0.2, 0.05]]),
        },
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.05, 0.08]])},
    ]
    # drift the sampling offsets so that points leave the boxes and SPR is active
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.cross_attn.sampling_offsets.bias.mul_(3.0)
            layer.cross_attn.attention_weights.bias.normal_(generator=g)
    out = model(images, targets, return_sampling=crit.needs_sampling, return_hidden=crit.needs_hidden)
    losses = crit(out, targets)
    expected = {"loss_vfl", "loss_bbox", "loss_giou", "loss_offset", "loss_atten"}
    if sr_grad == "difficulty":
        expected.add("loss_sr_gen")
    suffixes = ["", "_aux_0"]
    assert {f"{k}{s}" for k in expected for s in suffixes} <= set(losses)
    assert "loss_offset_dn_0" not in losses and "loss_offset_enc_0" not in losses
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_offset"] > 0 and losses["loss_atten"] > 0
    crit.weighted_total(losses).backward()
    for name, p in [*model.named_parameters(), *crit.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_smoke_detector_with_degenerate_targets():
    cfg = _smoke("loss.st=true", "loss.sr=true", "loss.spr=true")
    torch.manual_seed(0)
    model = sodlib.build_detector(cfg.model).train()
    crit = build_criterion(cfg.loss, cfg.model).train()
    targets = [
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.3, 0.3, 0.0, 0.0]])},  # zero area
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]  # no objects
    out = model(torch.rand(2, 3, 64, 64), targets, return_sampling=True, return_hidden=True)
    losses = crit(out, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    crit.weighted_total(losses).backward()
    assert all(
        torch.isfinite(p.grad).all() for p in [*model.parameters(), *crit.parameters()] if p.grad is not None
    )


def test_criterion_defaults_match_loss_config():
    # a criterion built by hand must behave like one built from the default LossConfig
    from sodlib.losses.mrqm import MRQMCriterion

    defaults = LossConfig()
    checked = 0
    for cls in (SetCriterion, BetterSamplingCriterion, MRQMCriterion):
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if p.default is inspect.Parameter.empty or not hasattr(defaults, name) or name == "eta_per_layer":
                continue  # eta_per_layer has no class default on purpose: SPR needs one per decoder layer
            assert p.default == getattr(defaults, name), f"{cls.__name__}({name}=) != LossConfig.{name}"
            checked += 1
    assert checked >= 20


# ---------------------------------------------------------------- SR: normalisation and direction


def _matched_final(crit, out, targets):
    from sodlib.losses.criterion import LayerInfo

    indices = crit.matcher(out, targets)
    return crit.matched(out, targets, indices), LayerInfo("final", 2)


@pytest.mark.parametrize("cls_loss", ["vfl", "qfl"])
def test_sr_keeps_the_mean_positive_weight(cls_loss):
    # mean r over the positives = mean of the weight it replaces: q = t for VFL, |t - s|^gamma for QFL,
    # 1 for boxes
    logits = torch.zeros(1, 3, K)
    logits[0, 0, 1], logits[0, 1, 0] = -1.0, 2.0
    out, targets = _hand_case(num_gt=2, logits=logits)
    crit = _criterion(cls_loss, sr=True)
    m, layer = _matched_final(crit, out, targets)
    t = crit.positive_target(out, m, layer)  # IoU (0.5, 1)
    s = torch.sigmoid(torch.tensor([-1.0, 2.0]))
    replaced = t if cls_loss == "vfl" else (t - s).abs() ** 2
    r_cls = crit.sample_weights(out, m, t, layer, "cls")
    assert_close(r_cls.mean(), replaced.mean())
    assert_close(crit.sample_weights(out, m, None, layer, "reg").mean(), torch.tensor(1.0))
    assert not torch.allclose(r_cls, replaced)  # r redistributes: not the baseline weights themselves


def _generator_step(sr_grad):
    """One SGD step of the generator on a hard (IoU 0.5, low score) and an easy (IoU 1, high score) positive;
    returns r_hard / r_easy before and after."""
    logits = torch.zeros(1, 3, K)
    logits[0, 1, 0] = 2.0  # the easy positive is also confidently classified
    out, targets = _hand_case(num_gt=2, logits=logits)
    crit = _criterion(sr=True, sr_grad=sr_grad)
    m, layer = _matched_final(crit, out, targets)
    t = crit.positive_target(out, m, layer)
    hard, easy = int((t < 0.9).nonzero()[0]), int((t > 0.9).nonzero()[0])

    def ratio():
        r = crit.sample_weights(out, m, t, layer, "cls")
        return float((r[hard] / r[easy]).detach())

    before = ratio()
    losses = crit(out, targets)
    objective = losses["loss_sr_gen"] if sr_grad == "difficulty" else losses["loss_vfl"]
    params = list(crit.generator.parameters())
    grads = torch.autograd.grad(objective, params, allow_unused=True)
    with torch.no_grad():
        for p, gr in zip(params, grads):
            if gr is not None:
                p -= 0.5 * gr
    return before, ratio()


def test_sr_default_mode_gives_hard_positives_more_weight():
    assert LossConfig().sr_grad == "difficulty"
    before, after = _generator_step("difficulty")
    assert after > before  # a training step raises the hard positive's weight against the easy one's


def test_sr_end_to_end_mode_learns_the_opposite():
    # kept as an option (Table 3's extra row): the weighted loss's own gradient lowers the weight of the
    # positive with the larger loss, i.e. it favours the easy positive
    before, after = _generator_step("end_to_end")
    assert after < before

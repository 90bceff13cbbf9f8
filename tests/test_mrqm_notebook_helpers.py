"""Helpers of notebook 06 (MRQM): positives per gt of a trained IAH, mined queries, encoder cost, figures."""

import math

import pandas as pd
import pytest
import torch
from torch.testing import assert_close

import sodlib
from sodlib.config import get_profile, override
from sodlib.io import save_figure
from sodlib.studies.bench import encoder_cost_summary
from sodlib.studies.mrqm_analysis import (
    POSITIVE_RULES,
    iah_dense_predictions,
    mined_queries,
    positives_per_gt,
    positives_table,
    positives_verdict,
    trained_positives_per_gt,
)
from sodlib.studies.mrqm_viz import plot_mined_queries, plot_positives_per_gt, query_panels

SIZE = 64


def _model(*extra):
    torch.manual_seed(0)
    cfg = override(
        get_profile("smoke"), "model.iah=true", "model.iah_as_px=2", f"data.image_size={SIZE}", *extra
    )
    return sodlib.build_detector(cfg.model).eval()


def _dataset(model, n=2):
    """Images whose gts are (jittered) copies of some of the head's own predicted boxes, so that some tokens
    reach any IoU threshold, plus a tiny box that no token reaches (best-token rule only)."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, SIZE, SIZE, generator=g)
    boxes = iah_dense_predictions(model, images)["pred_boxes"]
    data = []
    for b in range(n):
        picked = boxes[b, torch.randperm(boxes.shape[1], generator=g)[:3]].clone()
        picked[:, :2] += 0.01 * torch.randn(3, 2, generator=g)
        tiny = torch.tensor([[0.9, 0.1, 2 / SIZE, 2 / SIZE]])
        gt = torch.cat([picked.clamp(0.05, 0.95), tiny])
        data.append((images[b], {"boxes": gt, "labels": torch.arange(len(gt)) % 3}))
    return data


# ---------------------------------------------------------------- tables and verdicts


def test_positives_table_buckets_means_and_ratio():
    area = torch.tensor([100.0, 120.0, 300.0, 900.0, 1500.0, 5000.0])  # eS, eS, rS, gS, N, beyond N
    per_gt = {"IoU > T_I": torch.tensor([1, 3, 0, 2, 0, 4]), "IoU > T_b": torch.tensor([2, 4, 0, 2, 1, 8])}
    t = positives_table(per_gt, area, torch.full((6,), 0.7)).set_index("bucket")
    assert list(t.index) == ["eS", "rS", "gS", "N", "all"]
    assert t["gts"].tolist() == [2, 1, 1, 1, 6]
    assert t.loc["eS", "IoU > T_I"] == 2.0 and t.loc["eS", "IoU > T_b"] == 3.0
    assert t.loc["eS", "dynamic / fixed"] == pytest.approx(2 / 3)
    assert math.isnan(t.loc["rS", "dynamic / fixed"])  # no fixed positive: no ratio
    assert t.loc["all", "IoU > T_b"] == pytest.approx(17 / 6)  # "all" includes the box beyond N
    assert t.loc["gS", "mean T_I"] == pytest.approx(0.7)
    empty = positives_table(per_gt, torch.full((6,), 5000.0), torch.full((6,), 0.7)).set_index("bucket")
    assert empty.loc["eS", "gts"] == 0 and math.isnan(empty.loc["eS", "IoU > T_I"])


def _table(dyn, fixed):
    area = torch.tensor([100.0, 300.0, 900.0, 1500.0])
    return positives_table(
        {"IoU > T_I": torch.tensor(dyn), "IoU > T_b": torch.tensor(fixed)}, area, torch.full((4,), 0.7)
    )


def test_positives_verdict_words():
    more = positives_verdict(_table([3, 3, 3, 1], [1, 2, 2, 1]), "m")
    assert more.startswith("m: positives per GT") and "the claim holds" in more
    fewer = positives_verdict(_table([0, 1, 1, 0], [2, 2, 4, 1]))
    assert "FEWER" in fewer and "does not hold" in fewer
    assert "rS keeps the largest share of its positives (50%) and eS the smallest (0%)" in fewer
    assert "holds only in part" in positives_verdict(_table([3, 0, 1, 0], [1, 2, 1, 1]))
    assert "no box reaches T_b" in positives_verdict(_table([0, 0, 0, 0], [0, 0, 0, 0]))


def test_encoder_cost_summary():
    rows = [
        ("hybrid", 50.0, 0.0, 280.0, 400),
        ("bifpn", 18.0, 0.0, 300.0, 0),
        ("bifpn_sae", 89.0, 1.0, 1200.0, 424),
        ("bifpn_naive", 170.0, 10.0, 2800.0, 1020),
        ("sae", 70.0, 1.0, 900.0, 424),
        ("naive", 150.0, 10.0, 2500.0, 1020),
    ]
    df = pd.DataFrame(
        [
            {
                "encoder": e,
                "image_size": 640,
                "gflops": g,
                "sampling_gflops": s,
                "latency_ms": ms,
                "tokens": n,
            }
            for e, g, s, ms, n in rows
        ]
    )
    text = encoder_cost_summary(df)
    assert text.startswith("Encoder cost at 640 px: BiFPN+SAE 90 GFLOPs, 50% of BiFPN + naive encoder (180)")
    assert (
        "1.8× RT-DETR's hybrid encoder (50)" in text
        and "latency 1200 ms vs 2800 ms (naive) and 280 ms" in text
    )
    assert "SAE 71 vs naive 160 GFLOPs (424 vs 1020 token updates)" in text


# ------------------------------------------------------------ a (randomly initialised) detector with the IAH


def test_iah_dense_predictions_shapes_levels_and_mode():
    model = _model().train()
    images = torch.rand(2, 3, SIZE, SIZE)
    d = iah_dense_predictions(model, images)
    n = sum(h * w for h, w in d["shapes"])
    assert d["pred_boxes"].shape == (2, n, 4) and d["pred_logits"].shape[:2] == (2, n)
    assert d["valid"].shape == (n,) and d["valid"].dtype == torch.bool
    assert torch.bincount(d["level"]).tolist() == [h * w for h, w in d["shapes"]]
    assert model.training  # the mode is restored
    model.eval()
    assert_close(iah_dense_predictions(model, images[:1])["pred_boxes"], d["pred_boxes"][:1])


def test_helpers_need_a_trained_iah():
    plain = sodlib.build_detector(override(get_profile("smoke"), f"data.image_size={SIZE}").model)
    with pytest.raises(ValueError, match="model.iah=true"):
        iah_dense_predictions(plain, torch.rand(1, 3, SIZE, SIZE))
    unset = sodlib.build_detector(override(get_profile("smoke"), "model.iah=true").model)
    with pytest.raises(ValueError, match="A_s is not set"):
        trained_positives_per_gt(unset, [(torch.rand(3, SIZE, SIZE), {"boxes": torch.rand(1, 4)})])


def test_trained_positives_per_gt_is_the_heads_own_assignment():
    model = _model()
    data = _dataset(model)
    table = trained_positives_per_gt(model, data, batch_size=1).set_index("bucket")
    assert set(POSITIVE_RULES) <= set(table.columns)
    assert table.loc["all", "gts"] == sum(len(t["boxes"]) for _, t in data)
    # the head's forward (what training uses) gives the same counts as the "T_I + best token" rule
    mined = [mined_queries(model, image, target) for image, target in data]
    head_counts = torch.cat([m["num_positive"] for m in mined]).float()
    assert table.loc["all", "T_I + best token"] == pytest.approx(float(head_counts.mean()))
    # and the same as positives_per_gt called directly on the head's boxes and parameters
    boxes = iah_dense_predictions(model, torch.stack([image for image, _ in data]))
    head = model.aux_head
    direct = positives_per_gt(
        [t["boxes"] for _, t in data],
        boxes["pred_boxes"],
        "dynamic",
        (SIZE, SIZE),
        float(head.as_px),
        head.tb,
        head.k,
        head.p,
        valid=boxes["valid"],
        force_best=False,
    )
    assert table.loc["all", "IoU > T_I"] == pytest.approx(float(direct["per_gt"].mean()))
    # gts copied from predicted boxes are reached by IoU alone; T_I >= T_b never gives more positives
    assert table.loc["all", "IoU > T_b"] > 0
    assert (table["IoU > T_I"].fillna(0) <= table["IoU > T_b"].fillna(0)).all()
    assert (table.loc["all", ["T_I + best token", "T_b + best token"]] >= 1).all()  # every gt has one
    # with k = 0 the dynamic threshold is T_b: both columns agree
    head.k = 0.0
    flat = trained_positives_per_gt(model, data).set_index("bucket")
    assert flat.loc["all", "IoU > T_I"] == flat.loc["all", "IoU > T_b"] == table.loc["all", "IoU > T_b"]
    assert flat.loc["all", "mean T_I"] == pytest.approx(head.tb)


def test_mined_queries_flags_and_boxes():
    model = _model("model.iah_max_queries=5")
    image, target = _dataset(model, n=1)[0]
    m = mined_queries(model, image, target)
    assert 0 < len(m["token"]) <= 5 and len(m["thresholds"]) == len(target["boxes"])
    assert_close(m["forced"], m["iou"] <= m["thresholds"][m["gt"]])
    assert bool(m["forced"].any())  # the 2-px box is only reached by the best-token rule
    dense = iah_dense_predictions(model, image[None])
    assert_close(m["box"], dense["pred_boxes"][0, m["token"]])
    assert_close(m["level"], dense["level"][m["token"]])
    assert int(m["num_positive"].sum()) >= len(m["token"])  # the cap keeps a subset
    none = mined_queries(
        model, image, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    )
    assert len(none["token"]) == 0 and len(none["num_positive"]) == 0


# ---------------------------------------------------------------- figures


def test_query_panels_and_figures(tmp_path):
    model = _model()
    data = _dataset(model)
    rows = [
        query_panels(image, target, mined_queries(model, image, target), num_objects=2, label="x: ")
        for image, target in data
    ]
    assert [len(r) for r in rows] == [3, 3]
    whole, smallest = rows[0][0], rows[0][1]
    assert whole["focus_xyxy"] is None and whole["title"].startswith("x: ")
    assert smallest["focus_xyxy"] == pytest.approx(
        [56.6, 5.4, 58.6, 7.4]
    )  # the 2-px box at (0.9, 0.1), in pixels
    assert "(eS)" in smallest["title"] and len(smallest["query_iou"]) >= 1
    png = save_figure(plot_mined_queries(rows, suptitle="t"), tmp_path / "q.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    tables = {"a": trained_positives_per_gt(model, data), "b": trained_positives_per_gt(model, data[:1])}
    png = save_figure(plot_positives_per_gt(tables, suptitle="t"), tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- ATSS control, balance, curves


def test_atss_thresholds_hand_computed():
    from sodlib.studies.mrqm_analysis import atss_thresholds

    gt = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    # three tokens centred on the gt with IoU 1, 0.81, 0.64 (side ×1, ×0.9, ×0.8), one far token (IoU 0)
    boxes = torch.tensor(
        [[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.18, 0.18], [0.5, 0.5, 0.16, 0.16], [0.9, 0.9, 0.2, 0.2]]
    )
    # top-3 nearest: the three centred ones; mean 0.81667, sample std 0.18009
    assert_close(atss_thresholds(boxes, gt, topk=3), torch.tensor([0.816667 + 0.180093]), atol=1e-5, rtol=0)
    # top-1 per level on two levels: IoU 1 (level 0) and 0.64 (level 1): mean 0.82, std 0.254558
    level = torch.tensor([0, 1, 1, 1])
    assert_close(
        atss_thresholds(boxes[[0, 2, 3, 1]], gt, level=level, topk=1),
        torch.tensor([0.82 + 0.254558]),
        atol=1e-5,
        rtol=0,
    )
    # invalid tokens are never candidates: without token 0 the three nearest are 0.81, 0.64 and 0
    valid = torch.tensor([False, True, True, True])
    ious = torch.tensor([0.81, 0.64, 0.0])
    assert_close(atss_thresholds(boxes, gt, valid, topk=3), (ious.mean() + ious.std()).reshape(1))
    assert atss_thresholds(boxes, torch.zeros(0, 4)).shape == (0,)
    # all four tokens are candidates at topk 9: IoUs 1, 0.81, 0.64, 0 give 0.6125 + 0.4340 > 1, no positive
    counts = positives_per_gt([gt], boxes, "atss", image_hw=(SIZE, SIZE), force_best=False)
    assert counts["per_gt"].tolist() == [0]
    counts = positives_per_gt([gt], boxes[:3], "atss", image_hw=(SIZE, SIZE), force_best=False)
    assert counts["per_gt"].tolist() == [1]  # without the far token: only IoU 1 exceeds 0.997


def test_encoder_gradient_share_scales_with_the_iah_factor():
    from sodlib.build import build_criterion
    from sodlib.studies.mrqm_analysis import encoder_gradient_share

    targets = [
        {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.6, 0.6, 0.2, 0.1]])}
    ]
    images = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    shares = {}
    for factor in (1.0, 0.5):
        cfg = override(
            get_profile("smoke"),
            "model.iah=true",
            "model.iah_as_px=2",
            f"data.image_size={SIZE}",
            f"loss.weight_iah={factor}",
        )
        torch.manual_seed(0)
        model = sodlib.build_detector(cfg.model)
        shares[factor] = encoder_gradient_share(model, build_criterion(cfg.loss, cfg.model), images, targets)
    one, half = shares[1.0], shares[0.5]
    assert {"decoder", "iah", "auxq"} <= set(one) and all(v > 0 and math.isfinite(v) for v in one.values())
    assert half["iah"] == pytest.approx(one["iah"] / 2, rel=1e-4)  # the IAH's pull is linear in its factor
    assert half["iah_loss"] == pytest.approx(one["iah_loss"] / 2, rel=1e-5)
    assert half["decoder"] == pytest.approx(one["decoder"], rel=1e-5) and half["auxq"] == pytest.approx(
        one["auxq"]
    )


def test_threshold_readings_and_long_positives():
    from sodlib.studies.mrqm_analysis import positives_long, threshold_readings

    t = threshold_readings((4, 128), as_px=5.36, image_size=320)
    assert list(t.columns) == ["side_px", "T_I norm_px2", "T_I px_px2", "T_I px_px"]
    assert t["T_I norm_px2"].tolist() == pytest.approx([0.582, 0.614], abs=5e-4)
    assert t["T_I px_px"].tolist() == pytest.approx([0.6915, 0.8329], abs=1e-4)
    table = positives_table(
        {"IoU > T_I": torch.tensor([2.0, 4.0]), "IoU > T_b": torch.tensor([3.0, 5.0])},
        torch.tensor([100.0, 300.0]),
        torch.tensor([0.6, 0.6]),
    )
    long = positives_long(table)
    assert list(long.columns) == ["rule", "bucket", "positives_per_gt"]
    got = long.set_index(["rule", "bucket"])["positives_per_gt"]
    assert (
        got[("IoU > T_I", "eS")] == 2.0
        and got[("IoU > T_b", "rS")] == 5.0
        and got[("IoU > T_b", "all")] == 4.0
    )


def _decoder_run(folder, log: dict):
    """A run folder with the decoder loss weights vfl 1, bbox 5, giou 2 and ``log`` as its log.csv."""
    import json

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"loss": {"weight_vfl": 1.0, "weight_bbox": 5.0, "weight_giou": 2.0}})
    )
    pd.DataFrame(log).to_csv(folder / "log.csv", index=False)
    return folder


def test_decoder_loss_curve_and_figure(tmp_path):
    from sodlib.studies.mrqm_analysis import decoder_loss_curve
    from sodlib.studies.mrqm_viz import plot_decoder_losses

    run = _decoder_run(
        tmp_path / "run",
        {
            "iteration": [10, 20, 30],
            "loss_vfl": [1.0, 0.5, 0.25],
            "loss_bbox": [0.2, 0.1, 0.1],
            "loss_giou": [0.5, 0.5, 0.25],
        },
    )
    curve = decoder_loss_curve(run, window=2)
    # 1 + 5·0.2 + 2·0.5 = 3; 0.5 + 0.5 + 1 = 2; 0.25 + 0.5 + 0.5 = 1.25; rolling mean over 2
    assert curve["decoder_loss"].tolist() == pytest.approx([3.0, 2.5, 1.625])
    fig = plot_decoder_losses({"a": [curve, curve], "b": [curve], "none": []}, suptitle="t")
    assert len(fig.axes[0].lines) == 2
    save_figure(fig, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_decoder_loss_curves_read_each_run_where_the_table_read_it(tmp_path):
    from sodlib.studies.mrqm_analysis import decoder_loss_curves

    def write_run(folder, vfl):
        _decoder_run(folder, {"iteration": [10], "loss_vfl": [vfl], "loss_bbox": [0.0], "loss_giou": [0.0]})

    write_run(tmp_path / "runs" / "aaa", 1.0)
    write_run(tmp_path / "machines" / "Kind_x" / "runs" / "bbb", 2.0)  # a whole retrain on another kind
    write_run(tmp_path / "runs" / "bbb", 9.0)  # the committed run the table did not read
    runs = pd.DataFrame(
        {"row": ["b", "a", "b"], "run": ["machines/Kind_x/runs/bbb", "aaa", ""]}  # "": not trained yet
    )
    curves = decoder_loss_curves(runs, tmp_path, window=1)
    assert list(curves) == ["b", "a"]  # the table's order
    assert [c["decoder_loss"].tolist() for c in curves["b"]] == [[2.0]]
    assert [c["decoder_loss"].tolist() for c in curves["a"]] == [[1.0]]

"""Tests for sodlib.evaluation.protocols (COCO / SODA-D / VisDrone-DET protocols)."""

from __future__ import annotations

import contextlib
import copy
import io
import math
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sodlib.evaluation import protocols as ev
from sodlib.evaluation import visdrone as vd

VAL_ANN = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "visdrone_val_annotations"
if not VAL_ANN.is_dir():
    VAL_ANN = Path("/work/shared/data/visdrone_val_annotations")
CATS10 = [{"id": k, "name": n} for k, n in vd.VISDRONE_CATEGORIES]


# ----------------------------------------------------------------------------- helpers
def make_gt(boxes, cats=None, size=(200, 200), regions=None, others=None):
    """boxes: list of (image_id, category_id, [x, y, w, h], ignore)."""
    ids = sorted({b[0] for b in boxes} | {1})
    images = [
        {
            "id": i,
            "width": size[0],
            "height": size[1],
            "ignore_regions_xywh": (regions or {}).get(i, []),
            "ignored_boxes_xywh": (others or {}).get(i, []),
        }
        for i in ids
    ]
    anns = [
        {
            "id": j + 1,
            "image_id": im,
            "category_id": c,
            "bbox": list(b),
            "area": b[2] * b[3],
            "iscrowd": int(ig),
            "ignore": int(ig),
        }
        for j, (im, c, b, ig) in enumerate(boxes)
    ]
    return {"images": images, "annotations": anns, "categories": cats or [{"id": 1, "name": "a"}]}


def det(im, c, b, s):
    return {"image_id": im, "category_id": c, "bbox": list(b), "score": s}


def random_set(seed, n_img=6, n_gt=15, n_det=40, n_cat=3, W=120, H=90):
    rng = np.random.default_rng(seed)
    boxes, dets, regions = [], [], {}
    for i in range(1, n_img + 1):
        g = np.c_[
            rng.integers(0, W - 20, n_gt), rng.integers(0, H - 20, n_gt), rng.integers(2, 30, (n_gt, 2))
        ]
        c = rng.integers(1, n_cat + 1, n_gt)
        ig = rng.uniform(size=n_gt) < 0.15
        g[1] = g[0]  # a duplicate ground-truth box (tie in matching)
        c[1] = c[0]
        boxes += [(i, int(cc), [int(v) for v in gg], bool(ii)) for gg, cc, ii in zip(g, c, ig)]
        regions[i] = [
            [
                int(rng.integers(0, W)),
                int(rng.integers(0, H)),
                int(rng.integers(5, 50)),
                int(rng.integers(5, 50)),
            ]
            for _ in range(int(rng.integers(0, 3)))
        ]
        for k in range(n_det):
            if k < n_gt and rng.uniform() < 0.8:
                b = g[k] + np.r_[rng.integers(-3, 4, 2) + 0.5 * rng.integers(0, 2, 2), rng.integers(-2, 3, 2)]
                cc = int(c[k])
            else:
                b = np.r_[rng.uniform(0, W - 10), rng.uniform(0, H - 10), rng.uniform(2, 30, 2)]
                cc = int(rng.integers(1, n_cat + 1))
            b[2:] = np.maximum(b[2:], 1)
            dets.append(det(i, cc, [float(v) for v in b], float(np.round(rng.uniform(), 1))))
            if k < n_gt and rng.uniform() < 0.4:  # a competing duplicate on the same object
                dets.append(det(i, cc, [float(v) + 1 for v in b], float(np.round(rng.uniform(), 1))))
    cats = [{"id": k, "name": f"c{k}"} for k in range(1, n_cat + 1)]
    gt = make_gt(boxes, cats, (W, H), regions)
    rng.shuffle(dets)  # results in no particular order
    return gt, dets


# ----------------------------------------------------------------------------- literal toolkit port
# An independent line-by-line translation of the VisDrone MATLAB toolkit (loops, explicit pixel
# mask, MATLAB rounding via Decimal), used as an oracle for the vectorised implementation.
def _mround(v):
    return int(Decimal(repr(float(v))).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _drop_literal(gt, dt, H, W):  # dropObjectsInIgr.m
    cur = [r for r in gt if r[5] != 0]
    regs = [[max(1, v) for v in r[:4]] for r in gt if r[5] == 0]
    if not regs:
        return cur, dt
    m = np.zeros((H + 1, W + 1), np.int64)  # 1-based
    for x, y, w, h in regs:
        m[y : min(H, y + h) + 1, x : min(W, x + w) + 1] = 1
    m[0, :] = 0
    m[:, 0] = 0
    I = m.cumsum(0).cumsum(1)  # createIntImg.m

    def keep(r):
        x, y, w, h = [max(1, _mround(v)) for v in r[:4]]
        x, y = max(1, min(W, x)), max(1, min(H, y))
        yb, xr = max(1, min(H, y + h)), min(W, x + w)
        val = I[y, x] + I[yb, xr] - I[y, xr] - I[yb, x]
        return val / (h * w) < 0.5

    return [r for r in cur if keep(r)], [r for r in dt if keep(r)]


def _oa(d, g, ig):  # compOas.m
    w = min(d[0] + d[2], g[0] + g[2]) - max(d[0], g[0])
    h = min(d[1] + d[3], g[1] + g[3]) - max(d[1], g[1])
    if w <= 0 or h <= 0:
        return 0.0
    t = w * h
    return t / (d[2] * d[3] if ig else d[2] * d[3] + g[2] * g[3] - t)


def _eval_res(gt0, dt0, thr):  # evalRes.m
    dt = sorted(dt0, key=lambda r: -r[4])
    gt = sorted(gt0, key=lambda r: r[4])
    gm = [-r[4] for r in gt]
    dm = [0] * len(dt)
    for d in range(len(dt)):
        bo, bg, bm = thr, -1, 0
        for g in range(len(gt)):
            if gm[g] == 1:
                continue
            if bm != 0 and gm[g] == -1:
                break
            o = _oa(dt[d], gt[g], gm[g] == -1)
            if o < bo:
                continue
            bo, bg, bm = o, g, (1 if gm[g] == 0 else -1)
        if bm == -1:
            dm[d] = -1
        elif bm == 1:
            gm[bg], dm[d] = 1, 1
    return gm, [(r[4], m) for r, m in zip(dt, dm)]


def _vocap(rec, prec):  # VOCap.m
    mrec, mpre = [0.0] + list(rec) + [1.0], [0.0] + list(prec) + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def toolkit_literal(gt_dict, dets, max_dets=(1, 10, 100, 500)):
    """Rows as the toolkit reads them, then saveAnnoRes.m + calcAccuracy.m."""
    allgt, alldet = [], []
    for im in gt_dict["images"]:
        g = [
            list(a["bbox"]) + [0 if a.get("ignore") else 1, a["category_id"]]
            for a in gt_dict["annotations"]
            if a["image_id"] == im["id"]
        ]
        g += [list(r) + [0, 0] for r in im.get("ignore_regions_xywh", [])]
        g += [list(r) + [0, 11] for r in im.get("ignored_boxes_xywh", [])]
        d = [list(x["bbox"]) + [x["score"], x["category_id"]] for x in dets if x["image_id"] == im["id"]]
        g, d = _drop_literal(g, d, im["height"], im["width"])
        g = [r[:4] + [1 - r[4], r[5]] for r in g]  # saveAnnoRes.m: score 0 -> ignore 1
        allgt.append(g)
        alldet.append(d)
    classes = [c["id"] for c in gt_dict["categories"]]
    thrs = [0.5 + k * 0.05 for k in range(5)] + [0.95 - k * 0.05 for k in (4, 3, 2, 1, 0)]
    AP = {c: [0.0] * 10 for c in classes}
    AR = {c: [[0.0] * len(max_dets) for _ in range(10)] for c in classes}
    eval_class = []
    for c in classes:
        eval_class += [c for g in allgt if any(r[5] == c for r in g)]
        for x, thr in enumerate(thrs):
            for y, md in enumerate(max_dets):
                gtm, dtm = [], []
                for g, d in zip(allgt, alldet):
                    gm, dm = _eval_res(
                        [r[:5] for r in g if r[5] == c], [r[:5] for r in d[:md] if r[5] == c], thr
                    )
                    gtm += gm
                    dtm += dm
                rank = sorted(range(len(dtm)), key=lambda i: -dtm[i][0])
                tp = np.cumsum([dtm[i][1] == 1 for i in rank])
                rec = tp / max(1, len(gtm))
                if len(rec):
                    AR[c][x][y] = rec.max()
            fp = np.cumsum([dtm[i][1] == 0 for i in rank])
            prec = tp / np.maximum(1, fp + tp)
            AP[c][x] = _vocap(rec, prec)
    if not eval_class:
        return None
    out = {
        "AP": np.mean([AP[c] for c in eval_class]),
        "AP50": np.mean([AP[c][0] for c in eval_class]),
        "AP75": np.mean([AP[c][5] for c in eval_class]),
    }
    for y, md in enumerate(max_dets):
        out[f"AR{md}"] = np.mean([[AR[c][x][y] for x in range(10)] for c in eval_class])
    return out


def _read_visdrone_txt(path):
    rows = [list(map(int, ln.split(",")[:6])) for ln in Path(path).read_text().split() if ln.strip()]
    return rows


def visdrone_gt_from_files(files):
    """Minimal local VisDrone txt -> COCO (the visdrone_to_coco contract). No images here, so
    width/height are the extent of the boxes."""
    images, anns = [], []
    for i, f in enumerate(files, 1):
        rows = _read_visdrone_txt(f)
        W = max(r[0] + r[2] for r in rows) + 1
        H = max(r[1] + r[3] for r in rows) + 1
        images.append(
            {
                "id": i,
                "file_name": f.name,
                "width": W,
                "height": H,
                "ignore_regions_xywh": [r[:4] for r in rows if r[5] == 0],
                "ignored_boxes_xywh": [r[:4] for r in rows if r[5] == 11],
            }
        )
        for r in rows:
            if 1 <= r[5] <= 10:
                ig = int(r[4] == 0)
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i,
                        "category_id": r[5],
                        "bbox": r[:4],
                        "area": r[2] * r[3],
                        "iscrowd": ig,
                        "ignore": ig,
                    }
                )
    return {"images": images, "annotations": anns, "categories": CATS10}


# ----------------------------------------------------------------------------- coco
def test_coco_perfect_and_empty_ranges():
    gt = make_gt([(1, 1, [10, 10, 20, 20], 0), (1, 1, [60, 60, 10, 12], 0), (2, 1, [5, 5, 30, 25], 0)])
    dets = [det(a["image_id"], 1, a["bbox"], 0.9) for a in gt["annotations"]]
    m = ev.evaluate(gt, dets, "coco")
    assert list(m) == ["AP", "AP50", "AP75", "APS", "APM", "APL"]
    assert m["AP"] == m["AP50"] == m["AP75"] == m["APS"] == 1.0
    assert m["APM"] == -1.0 and m["APL"] == -1.0


@pytest.mark.parametrize("protocol", ["coco", "visdrone"])
def test_single_offset_box(protocol):
    # IoU = (20*13.6)/(20*20) = 0.68: passes 0.50, 0.55, 0.60, 0.65 of the 10 thresholds
    gt = make_gt([(1, 1, [10, 10, 20, 20], 0)])
    m = ev.evaluate(gt, [det(1, 1, [10, 10, 20, 13.6], 0.9)], protocol)
    assert m["AP50"] == 1.0 and m["AP75"] == 0.0
    assert m["AP"] == pytest.approx(0.4, abs=1e-12)
    if protocol == "visdrone":
        assert m["AR1"] == pytest.approx(0.4, abs=1e-12) and m["AR500"] == pytest.approx(0.4, abs=1e-12)


def test_coco_equals_raw_pycocotools():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dets = vd.make_eval_benchmark_set(num_images=12, gt_per_image=20, dets_per_image=40, seed=3)
    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO()
        cg.dataset = copy.deepcopy(gt)
        cg.createIndex()
        E = COCOeval(cg, cg.loadRes(copy.deepcopy(dets)), "bbox")
        E.evaluate()
        E.accumulate()
        E.summarize()
    for be in ("pycocotools", "faster"):
        m = ev.evaluate(gt, dets, "coco", backend=be)
        if be == "pycocotools":
            assert list(m.values()) == [float(v) for v in E.stats[:6]]  # exact
        else:
            assert list(m.values()) == pytest.approx(list(E.stats[:6]), rel=0, abs=1e-9)


@pytest.mark.parametrize("protocol", ["coco", "sodad"])
def test_backends_agree(protocol):
    gt, dets = vd.make_eval_benchmark_set(num_images=10, gt_per_image=25, dets_per_image=60, seed=1)
    gt["categories"].append({"id": 11, "name": "ignore"})
    gt["annotations"][5]["category_id"] = 11
    m1, t1 = ev.evaluate_detailed(gt, dets, protocol, "pycocotools")
    m2, t2 = ev.evaluate_detailed(gt, dets, protocol, "faster")
    assert set(m1) == set(m2)
    for k in m1:
        assert abs(m1[k] - m2[k]) < 1e-9, k
    np.testing.assert_allclose(t1[["AP", "AP50"]].to_numpy(), t2[["AP", "AP50"]].to_numpy(), atol=1e-9)
    assert ev.evaluate(gt, dets, protocol, "auto") == pytest.approx(m2, abs=1e-12)


# ----------------------------------------------------------------------------- sodad
def test_sodad_size_ranges():
    cats = [{"id": 1, "name": "people"}, {"id": 10, "name": "ignore"}]
    sizes = {"eS": 10, "rS": 15, "gS": 25, "N": 40}
    gt = make_gt([(1, 1, [20 + 50 * k, 20, s, s], 0) for k, s in enumerate(sizes.values())], cats, (300, 100))
    dets = [det(1, 1, a["bbox"], 0.9) for a in gt["annotations"]]
    m = ev.evaluate(gt, dets, "sodad")
    assert list(m) == ["AP", "AP50", "AP75", "APeS", "APrS", "APgS", "APN"]
    assert all(v == 1.0 for v in m.values())
    m = ev.evaluate(gt, dets[:1], "sodad")  # only the 10x10 box found
    assert (m["APeS"], m["APrS"], m["APgS"], m["APN"]) == (1.0, 0.0, 0.0, 0.0)
    # Small = eS+rS+gS: recall 1/3 at precision 1 -> recall thresholds 0..0.33 -> 34/101
    assert m["AP"] == pytest.approx(34 / 101, abs=1e-12) and m["AP50"] == pytest.approx(34 / 101, abs=1e-12)
    m = ev.evaluate(gt, dets[3:], "sodad")  # only the 40x40 (Normal, outside Small)
    assert m["APN"] == 1.0 and m["AP"] == 0.0 and m["APeS"] == 0.0


def test_sodad_ignore_flag_and_ignore_category():
    cats = [{"id": 1, "name": "people"}, {"id": 10, "name": "ignore"}]
    gt = make_gt(
        [(1, 1, [0, 0, 10, 10], 0), (1, 1, [50, 50, 10, 10], 1), (1, 10, [100, 100, 10, 10], 0)], cats
    )
    a, b, c = [x["bbox"] for x in gt["annotations"]]
    assert ev.evaluate(gt, [det(1, 1, b, 0.95), det(1, 1, a, 0.8)], "sodad")["AP"] == 1.0  # ignored, not FP
    # official SODADeval forces iscrowd=0: an ignore box absorbs one detection, the second is a FP
    two = [det(1, 1, b, 0.95), det(1, 1, b, 0.9), det(1, 1, a, 0.8)]
    assert ev.evaluate(gt, two, "sodad")["AP"] == pytest.approx(0.5, abs=1e-12)
    # pycocotools (coco protocol, iscrowd=1): a crowd box absorbs any number of detections
    assert ev.evaluate(gt, two, "coco", per_class=True)["AP/people"] == 1.0
    # category 'ignore' is not evaluated: its box is no ground truth for anyone, dets on it are FPs
    m, table = ev.evaluate_detailed(gt, [det(1, 1, c, 0.95), det(1, 1, a, 0.8), det(1, 10, c, 0.9)], "sodad")
    assert m["AP"] == pytest.approx(0.5, abs=1e-12)
    assert table["category_id"].tolist() == [1] and table["num_gt"].tolist() == [1]


# ----------------------------------------------------------------------------- visdrone
def test_visdrone_perfect_with_ignore_info():
    gt = make_gt(
        [(1, 1, [10, 10, 20, 20], 0), (1, 4, [100, 100, 15, 10], 0), (2, 4, [50, 50, 8, 8], 0)],
        CATS10,
        regions={1: [[150, 150, 40, 40]]},
        others={2: [[0, 0, 10, 10]]},
    )
    dets = [det(a["image_id"], a["category_id"], a["bbox"], 1.0) for a in gt["annotations"]]
    m = ev.evaluate(gt, dets, "visdrone")
    assert list(m) == ["AP", "AP50", "AP75", "AR1", "AR10", "AR100", "AR500"]
    assert m["AP"] == m["AP50"] == m["AP75"] == m["AR10"] == m["AR500"] == 1.0


def test_visdrone_ignore_regions():
    # region [0,0,50,50] -> mask pixels rows/cols 1..51 (1-based, inclusive: dropObjectsInIgr.m)
    gt = make_gt(
        [(1, 1, [150, 150, 20, 20], 0), (1, 1, [5, 5, 20, 20], 0)], CATS10, regions={1: [[0, 0, 50, 50]]}
    )
    tp = det(1, 1, [150, 150, 20, 20], 0.5)
    inside = det(1, 1, [10, 10, 20, 20], 0.9)  # 100% inside: dropped
    half = det(1, 1, [41, 10, 20, 20], 0.9)  # columns 42..61 -> 10/20 inside = 50%: dropped
    forty = det(1, 1, [43, 10, 20, 20], 0.9)  # columns 44..63 -> 8/20 = 40%: a false positive
    # the GT at [5,5,20,20] lies inside the region: dropped, so it is no missed object
    assert ev.evaluate(gt, [tp], "visdrone")["AP"] == 1.0
    assert ev.evaluate(gt, [tp, inside, half], "visdrone")["AP"] == 1.0
    assert ev.evaluate(gt, [tp, forty], "visdrone")["AP"] == pytest.approx(0.5, abs=1e-12)
    frac = vd.ignored_fraction(
        np.array([[10, 10, 20, 20], [41, 10, 20, 20], [43, 10, 20, 20.4]]), [[0, 0, 50, 50]], 200, 200
    )
    np.testing.assert_allclose(frac, [1.0, 0.5, 0.4])


def test_visdrone_score0_ignore():
    gt = make_gt([(1, 1, [10, 10, 20, 20], 0), (1, 1, [100, 100, 20, 20], 1)], CATS10)
    a, b = [x["bbox"] for x in gt["annotations"]]
    # a detection on a score-0 box is ignored (not a FP: that would give AP 0.25), and the
    # toolkit divides recall by all GT of the class including the score-0 one: AP = 0.5
    assert ev.evaluate(gt, [det(1, 1, b, 0.9), det(1, 1, a, 0.8)], "visdrone")["AP"] == pytest.approx(0.5)
    # crowd-like: a box inside the score-0 box matches by intersection / detection area
    m = ev.evaluate(
        gt,
        [det(1, 1, [105, 105, 5, 5], 0.9), det(1, 1, [106, 106, 5, 5], 0.85), det(1, 1, a, 0.8)],
        "visdrone",
    )
    assert m["AP"] == pytest.approx(0.5)


def test_visdrone_class11_boxes_not_evaluated():
    gt = make_gt([(1, 1, [10, 10, 20, 20], 0)], CATS10, others={1: [[100, 100, 20, 20]]})
    a = gt["annotations"][0]["bbox"]
    assert ev.evaluate(gt, [det(1, 1, a, 0.8)], "visdrone")["AP"] == 1.0  # class-11 box is no FN
    # the toolkit evaluates classes 1-10 only: a detection on a class-11 box is a plain FP
    m = ev.evaluate(gt, [det(1, 1, [100, 100, 20, 20], 0.9), det(1, 1, a, 0.8)], "visdrone")
    assert m["AP"] == pytest.approx(0.5)


def test_visdrone_max_dets():
    boxes = [(i, 4, [5 + 12 * (k % 40), 5 + 12 * (k // 40), 8, 8], 0) for i in (1, 2) for k in range(200)]
    gt = make_gt(boxes, CATS10, size=(500, 100))
    dets = [det(a["image_id"], 4, a["bbox"], 1 - a["id"] / 1000) for a in gt["annotations"]]
    m = ev.evaluate(gt, dets, "visdrone")
    assert m["AP"] == 1.0 and m["AR500"] == 1.0
    assert (
        m["AR100"] == pytest.approx(0.5)
        and m["AR10"] == pytest.approx(0.05)
        and m["AR1"] == pytest.approx(0.005)
    )
    # maxDets keeps the first k detections of an image in the given order (saveAnnoRes.m does not sort)
    gt = make_gt([(1, 1, [10, 10, 20, 20], 0)], CATS10)
    tp, fp = det(1, 1, [10, 10, 20, 20], 0.5), det(1, 1, [100, 100, 20, 20], 0.9)
    assert ev.evaluate(gt, [tp, fp], "visdrone")["AR1"] == 1.0
    assert ev.evaluate(gt, [fp, tp], "visdrone")["AR1"] == 0.0


def test_visdrone_warns_about_detections_not_sorted_by_score(caplog):
    gt = make_gt([(1, 1, [10, 10, 20, 20], 0)], CATS10)
    tp, fp = det(1, 1, [10, 10, 20, 20], 0.5), det(1, 1, [100, 100, 20, 20], 0.9)
    with caplog.at_level("WARNING", logger="sodlib.evaluation.visdrone"):
        ev.evaluate(gt, [fp, tp], "visdrone")
    assert not caplog.records
    with caplog.at_level("WARNING", logger="sodlib.evaluation.visdrone"):
        ev.evaluate(gt, [tp, fp], "visdrone")
    assert "the detections of image 1 are not sorted by score" in caplog.text


def test_visdrone_class_mean_weighted_by_images():
    # calcAccuracy.m appends a class once per image holding it: class 1 (2 images, AP 1) and
    # class 2 (1 image, AP 0) average to 2/3, not 1/2
    gt = make_gt(
        [(1, 1, [10, 10, 20, 20], 0), (2, 1, [10, 10, 20, 20], 0), (2, 2, [60, 60, 20, 20], 0)], CATS10
    )
    m, table = ev.evaluate_detailed(
        gt, [det(1, 1, [10, 10, 20, 20], 0.9), det(2, 1, [10, 10, 20, 20], 0.9)], "visdrone"
    )
    assert m["AP"] == pytest.approx(2 / 3)
    assert table["AP"].iloc[:2].tolist() == [1.0, 0.0] and table["AP"].iloc[2:].isna().all()


@pytest.mark.parametrize("protocol", ["coco", "visdrone"])
def test_equal_overlap_tie_goes_to_later_gt(protocol):
    # det A overlaps GT1 and GT2 equally (IoU 90/110); evalRes.m / COCOeval keep the later gt
    # on ties ('<' test), so B (= GT2) must fall back to GT1 at IoU 80/120.
    gt = make_gt([(1, 1, [20, 20, 10, 10], 0), (1, 1, [22, 20, 10, 10], 0)], CATS10)
    dets = [det(1, 1, [21, 20, 10, 10], 0.9), det(1, 1, [22, 20, 10, 10], 0.8)]
    m = ev.evaluate(gt, dets, protocol)
    # thr <= .65: both TP; .70-.80: A TP, B FP; >= .85: A FP, B TP (on GT2, still free).
    # (Keeping the first gt instead would give 7 thresholds with both TP.)
    if protocol == "visdrone":  # VOC all-point AP per threshold: 1, 0.5, 0.25
        want = (4 * 1 + 3 * 0.5 + 3 * 0.25) / 10
    else:  # 101-point: recall 0.5 reached at precision 1 (51 points) or 0.5 (51 points)
        want = (4 * 1 + 3 * 51 / 101 + 3 * 0.5 * 51 / 101) / 10
    assert m["AP"] == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_visdrone_matches_literal_toolkit(seed):
    gt, dets = random_set(seed)
    gt["images"][0]["ignored_boxes_xywh"] = [[3, 3, 10, 10]]
    ref = toolkit_literal(gt, dets)
    m = ev.evaluate(gt, dets, "visdrone")
    assert m == pytest.approx(ref, abs=1e-12)
    # small maxDets so that truncation also bites the AP (unsorted results -> per-k matching)
    md = (1, 3, 8, 20)
    ref = toolkit_literal(gt, dets, md)
    G = ev._GT(gt)
    got, _ = vd.evaluate_visdrone(
        G.images,
        G.cat_ids,
        G.cat_names,
        G.img,
        G.cat,
        G.box,
        G.ignore | G.crowd,
        *ev._parse_detections(dets, G),
        max_dets=md,
    )
    assert got == pytest.approx(ref, abs=1e-12)
    # same data sorted by score per image (the shared-matching fast path)
    dets_sorted = sorted(dets, key=lambda d: (d["image_id"], -d["score"]))
    assert ev.evaluate(gt, dets_sorted, "visdrone") == pytest.approx(
        toolkit_literal(gt, dets_sorted), abs=1e-12
    )


def test_ignored_fraction_matches_pixel_mask():
    rng = np.random.default_rng(0)
    for _ in range(20):
        W, H = int(rng.integers(20, 80)), int(rng.integers(20, 80))
        regs = [
            [
                int(rng.integers(-5, W + 5)),
                int(rng.integers(-5, H + 5)),
                int(rng.integers(0, 40)),
                int(rng.integers(0, 40)),
            ]
            for _ in range(int(rng.integers(1, 4)))
        ]
        boxes = np.c_[rng.uniform(-5, W + 5, (30, 2)), rng.uniform(0, 30, (30, 2))].round(1)
        boxes[:5] = np.floor(boxes[:5]) + 0.5  # exact halves: MATLAB rounds away from zero
        got = vd.ignored_fraction(boxes, regs, H, W) < 0.5
        gt_rows = [r + [0, 0] for r in regs]
        dt_rows = [list(b) + [1.0, 1] for b in boxes]
        _, kept = _drop_literal(gt_rows, dt_rows, H, W)
        assert got.tolist() == [r in kept for r in dt_rows]


@pytest.mark.skipif(not VAL_ANN.is_dir(), reason="real VisDrone val annotations not available")
def test_visdrone_real_annotations():
    files = sorted(VAL_ANN.glob("*.txt"))
    with_regions = [f for f in files[:40] if any(r[5] == 0 for r in _read_visdrone_txt(f))][:4]
    gt = visdrone_gt_from_files(with_regions)
    assert sum(len(im["ignore_regions_xywh"]) for im in gt["images"]) > 0
    dets = [
        det(a["image_id"], a["category_id"], a["bbox"], 1.0) for a in gt["annotations"] if not a["ignore"]
    ]
    m = ev.evaluate(gt, dets, "visdrone")
    assert m["AP"] == 1.0 and m["AP50"] == 1.0 and m["AP75"] == 1.0 and m["AR500"] == 1.0
    # noisy detections on real layouts, some inside the real ignore regions: vectorised == literal port
    rng = np.random.default_rng(0)
    noisy = []
    for d in dets:
        if rng.uniform() < 0.2:
            c = d["category_id"] if rng.uniform() < 0.9 else int(rng.integers(1, 11))
            xy = [v + float(rng.normal(0, 2)) for v in d["bbox"][:2]]
            noisy.append(det(d["image_id"], c, xy + d["bbox"][2:], float(rng.uniform())))
    for im in gt["images"]:
        for x, y, w, h in im["ignore_regions_xywh"]:
            bw, bh = float(rng.uniform(4, 30)), float(rng.uniform(4, 30))
            box = [x + float(rng.uniform(-0.8, 1)) * bw, y + float(rng.uniform(-0.8, 1)) * bh, bw, bh]
            noisy.append(det(im["id"], int(rng.integers(1, 11)), box, float(rng.uniform())))
    assert ev.evaluate(gt, noisy, "visdrone") == pytest.approx(toolkit_literal(gt, noisy), abs=1e-12)


# ----------------------------------------------------------------------------- errors, io
@pytest.mark.parametrize("protocol", ev.PROTOCOLS)
def test_empty_detections(protocol):
    gt = make_gt([(1, 1, [10, 10, 20, 20], 0)], CATS10)
    m = ev.evaluate(gt, [], protocol)
    assert m["AP"] == 0.0 and m["AP50"] == 0.0
    if protocol == "coco":
        assert m["APM"] == -1.0
    if protocol == "sodad":
        assert m["APN"] == -1.0 and m["APeS"] == -1.0 and m["APgS"] == 0.0


def test_bad_inputs(tmp_path):
    gt = make_gt([(1, 1, [10, 10, 20, 20], 0)])
    ok = det(1, 1, [1, 2, 3, 4], 0.5)
    with pytest.raises(ValueError, match=r"detection 1: unknown image_id 7"):
        ev.evaluate(gt, [ok, det(7, 1, [1, 2, 3, 4], 0.5)])
    with pytest.raises(ValueError, match=r"detection 2: unknown category_id 3"):
        ev.evaluate(gt, [ok, ok, det(1, 3, [1, 2, 3, 4], 0.5)], "visdrone")
    with pytest.raises(ValueError, match=r"detection 1: missing key 'score'"):
        ev.evaluate(gt, [ok, {"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}])
    with pytest.raises(ValueError, match=r"detection 0: key 'bbox'"):
        ev.evaluate(gt, [det(1, 1, [1, 2, 3], 0.5)])
    with pytest.raises(ValueError, match=r"detection 1: key 'bbox'"):
        ev.evaluate(gt, [ok, det(1, 1, ["a", 2, 3, 4], 0.5)])
    with pytest.raises(ValueError, match=r"detection 0: key 'score'"):
        ev.evaluate(gt, [det(1, 1, [1, 2, 3, 4], float("nan"))])
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ev.evaluate(missing, [])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ev.evaluate(gt, missing)
    with pytest.raises(ValueError, match="protocol"):
        ev.evaluate(gt, [], "voc")
    with pytest.raises(ValueError, match="backend"):
        ev.evaluate(gt, [], "coco", backend="cuda")


def test_paths_silence_and_outputs(tmp_path, capsys):
    import json

    gt, dets = vd.make_eval_benchmark_set(num_images=4, gt_per_image=10, dets_per_image=20, seed=5)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    m = ev.evaluate(str(tmp_path / "gt.json"), tmp_path / "dt.json", "coco", "pycocotools", per_class=True)
    assert capsys.readouterr().out == ""
    assert m["AP"] == ev.evaluate(gt, dets, "coco", "pycocotools")["AP"] and "AP/car" in m
    metrics, table = ev.evaluate_detailed(gt, dets, "visdrone")
    assert list(table.columns) == ["category_id", "name", "AP", "AP50", "num_gt"]
    assert ev.per_class_ap(gt, dets, "visdrone").equals(table)
    paths = ev.write_metrics(tmp_path / "out", metrics, table)
    back = pd.read_csv(paths["metrics"])
    assert list(back.columns) == ["metric", "value"] and back["value"].tolist() == pytest.approx(
        list(metrics.values())
    )
    assert pd.read_csv(paths["per_class"])["name"].tolist() == table["name"].tolist()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.csv", "per_class.csv"]
    text = ev.format_table(metrics, table)
    assert "AR500" in text and "pedestrian" in text


def test_benchmark_set_deterministic():
    a = vd.make_eval_benchmark_set(num_images=3, seed=7)
    b = ev.make_eval_benchmark_set(num_images=3, seed=7)
    assert a == b
    gt, dets = a
    assert len(gt["images"]) == 3 and len(gt["annotations"]) == 210 and len(dets) == 900
    assert any(x["ignore"] for x in gt["annotations"]) and all(math.isfinite(d["score"]) for d in dets)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("area", -1, "'area' must be a finite number >= 0, got -1"),
        ("area", float("nan"), "'area' must be a finite number >= 0, got nan"),
        ("area", "big", "'area' must be a finite number >= 0, got 'big'"),
        ("iscrowd", 2, "'iscrowd' must be 0 or 1, got 2"),
    ],
)
def test_ground_truth_fields_the_protocols_read_are_checked(tmp_path, field, value, message):
    import json as _json

    from sodlib.evaluation import evaluate

    gt = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "annotations": [
            {
                "id": 7,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 10, 5, 5],
                "area": 25,
                "iscrowd": 0,
                field: value,
            }
        ],
        "categories": [{"id": 1, "name": "car"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(_json.dumps(gt))
    dets = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 5, 5], "score": 0.9}]
    with pytest.raises(ValueError, match=f"gt.json: ground-truth annotation 0 \\(id 7\\): {message}"):
        evaluate(str(path), dets)
    for kind, rec in (("images", {"width": 100, "height": 100}), ("categories", {"name": "car"})):
        bad = {**gt, kind: [rec], "annotations": []}
        with pytest.raises(
            ValueError, match=rf"ground-truth {kind}\[0\]: 'id' must be an integer, got '\(missing\)'"
        ):
            evaluate(bad, [])
    with pytest.raises(ValueError, match=r"images\[0\]: 'id' must be an integer, got 1.5"):
        evaluate({**gt, "images": [{"id": 1.5}], "annotations": []}, [])

"""VisDrone-DET evaluation: a vectorised numpy replica of the official MATLAB toolkit.

Source: github.com/VisDrone/VisDrone2018-DET-toolkit (``evalDET.m``, ``utils/saveAnnoRes.m``,
``utils/dropObjectsInIgr.m``, ``utils/createIntImg.m``, ``utils/calcAccuracy.m``,
``utils/evalRes.m``, ``utils/compOas.m``, ``utils/VOCap.m``); the Python port
github.com/tjiiv-cprg/visdrone-det-toolkit-python (``viseval/``) follows the same code.

The toolkit's AP is NOT COCOeval's, so this module does not use pycocotools. Differences:

* AP is VOC all-point interpolation (``VOCap.m``: area under the monotone precision envelope),
  not COCO's 101-point sampling.
* ``maxDets`` keeps the first k detections *of the image* (all classes together, in the order
  the results list gives them: master ``saveAnnoRes.m`` does not sort), not the top k per class.
* Recall divides by *all* ground truth of the class left after dropping, score-0 (ignore)
  boxes included (``calcAccuracy.m``: ``rec = tp/max(1,numel(gtMatch))``).
* A matched ignore box stops the search at the next ignore box (``evalRes.m``); the outcome for
  the detection (ignored) is the same as COCOeval's.
* The headline mean over classes repeats a class once per image that contains it
  (``calcAccuracy.m``: ``evalClass`` is appended inside the image loop, then
  ``mean2(AP(evalClass,:))``), i.e. it is weighted by the number of images holding the class.
* IoU thresholds are MATLAB's ``0.5:0.05:0.95`` (0.8 is 0.7999999999999999 there).
* Same as COCOeval: per (image, class) detections are matched in descending score order
  (stable), non-ignore gts first, the best free gt with overlap >= thr wins (ties: the later gt),
  and ignore (score-0) boxes match by intersection / detection area (``compOas.m``).
* Before anything, ground truth and detections with >= 50% of their (rounded) area inside the
  ignored regions are removed, measured on an integer pixel mask (``dropObjectsInIgr.m``).

Not part of the toolkit's inputs: class-11 ('others') boxes have no effect (only classes 1-10
are evaluated, ``calcAccuracy.m``: ``for idClass = 1:10``; a detection on such a box is a false
positive). Equal scores in different images rank in ``gt["images"]`` order (the toolkit: file
name order). Where every image's list is already sorted by score the matching is shared by all
maxDets (a prefix of a score-sorted list is a prefix of each greedy pass); otherwise it is redone
per maxDets.

Matching is vectorised over all (image, class) groups and the 10 thresholds at once: step s
processes the s-th detection (score order) of every group; groups are independent.
Results are fractions in [0, 1] (the toolkit prints percentages); -1 where there is no ground truth.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

MAX_DETS = (1, 10, 100, 500)  # calcAccuracy.m: for maxDets = [1 10 100 500]

VISDRONE_CATEGORIES = [
    (1, "pedestrian"),
    (2, "people"),
    (3, "bicycle"),
    (4, "car"),
    (5, "van"),
    (6, "truck"),
    (7, "tricycle"),
    (8, "awning-tricycle"),
    (9, "bus"),
    (10, "motor"),
]


def matlab_colon(a: float, d: float, b: float) -> np.ndarray:
    """MATLAB's ``a:d:b`` (symmetric construction, as MathWorks documents for colon)."""
    n = int(np.floor((b - a) / d + 1e-10))
    out = np.empty(n + 1)
    for k in range(n // 2 + 1):
        out[k] = a + k * d
        out[n - k] = b - k * d
    if n % 2 == 0:
        out[n // 2] = (a + b) / 2
    return out


IOU_THRS = matlab_colon(0.5, 0.05, 0.95)  # calcAccuracy.m: for thr = 0.5:0.05:0.95


def matlab_round(x: np.ndarray) -> np.ndarray:
    """MATLAB ``round``: halves away from zero (numpy rounds halves to even)."""
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    r = np.floor(a)
    return np.sign(x) * (r + (a - r >= 0.5))  # exact, unlike floor(a + 0.5)


def ignored_fraction(boxes_xywh: np.ndarray, regions_xywh: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fraction ``igrVal/(h*w)`` that ``dropObjectsInIgr.m`` computes for each box.

    The toolkit paints each region into an integer mask (rows ``y:min(H,y+h)``, columns
    ``x:min(W,x+w)``, 1-based and inclusive, after ``max(1, .)``) and reads it through an
    integral image at the rounded box corners. Here the same counts come from a
    coordinate-compressed integral image (exact integers, no H x W mask).
    """
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    regs = np.maximum(1, matlab_round(np.asarray(regions_xywh, dtype=np.float64).reshape(-1, 4))).astype(
        np.int64
    )
    # dropObjectsInIgr.m: igrMap(y:min(H,y+h), x:min(W,x+w)) = 1, 1-based inclusive
    r0, r1 = regs[:, 1], np.minimum(height, regs[:, 1] + regs[:, 3])
    c0, c1 = regs[:, 0], np.minimum(width, regs[:, 0] + regs[:, 2])
    ok = (r1 >= r0) & (c1 >= c0) & (r0 <= height) & (c0 <= width)
    r0, r1, c0, c1 = r0[ok], r1[ok], c0[ok], c1[ok]
    # dropObjectsInIgr.m: pos = max(1,round(box)); x = max(1,min(W,pos(1))); w = pos(3)
    pos = np.maximum(1, matlab_round(boxes)).astype(np.int64)
    x = np.clip(pos[:, 0], 1, width)
    y = np.clip(pos[:, 1], 1, height)
    w, h = pos[:, 2], pos[:, 3]
    xr = np.minimum(width, x + w)
    yb = np.clip(y + h, 1, height)
    if len(r0) == 0:
        return np.zeros(len(boxes))
    # cell boundaries: a cell (b_k, b_{k+1}] is entirely in or out of every region
    ry = np.unique(np.concatenate([[0, height], r0 - 1, r1]))
    cx = np.unique(np.concatenate([[0, width], c0 - 1, c1]))
    ymid, xmid = ry[1:], cx[1:]  # last pixel of each cell
    cover = (
        (
            (ymid[:, None, None] >= r0)
            & (ymid[:, None, None] <= r1)
            & (xmid[None, :, None] >= c0)
            & (xmid[None, :, None] <= c1)
        )
        .any(-1)
        .astype(np.int64)
    )

    def integral(rr, cc):  # createIntImg.m value at (rr, cc), 1-based: mask sum over [1..rr] x [1..cc]
        ly = np.clip(rr[:, None] - ry[None, :-1], 0, np.diff(ry)[None, :])
        lx = np.clip(cc[:, None] - cx[None, :-1], 0, np.diff(cx)[None, :])
        return np.einsum("qk,kl,ql->q", ly, cover, lx)

    # dropObjectsInIgr.m: igrVal = tl + br - tr - bl; kept if igrVal/(h*w) < 0.5
    tl, br, tr, bl = integral(np.concatenate([y, yb, y, yb]), np.concatenate([x, xr, xr, x])).reshape(4, -1)
    return (tl + br - tr - bl) / (h * w)


def _comp_oas(dt: np.ndarray, gt: np.ndarray, ig: np.ndarray) -> np.ndarray:
    """compOas.m for paired rows: IoU, or intersection/area(dt) where the gt is ignore."""
    w = np.minimum(dt[:, 0] + dt[:, 2], gt[:, 0] + gt[:, 2]) - np.maximum(dt[:, 0], gt[:, 0])
    h = np.minimum(dt[:, 1] + dt[:, 3], gt[:, 1] + gt[:, 3]) - np.maximum(dt[:, 1], gt[:, 1])
    t = w * h
    da = dt[:, 2] * dt[:, 3]
    u = np.where(ig, da, da + gt[:, 2] * gt[:, 3] - t)
    with np.errstate(divide="ignore", invalid="ignore"):
        oa = t / u
    return np.where((w > 0) & (h > 0), oa, 0.0)  # compOas.m: w<=0 or h<=0 -> 0


def _candidates(d_key, d_box, g_key, g_box, g_ign, n_keys, min_thr, chunk=2_000_000):
    """All (det, gt) pairs of the same (image, class) group with overlap >= min_thr.

    Returns padded [n_det, K] arrays (gt index, overlap, ignore flag) sorted by gt index;
    padding has index len(g_key) and overlap -1."""
    n_det, n_gt = len(d_key), len(g_key)
    g_order = np.argsort(g_key, kind="stable")  # gts in annotation order inside a group
    g_start = np.searchsorted(g_key[g_order], np.arange(n_keys))
    g_count = np.bincount(g_key, minlength=n_keys)
    cnt = g_count[d_key]
    ends = np.cumsum(cnt)
    pd_, pg_, po_ = [], [], []
    lo = 0
    while lo < n_det:  # chunk the pair expansion to bound memory
        hi = int(np.searchsorted(ends, (ends[lo - 1] if lo else 0) + chunk, side="right"))
        hi = max(hi, lo + 1)
        c = cnt[lo:hi]
        di = np.repeat(np.arange(lo, hi), c)
        first = np.repeat(np.cumsum(c) - c, c)
        gi = g_order[np.repeat(g_start[d_key[lo:hi]], c) + np.arange(len(di)) - first]
        oa = _comp_oas(d_box[di], g_box[gi], g_ign[gi])
        keep = oa >= min_thr
        pd_.append(di[keep])
        pg_.append(gi[keep])
        po_.append(oa[keep])
        lo = hi
    di = np.concatenate(pd_) if pd_ else np.zeros(0, np.int64)
    gi = np.concatenate(pg_) if pg_ else np.zeros(0, np.int64)
    oa = np.concatenate(po_) if po_ else np.zeros(0)
    o = np.lexsort((gi, di))
    di, gi, oa = di[o], gi[o], oa[o]
    per = np.bincount(di, minlength=n_det)
    k = max(1, int(per.max()) if len(per) else 1)
    slot = np.arange(len(di)) - np.repeat(np.cumsum(per) - per, per)
    cg = np.full((n_det, k), n_gt, np.int64)
    co = np.full((n_det, k), -1.0)
    cg[di, slot], co[di, slot] = gi, oa
    return cg, co, np.append(g_ign, False)[cg]


def _match(subset, d_key, d_score, d_pos, cand_g, cand_o, cand_i, n_gt, thrs):
    """Greedy matching of evalRes.m for the detections in ``subset`` at every threshold.

    Returns int8 [T, len(subset)]: 1 matched, 0 false positive, -1 matched to an ignore box."""
    T, n = len(thrs), len(subset)
    out = np.zeros((T, n), np.int8)
    if n == 0:
        return out
    # evalRes.m: dets of a group sorted by score, descending, stable (MATLAB sort)
    order = np.lexsort((d_pos[subset], -d_score[subset], d_key[subset]))
    keys = d_key[subset][order]
    first = np.r_[True, keys[1:] != keys[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    rank = np.arange(n) - start
    by_rank = order[np.argsort(rank, kind="stable")]
    bounds = np.r_[0, np.cumsum(np.bincount(rank))]
    matched = np.zeros((T, n_gt + 1), bool)  # evalRes.m: gt(g,5)==1 once matched
    thr = np.asarray(thrs)[:, None, None]
    for s in range(len(bounds) - 1):
        loc = by_rank[bounds[s] : bounds[s + 1]]
        sel = subset[loc]
        g, o, ig = cand_g[sel], cand_o[sel], cand_i[sel]
        ok = o[None] >= thr  # evalRes.m: if(oa(d,g)<bstOa) continue; (bstOa starts at thr)
        elig = ok & ~ig[None] & ~matched[:, g]
        # best overlap among free non-ignore gts; ties go to the later gt (the '<' test)
        sc = np.where(elig, o[None], -np.inf)[:, :, ::-1]
        best = g.shape[1] - 1 - sc.argmax(-1)
        hit = elig.any(-1)
        tt, nn = np.nonzero(hit)
        matched[tt, g[nn, best[tt, nn]]] = True
        # evalRes.m: else first ignore gt with oa >= thr -> match type -1
        out[:, loc] = np.where(hit, 1, np.where((ok & ig[None]).any(-1), -1, 0))
    return out


def voc_ap(rec: np.ndarray, prec: np.ndarray) -> np.ndarray:
    """VOCap.m along the last axis: mrec=[0;rec;1], mpre=[0;prec;0], envelope, sum at changes."""
    rec, prec = np.atleast_2d(rec), np.atleast_2d(prec)
    z, o = np.zeros((rec.shape[0], 1)), np.ones((rec.shape[0], 1))
    mrec = np.concatenate([z, rec, o], 1)
    mpre = np.maximum.accumulate(np.concatenate([z, prec, z], 1)[:, ::-1], axis=1)[:, ::-1]
    d = mrec[:, 1:] - mrec[:, :-1]
    return np.where(d != 0, d * mpre[:, 1:], 0.0).sum(1)


def evaluate_visdrone(
    images, cat_ids, cat_names, g_img, g_cat, g_box, g_ign, d_img, d_cat, d_box, d_score, max_dets=MAX_DETS
):
    """Toolkit metrics from parsed arrays.

    ``images``: list of image dicts (``width``, ``height``, optional ``ignore_regions_xywh``);
    ``g_img``/``d_img`` index into it; ``g_cat``/``d_cat`` index into ``cat_ids``;
    ``g_ign``: score-0 / crowd / ignore flag; detections in results-list order.
    Returns (metrics dict, per-class DataFrame)."""
    n_img, C = len(images), len(cat_ids)
    keep_g, keep_d = _outside_ignore_regions(images, g_img, g_box, d_img, d_box)
    gk = np.nonzero(keep_g)[0]
    g_img, g_cat, g_box, g_ign = g_img[gk], g_cat[gk], g_box[gk], g_ign[gk]
    dk = np.nonzero(keep_d)[0]  # results-list order is kept
    d_img, d_cat, d_box, d_score = d_img[dk], d_cat[dk], d_box[dk], d_score[dk]
    # position of each kept detection inside its image, in results-list order
    o = np.argsort(d_img, kind="stable")
    pos = np.empty(len(d_img), np.int64)
    pos[o] = np.arange(len(o)) - np.searchsorted(d_img[o], d_img[o])
    top = pos < max(max_dets)  # calcAccuracy.m: det(1:min(size(det,1),maxDets), :)
    _warn_unsorted(images, d_img, d_score, pos, max_dets)
    dk = np.nonzero(top)[0]
    d_img, d_cat, d_box, d_score, pos = d_img[dk], d_cat[dk], d_box[dk], d_score[dk], pos[dk]
    d_key, g_key = d_img * C + d_cat, g_img * C + g_cat
    cand = _candidates(d_key, d_box, g_key, g_box, g_ign, n_img * C, IOU_THRS.min())
    match_args = (d_key, d_score, pos, *cand, len(g_key), IOU_THRS)
    types = _match(np.arange(len(d_key)), *match_args)
    n_gt = np.bincount(g_cat, minlength=C)
    ar = _recalls(types, match_args, d_img, d_cat, d_score, pos, n_gt, C, max_dets)
    ap = _precisions(types, d_img, d_cat, d_score, pos, n_gt, C)
    # calcAccuracy.m: evalClass gets the class once per image holding it (weights of mean2)
    weight = np.bincount(np.unique(g_key) % C, minlength=C) if len(g_key) else np.zeros(C, np.int64)
    return _summary(ap, ar, weight, n_gt, cat_ids, cat_names, max_dets)


def _outside_ignore_regions(images, g_img, g_box, d_img, d_box) -> tuple[np.ndarray, np.ndarray]:
    """dropObjectsInIgr.m, per image: keep flags of the ground-truth boxes and detections that lie less
    than half inside the image's ignore regions."""
    n_img = len(images)
    keep_g = np.ones(len(g_img), bool)
    keep_d = np.ones(len(d_img), bool)
    g_by = np.argsort(g_img, kind="stable")
    d_by = np.argsort(d_img, kind="stable")
    g_lo = np.searchsorted(g_img[g_by], np.arange(n_img + 1))
    d_lo = np.searchsorted(d_img[d_by], np.arange(n_img + 1))
    for i, im in enumerate(images):
        regions = im.get("ignore_regions_xywh") or []
        if len(regions) == 0:
            continue
        if "height" not in im or "width" not in im:
            raise ValueError(f"image {im.get('id')!r} has ignore regions but no width/height")
        H, W = int(im["height"]), int(im["width"])
        gi, di = g_by[g_lo[i] : g_lo[i + 1]], d_by[d_lo[i] : d_lo[i + 1]]
        frac = ignored_fraction(np.concatenate([g_box[gi], d_box[di]]), regions, H, W)
        keep_g[gi] = frac[: len(gi)] < 0.5
        keep_d[di] = frac[len(gi) :] < 0.5
    return keep_g, keep_d


def _warn_unsorted(images, d_img, d_score, pos, max_dets) -> None:
    """maxDets cuts follow list order: say so when an image's detections are not sorted by score."""
    order = np.lexsort((pos, d_img))
    unsorted = (d_img[order][1:] == d_img[order][:-1]) & (d_score[order][1:] > d_score[order][:-1])
    if unsorted.any():
        logger.warning(
            "VisDrone protocol: maxDets (%s) keeps each image's first detections in list order, as the "
            "toolkit does, and the detections of image %r are not sorted by score: sort each image's "
            "detections by descending score, or AR and AP count the wrong ones",
            "/".join(map(str, max_dets)),
            images[int(d_img[order][1:][unsorted][0])].get("id"),
        )


def _recalls(types, match_args, d_img, d_cat, d_score, pos, n_gt, C: int, max_dets) -> np.ndarray:
    """AR = max(rec) per class, IoU threshold and maxDets: [C, T, len(max_dets)]. ``types``: the matches
    with the largest maxDets; a smaller maxDets matches its detections again unless the lists are sorted
    by score."""
    allidx = np.arange(len(d_cat))
    # a prefix of a score-sorted list is a prefix of every group's greedy order
    o = np.lexsort((pos, d_img))
    sorted_ok = bool(np.all((d_img[o][1:] != d_img[o][:-1]) | (d_score[o][1:] <= d_score[o][:-1])))
    T = len(IOU_THRS)
    ar = np.zeros((C, T, len(max_dets)))
    for y, k in enumerate(max_dets):
        if k >= max(max_dets):
            t_k, in_k = types, allidx
        elif sorted_ok:
            in_k = np.nonzero(pos < k)[0]
            t_k = types[:, in_k]
        else:
            in_k = np.nonzero(pos < k)[0]
            t_k = _match(in_k, *match_args)
        tp_k = np.stack([np.bincount(d_cat[in_k], weights=t_k[t] == 1, minlength=C) for t in range(T)], 1)
        ar[:, :, y] = tp_k / np.maximum(1, n_gt)[:, None]
    return ar


def _precisions(types, d_img, d_cat, d_score, pos, n_gt, C: int) -> np.ndarray:
    """AP per class and IoU threshold with the largest maxDets, [C, T] (calcAccuracy.m keeps the last
    rec/tp)."""
    ap = np.zeros((C, len(IOU_THRS)))
    for c in range(C):
        sel = np.nonzero(d_cat == c)[0]
        # calcAccuracy.m: [~,idrank] = sort(-score) over dets concatenated image by image
        sel = sel[np.lexsort((pos[sel], d_img[sel], -d_score[sel]))]
        t = types[:, sel]
        tp = np.cumsum(t == 1, 1)
        fp = np.cumsum(t == 0, 1)
        rec = tp / max(1, n_gt[c])
        prec = tp / np.maximum(1, tp + fp)
        ap[c] = voc_ap(rec, prec)
    return ap


def _summary(ap, ar, weight, n_gt, cat_ids, cat_names, max_dets) -> tuple[dict, pd.DataFrame]:
    """The metrics (class means weighted as the toolkit's mean2) and the per-class table."""
    C = len(cat_ids)
    w = weight.astype(np.float64)
    has = w > 0

    def wmean(v):  # mean2(X(evalClass, ...))
        return float((v.reshape(C, -1).mean(1) * w).sum() / w.sum()) if has.any() else -1.0

    metrics = {"AP": wmean(ap), "AP50": wmean(ap[:, 0]), "AP75": wmean(ap[:, 5])}
    for y, k in enumerate(max_dets):
        metrics[f"AR{k}"] = wmean(ar[:, :, y])
    per_class = pd.DataFrame(
        {
            "category_id": list(cat_ids),
            "name": list(cat_names),
            "AP": np.where(has, ap.mean(1), np.nan),
            "AP50": np.where(has, ap[:, 0], np.nan),
            "num_gt": n_gt.astype(np.int64),
        }
    )
    return metrics, per_class


def make_eval_benchmark_set(
    num_images: int = 548, gt_per_image: int = 70, dets_per_image: int = 300, seed: int = 0
) -> tuple[dict, list[dict]]:
    """A deterministic VisDrone-like evaluation set: (COCO gt dict, COCO results list).

    Image sizes of VisDrone val (1920x1080, 1360x765, 960x540); long-tailed box sizes (median
    side ~20 px); VisDrone class frequencies; about 2.5 ignore regions, 5% score-0 boxes and a
    few class-11 boxes per image, encoded as ``sodlib.data.formats.visdrone_to_coco`` does.
    Detections: jittered copies of most ground-truth boxes plus false positives (some inside
    ignore regions), ``dets_per_image`` per image, each image's list sorted by score."""
    rng = np.random.default_rng(seed)
    freq = np.array([8844, 5125, 1287, 14064, 1975, 750, 1045, 532, 251, 4886], float)
    freq /= freq.sum()
    sizes = [(1920, 1080), (1360, 765), (960, 540)]
    images, anns, dets = [], [], []
    for i in range(num_images):
        W, H = sizes[rng.choice(3, p=[0.5, 0.3, 0.2])]
        n_reg = int(rng.poisson(2.5))
        regs = _rand_boxes(rng, n_reg, W, H, med=150.0).astype(int).tolist()
        n11 = int(rng.integers(0, 2))
        others = _rand_boxes(rng, n11, W, H).astype(int).tolist()
        g = _rand_boxes(rng, gt_per_image, W, H)
        gc = rng.choice(10, gt_per_image, p=freq) + 1
        gi = rng.uniform(size=gt_per_image) < 0.05  # score-0 boxes
        images.append(
            {
                "id": i + 1,
                "file_name": f"{i + 1:07d}.jpg",
                "width": W,
                "height": H,
                "ignore_regions_xywh": regs,
                "ignored_boxes_xywh": others,
            }
        )
        for b, c, ig in zip(g.astype(int).tolist(), gc.tolist(), gi.tolist()):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": c,
                    "bbox": b,
                    "area": float(b[2] * b[3]),
                    "iscrowd": int(ig),
                    "ignore": int(ig),
                }
            )
        b, c, s = _benchmark_detections(rng, g, gc, regs, W, H, freq, dets_per_image)
        for bb, cc, ss in zip(b.tolist(), c.tolist(), s.tolist()):
            dets.append({"image_id": i + 1, "category_id": cc, "bbox": bb, "score": ss})
    cats = [{"id": k, "name": n} for k, n in VISDRONE_CATEGORIES]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def _rand_boxes(rng: np.random.Generator, n: int, W: int, H: int, med: float = 20.0) -> np.ndarray:
    """``n`` random xywh boxes inside a W x H image, log-normal sides around ``med`` px."""
    side = np.exp(rng.normal(np.log(med), 0.6, n))
    ar = np.exp(rng.normal(0.0, 0.35, n))
    w = np.clip(np.round(side * np.sqrt(ar)), 2, W // 4)
    h = np.clip(np.round(side / np.sqrt(ar)), 2, H // 4)
    x = np.floor(rng.uniform(0, 1, n) * (W - w))
    y = np.floor(rng.uniform(0, 1, n) * (H - h))
    return np.stack([x, y, w, h], 1)


def _benchmark_detections(
    rng: np.random.Generator, g, gc, regs: list, W: int, H: int, freq, dets_per_image: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's detections (boxes rounded to 0.01 px, categories, scores), sorted by score: jittered
    copies of most ground-truth boxes ``g`` (categories ``gc``) plus false positives, a share of them
    inside the ignore regions ``regs``."""
    hit = rng.uniform(size=len(g)) < 0.85
    tb = g[hit].copy()
    jit = rng.normal(0, 0.08, tb.shape) * tb[:, [2, 3, 2, 3]]
    tb[:, :2] += jit[:, :2]
    tb[:, 2:] *= np.exp(jit[:, 2:] / tb[:, 2:])
    tc = np.where(rng.uniform(size=len(tb)) < 0.9, gc[hit], rng.integers(1, 11, len(tb)))
    ts = rng.beta(5, 2, len(tb))
    n_fp = max(0, dets_per_image - len(tb))
    fb = _rand_boxes(rng, n_fp, W, H)
    if regs and n_fp:  # a share of false positives inside ignore regions
        m = rng.uniform(size=n_fp) < 0.1
        r = np.array(regs, float)[rng.integers(0, len(regs), n_fp)]
        fb[m, 0] = r[m, 0] + rng.uniform(0, 1, m.sum()) * np.maximum(r[m, 2] - fb[m, 2], 0)
        fb[m, 1] = r[m, 1] + rng.uniform(0, 1, m.sum()) * np.maximum(r[m, 3] - fb[m, 3], 0)
    fc = rng.choice(10, n_fp, p=freq) + 1
    fs = rng.beta(1.5, 6, n_fp)
    b = np.concatenate([tb, fb])
    b[:, 0] = np.clip(b[:, 0], 0, W - 1)
    b[:, 1] = np.clip(b[:, 1], 0, H - 1)
    b[:, 2] = np.minimum(b[:, 2], W - b[:, 0])
    b[:, 3] = np.minimum(b[:, 3], H - b[:, 1])
    s = np.round(np.concatenate([ts, fs]), 4)
    c = np.concatenate([tc, fc])
    o = np.argsort(-s, kind="stable")[:dets_per_image]
    return np.round(b[o], 2), c[o], s[o]

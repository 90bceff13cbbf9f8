"""Detection evaluation: COCO, SODA-D and VisDrone-DET protocols.

``evaluate(gt, detections, protocol)`` takes a COCO ground-truth dict (or json path) and a COCO
results list (or json path) and returns fractions in [0, 1], -1 where a range has no ground truth.

* ``coco``: plain pycocotools ``COCOeval`` (bbox), AP/AP50/AP75/APS/APM/APL at maxDets 100;
  crowd handling is pycocotools' own (``ignore`` := ``iscrowd``).
* ``sodad``: the official SODA-D evaluator, ``SODADeval`` (github.com/shaunyuan22/CFINet
  ``mmdet/datasets/sodad_eval/sodadeval.py``, used by ``mmdet/datasets/sodad.py``), which is
  COCOeval with these changes:
  - areaRng Small [0,32²], eS [0,12²], rS [12²,20²], gS [20²,32²], Normal [32²,40·50]
    (``SODADParams.setDetParams``); bounds inclusive as in COCOeval;
  - maxDets (100, 300, 1000): matching runs with 1000, every reported AP uses maxDets[0] = 100
    (``_summarizeDets``: ``maxDets=self.params.maxDets[0]``); headline AP/AP50/AP75 on Small;
  - the ``ignore`` key of an annotation is the ignore flag (``_prepare``; pycocotools would
    overwrite it with ``iscrowd``), and every ground truth is treated as non-crowd
    (``iscrowd = [0 for o in gt]``): plain IoU, an ignore box absorbs at most one detection;
  - only the foreground categories are evaluated (``sodad.py``: ``catIds`` from ``CLASSES``,
    without 'ignore'): a category named "ignore" (SODA-D's id 10) is left out entirely;
  - the per-class table uses area Small and maxDets 1000 (``sodad.py``: ``precisions[:, :, idx, 0, -1]``).
* ``visdrone``: the official VisDrone-DET toolkit, replicated in :mod:`sodlib.evaluation.visdrone`
  (its AP differs from COCOeval; see there). Ground truth as ``sodlib.data.formats.visdrone_to_coco``
  writes it: ``ignore``/``iscrowd`` annotations are the score-0 boxes, ``image["ignore_regions_xywh"]``
  the ignored regions; ``image["ignored_boxes_xywh"]`` (class 11) has no effect, as in the toolkit
  (it only evaluates classes 1-10). ``backend`` does not apply.

Backends for coco/sodad: ``pycocotools`` (reference) and ``faster`` (faster-coco-eval's C++
``COCOeval_faster``, same matching/accumulation; its ``_prepare`` is patched the same way for
SODA-D's ignore flags). ``auto`` takes faster-coco-eval when it is installed; the tests assert the
two agree to 1e-9. Ground-truth annotation ids are renumbered 1..N internally (pycocotools treats
id 0 as "unmatched").
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from sodlib.evaluation.visdrone import evaluate_visdrone, make_eval_benchmark_set  # noqa: F401
from sodlib.io import atomic_write_text, read_json

PROTOCOLS = ("coco", "sodad", "visdrone")
BACKENDS = ("auto", "pycocotools", "faster")
METRIC_KEYS = {
    "coco": ("AP", "AP50", "AP75", "APS", "APM", "APL"),
    "sodad": ("AP", "AP50", "AP75", "APeS", "APrS", "APgS", "APN"),
    "visdrone": ("AP", "AP50", "AP75", "AR1", "AR10", "AR100", "AR500"),
}
COCO_AREAS = ([[0, 1e5**2], [0, 32**2], [32**2, 96**2], [96**2, 1e5**2]], ["all", "small", "medium", "large"])
# sodadeval.py SODADParams.setDetParams: areaRng / areaRngLbl / maxDets
SODAD_AREAS = (
    [[0, 32**2], [0, 12**2], [12**2, 20**2], [20**2, 32**2], [32**2, 40 * 50]],
    ["Small", "eS", "rS", "gS", "Normal"],
)
SODAD_MAX_DETS = [100, 300, 1000]
PER_CLASS_COLUMNS = ["category_id", "name", "AP", "AP50", "num_gt"]


# ----------------------------------------------------------------------------- inputs
def _load_json(obj, what: str):
    if isinstance(obj, (str, os.PathLike)):
        return read_json(obj, what)
    return obj


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _box_ok(b) -> bool:
    return (
        isinstance(b, (list, tuple, np.ndarray))
        and len(b) == 4
        and all(_is_num(v) and math.isfinite(v) for v in b)
        and b[2] >= 0
        and b[3] >= 0
    )


def _as_int(v):
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v)
    if _is_num(v) and float(v).is_integer():
        return int(v)
    return None


class _GT:
    """Validated ground truth as arrays (annotation order kept)."""

    def __init__(self, gt):
        src = f"{gt}: " if isinstance(gt, (str, os.PathLike)) else ""
        gt = _load_json(gt, "ground-truth")
        if not isinstance(gt, Mapping) or not all(k in gt for k in ("images", "annotations", "categories")):
            raise ValueError(
                f"{src}ground truth must be a COCO dict with 'images', 'annotations' and 'categories'"
            )
        self.images = list(gt["images"])
        for kind in ("images", "categories"):  # every id the protocols read is an integer
            for i, rec in enumerate(gt[kind]):
                if not isinstance(rec, Mapping) or _as_int(rec.get("id")) is None:
                    got = rec.get("id", "(missing)") if isinstance(rec, Mapping) else rec
                    raise ValueError(f"{src}ground-truth {kind}[{i}]: 'id' must be an integer, got {got!r}")
        self.img_ids = [int(im["id"]) for im in self.images]
        if len(set(self.img_ids)) != len(self.img_ids):
            raise ValueError(f"{src}ground truth has duplicate image ids")
        self.img_index = {k: i for i, k in enumerate(self.img_ids)}
        cats = sorted(gt["categories"], key=lambda c: int(c["id"]))
        self.cat_ids = [int(c["id"]) for c in cats]
        self.cat_names = [str(c.get("name", c["id"])) for c in cats]
        self.cat_index = {k: i for i, k in enumerate(self.cat_ids)}
        anns = gt["annotations"]
        n = len(anns)
        try:  # fast path; anything irregular is located by the per-annotation check below
            img = [self.img_index[a["image_id"]] for a in anns]
            cat = [self.cat_index[a["category_id"]] for a in anns]
            box = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(n, 4)
            fast = bool(np.isfinite(box).all() and (box[:, 2:] >= 0).all())
        except (KeyError, TypeError, ValueError):
            fast = False
        if not fast:
            for j, a in enumerate(anns):
                for key in ("image_id", "category_id", "bbox"):
                    if key not in a:
                        raise ValueError(f"ground-truth annotation {j}: missing key {key!r}")
                if not _box_ok(a["bbox"]):
                    raise ValueError(
                        f"ground-truth annotation {j}: 'bbox' must be 4 finite numbers "
                        f"[x, y, w, h] with w, h >= 0, got {a['bbox']!r}"
                    )
                if a["image_id"] not in self.img_index or a["category_id"] not in self.cat_index:
                    raise ValueError(
                        f"ground-truth annotation {j}: unknown image_id {a['image_id']!r} "
                        f"or category_id {a['category_id']!r}"
                    )
            raise ValueError("ground truth annotations are malformed")
        self.img, self.cat = np.asarray(img, np.int64).reshape(n), np.asarray(cat, np.int64).reshape(n)
        self.box = box
        for j, a in enumerate(
            anns
        ):  # the size ranges read the area: a negative, NaN or text one would skew them
            if "area" in a and not (_is_num(a["area"]) and math.isfinite(a["area"]) and a["area"] >= 0):
                raise ValueError(
                    f"{src}ground-truth annotation {j} (id {a.get('id', '?')!r}): 'area' must be a "
                    f"finite number >= 0, got {a['area']!r}"
                )
            if _as_int(a.get("iscrowd", 0)) not in (0, 1):
                raise ValueError(
                    f"{src}ground-truth annotation {j} (id {a.get('id', '?')!r}): 'iscrowd' must be "
                    f"0 or 1, got {a['iscrowd']!r}"
                )
        self.area = np.asarray(
            [a["area"] if "area" in a else a["bbox"][2] * a["bbox"][3] for a in anns], dtype=np.float64
        ).reshape(n)
        self.crowd = np.asarray([bool(a.get("iscrowd", 0)) for a in anns], bool).reshape(n)
        self.ignore = np.asarray([bool(a.get("ignore", 0)) for a in anns], bool).reshape(n)


def _parse_detections(dets, G: _GT):
    """Detections -> (image index, category index, xywh boxes, scores) in list order."""
    dets = _load_json(dets, "detections")
    if not isinstance(dets, (list, tuple)):
        raise ValueError(f"detections must be a list of COCO results, got {type(dets).__name__}")  # noqa: TRY004
    n = len(dets)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0)
    try:  # fast path; any irregularity falls through to the per-entry check below
        img = np.asarray([d["image_id"] for d in dets])
        cat = np.asarray([d["category_id"] for d in dets])
        box = np.asarray([d["bbox"] for d in dets])
        score = np.asarray([d["score"] for d in dets])
        fast = (
            box.shape == (n, 4)
            and box.dtype.kind in "iuf"
            and score.shape == (n,)
            and score.dtype.kind in "iuf"
            and img.dtype.kind in "iu"
            and cat.dtype.kind in "iu"
            and bool(np.isfinite(box).all() and np.isfinite(score).all() and (box[:, 2:] >= 0).all())
        )
    except (KeyError, TypeError, ValueError, IndexError):
        fast = False
    if not fast:
        for i, d in enumerate(dets):
            if not isinstance(d, Mapping):
                raise ValueError(f"detection {i}: expected a dict, got {type(d).__name__}")  # noqa: TRY004
            for key in ("image_id", "category_id", "bbox", "score"):
                if key not in d:
                    raise ValueError(f"detection {i}: missing key {key!r}")
            if not _box_ok(d["bbox"]):
                raise ValueError(
                    f"detection {i}: key 'bbox' must be 4 finite numbers [x, y, w, h] "
                    f"with w, h >= 0, got {d['bbox']!r}"
                )
            if not (_is_num(d["score"]) and math.isfinite(d["score"])):
                raise ValueError(f"detection {i}: key 'score' must be a finite number, got {d['score']!r}")
            for key in ("image_id", "category_id"):
                if _as_int(d[key]) is None:
                    raise ValueError(f"detection {i}: key {key!r} must be an integer id, got {d[key]!r}")
        img = np.asarray([_as_int(d["image_id"]) for d in dets])
        cat = np.asarray([_as_int(d["category_id"]) for d in dets])
        box = np.asarray([[float(v) for v in d["bbox"]] for d in dets])
        score = np.asarray([float(d["score"]) for d in dets])
    out = []
    for arr, known, key in ((img, G.img_ids, "image_id"), (cat, G.cat_ids, "category_id")):
        ref = np.asarray(sorted(known), dtype=np.int64)
        k = np.clip(np.searchsorted(ref, arr), 0, max(len(ref) - 1, 0))
        bad = np.nonzero((ref[k] != arr) if len(ref) else np.ones(n, bool))[0]
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"detection {i}: unknown {key} {int(arr[i])} (not in the ground truth)")
        out.append(k)
    # map sorted position -> index in G's order
    img_idx = np.asarray([G.img_index[v] for v in sorted(G.img_ids)], np.int64)[out[0]]
    cat_idx = np.asarray([G.cat_index[v] for v in sorted(G.cat_ids)], np.int64)[out[1]]
    return img_idx, cat_idx, box.astype(np.float64), score.astype(np.float64)


# ----------------------------------------------------------------------------- COCOeval path
def _faster_available() -> bool:
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(protocol: str, backend: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if protocol == "visdrone":
        return "toolkit"
    if backend == "auto":
        return "faster" if _faster_available() else "pycocotools"
    if backend == "faster" and not _faster_available():
        raise ImportError("backend='faster' needs the faster-coco-eval package")
    return backend


def _datasets(G: _GT, D, protocol: str):
    images = [
        {"id": G.img_ids[i], "width": im.get("width", 0), "height": im.get("height", 0)}
        for i, im in enumerate(G.images)
    ]
    cats = [{"id": c, "name": n} for c, n in zip(G.cat_ids, G.cat_names)]
    gi, gc = np.asarray(G.img_ids)[G.img].tolist(), np.asarray(G.cat_ids)[G.cat].tolist()
    anns = []
    for j, (b, a) in enumerate(zip(G.box.tolist(), G.area.tolist())):
        ann = {"id": j + 1, "image_id": gi[j], "category_id": gc[j], "bbox": b, "area": a}
        if protocol == "sodad":  # sodadeval.py: iscrowd forced 0, ignore from the 'ignore' key
            ann["iscrowd"], ann["ignore"] = 0, int(G.ignore[j])
            ann["_sod_ignore"] = int(G.ignore[j])
        else:
            ann["iscrowd"] = int(G.crowd[j])
        anns.append(ann)
    di, dc, db, ds = D
    di, dc = np.asarray(G.img_ids)[di].tolist(), np.asarray(G.cat_ids)[dc].tolist()
    dts = [
        {
            "id": i + 1,
            "image_id": di[i],
            "category_id": dc[i],
            "bbox": b,
            "score": s,
            "area": b[2] * b[3],
            "iscrowd": 0,
        }  # as COCO.loadRes sets them for bbox results
        for i, (b, s) in enumerate(zip(db.tolist(), ds.tolist()))
    ]
    return (
        {"images": images, "annotations": anns, "categories": cats},
        {"images": images, "annotations": dts, "categories": cats},
    )


def _restore_ignore(anns):
    for a in anns:
        if "_sod_ignore" in a:
            a["ignore"] = a["_sod_ignore"]


def _run_cocoeval(gtd: dict, dtd: dict, protocol: str, engine: str, cat_ids: list[int]):
    areas, labels = SODAD_AREAS if protocol == "sodad" else COCO_AREAS
    max_dets = SODAD_MAX_DETS if protocol == "sodad" else [1, 10, 100]
    with contextlib.redirect_stdout(io.StringIO()):
        if engine == "faster":
            from faster_coco_eval import COCO, COCOeval_faster

            class _Eval(COCOeval_faster):
                def _prepare(self):
                    super()._prepare()
                    _restore_ignore(self.cocoGt.anns.values())

            cg, cd = COCO(gtd), COCO(dtd)
            E = _Eval(cg, cd, "bbox", print_function=lambda *a, **k: None)
        else:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            class _Eval(COCOeval):
                def _prepare(self):
                    super()._prepare()
                    for v in self._gts.values():
                        _restore_ignore(v)

            cg, cd = COCO(), COCO()
            cg.dataset, cd.dataset = gtd, dtd
            cg.createIndex()
            cd.createIndex()
            E = _Eval(cg, cd, "bbox")
        p = E.params
        p.imgIds, p.catIds = sorted(cg.getImgIds()), sorted(cat_ids)
        p.areaRng, p.areaRngLbl, p.maxDets = [list(a) for a in areas], list(labels), list(max_dets)
        E.evaluate()
        E.accumulate()
    return E.eval["precision"], np.asarray(p.iouThrs)


def _summ(prec, thrs, iou=None, a=0, m=-1, k=slice(None)) -> float:
    """pycocotools' COCOeval._summarize for AP: mean of precision > -1, else -1."""
    s = prec if iou is None else prec[np.where(iou == thrs)[0]]
    s = s[:, :, k, a, m]
    return float(np.mean(s[s > -1])) if (s > -1).any() else -1.0


def _coco_like(G: _GT, D, protocol: str, engine: str):
    if protocol == "sodad":  # sodad.py: catIds of the foreground CLASSES only
        keep = [k for k, n in enumerate(G.cat_names) if n.strip().lower() != "ignore"]
    else:
        keep = list(range(len(G.cat_ids)))
    cat_ids = [G.cat_ids[k] for k in keep]
    gtd, dtd = _datasets(G, D, protocol)
    prec, thrs = _run_cocoeval(gtd, dtd, protocol, engine, cat_ids)
    m0 = 0 if protocol == "sodad" else 2  # sodadeval.py: maxDets[0]=100; COCO: 100
    names = METRIC_KEYS[protocol]
    vals = [_summ(prec, thrs, None, 0, m0), _summ(prec, thrs, 0.5, 0, m0), _summ(prec, thrs, 0.75, 0, m0)]
    vals += [_summ(prec, thrs, None, a, m0) for a in range(1, len(names) - 2)]
    metrics = dict(zip(names, vals))
    rows = []
    for j, k in enumerate(keep):  # detectron2/sodad.py: area index 0, maxDets index -1
        ap, ap50 = _summ(prec, thrs, None, 0, -1, j), _summ(prec, thrs, 0.5, 0, -1, j)
        sel = G.cat == k
        if protocol == "sodad":
            n_gt = int((sel & ~G.ignore & (G.area <= 32**2)).sum())
        else:
            n_gt = int((sel & ~G.crowd & (G.area <= 1e5**2)).sum())
        rows.append(
            (G.cat_ids[k], G.cat_names[k], np.nan if ap < 0 else ap, np.nan if ap50 < 0 else ap50, n_gt)
        )
    return metrics, pd.DataFrame(rows, columns=PER_CLASS_COLUMNS)


# ----------------------------------------------------------------------------- public API
def evaluate_detailed(gt, detections, protocol: str = "coco", backend: str = "auto"):
    """Like :func:`evaluate`, returning ``(metrics, per_class_df)`` from one evaluation.

    ``per_class_df`` columns: category_id, name, AP, AP50 (NaN without ground truth), num_gt
    (the ground truth the class's AP counts: non-crowd for coco, non-ignored Small boxes for
    sodad, all boxes left after dropping, score-0 included, for visdrone)."""
    engine = _resolve_backend(protocol, backend)
    G = _GT(gt)
    D = _parse_detections(detections, G)
    if protocol == "visdrone":
        return evaluate_visdrone(
            G.images, G.cat_ids, G.cat_names, G.img, G.cat, G.box, G.ignore | G.crowd, *D
        )
    return _coco_like(G, D, protocol, engine)


def evaluate(
    gt, detections, protocol: str = "coco", backend: str = "auto", per_class: bool = False
) -> dict[str, float]:
    """Evaluate COCO-format detections under ``protocol`` ("coco" | "sodad" | "visdrone").

    ``gt``: COCO dict or json path; ``detections``: list of {image_id, category_id,
    bbox [x, y, w, h] px, score} or json path. Returns fractions in [0, 1], -1 where a range has
    no ground truth; with ``per_class`` also ``AP/<category name>`` entries."""
    metrics, table = evaluate_detailed(gt, detections, protocol, backend)
    if per_class:
        for name, ap in zip(table["name"], table["AP"]):
            metrics[f"AP/{name}"] = -1.0 if np.isnan(ap) else float(ap)
    return metrics


def per_class_ap(gt, detections, protocol: str = "coco", backend: str = "auto") -> pd.DataFrame:
    """Per-class AP table (columns category_id, name, AP, AP50, num_gt)."""
    return evaluate_detailed(gt, detections, protocol, backend)[1]


def write_metrics(out_dir, metrics: dict, per_class_df: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write ``metrics.csv`` (tidy: metric,value) and ``per_class.csv`` atomically into ``out_dir``."""
    out = Path(out_dir)
    tidy = pd.DataFrame({"metric": list(metrics), "value": [float(v) for v in metrics.values()]})
    paths = {"metrics": atomic_write_text(out / "metrics.csv", tidy.to_csv(index=False))}
    if per_class_df is not None:
        paths["per_class"] = atomic_write_text(out / "per_class.csv", per_class_df.to_csv(index=False))
    return paths


def format_table(metrics: dict, per_class_df: pd.DataFrame | None = None) -> str:
    """Human-readable tables (values in %, '-' where there is no ground truth)."""

    def pct(v):
        return "-" if v is None or (isinstance(v, float) and np.isnan(v)) or v < 0 else f"{100 * v:.2f}"

    w = max([len(k) for k in metrics] + [6])
    lines = [f"{'metric':<{w}}  value(%)"] + [f"{k:<{w}}  {pct(v):>8}" for k, v in metrics.items()]
    if per_class_df is not None and len(per_class_df):
        nw = max([len(str(n)) for n in per_class_df["name"]] + [4])
        lines += ["", f"{'id':>4}  {'name':<{nw}}  {'AP(%)':>7}  {'AP50(%)':>7}  {'num_gt':>7}"]
        for r in per_class_df.itertuples(index=False):
            lines.append(
                f"{r.category_id:>4}  {r.name:<{nw}}  {pct(r.AP):>7}  {pct(r.AP50):>7}  {r.num_gt:>7}"
            )
    return "\n".join(lines)

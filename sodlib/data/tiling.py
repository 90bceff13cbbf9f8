"""Cutting large images into overlapping patches and merging patch detections back (SODA-D practice).

SODA-D trains and tests on 800×800 patches with 150 px overlap and merges patch detections with
per-class NMS at IoU 0.5. Conventions here:

* Windows (:func:`tile_windows`): along each axis the starts are ``0, s, 2s, ...`` with stride
  ``s = tile - overlap``; the last window is aligned to the border (``start = size - tile``), so every
  window is exactly ``tile`` wide and neighbours overlap by at least ``overlap``. An axis shorter than
  ``tile`` gets one window covering it (images smaller than a tile are kept whole).
* Boxes (:func:`tile_coco_annotations`): a box is clipped to each window it intersects. It is kept as it
  was (same crowd/ignore flags) when at least ``min_visible`` (default 0.5) of its area lies inside the
  window; a smaller visible piece becomes an ignore annotation (``iscrowd=1, ignore=1``) so that
  detecting the cut-off part is neither rewarded nor punished (``ignore_truncated=False`` drops it).
  Image-level ``ignore_regions_xywh`` / ``ignored_boxes_xywh`` (VisDrone) are clipped into the patches.
* Patch records: ``{"id", "file_name": "<stem>_<x0>_<y0>.png", "width", "height", "tile_of": source image
  id, "offset": [x0, y0], "source_file_name", "source_width", "source_height"}``.
* :func:`tile_coco` also writes the patches: ``out_dir/images/<split>/*.png`` and
  ``out_dir/annotations/instances_<split>.json`` (the ``coco`` layout of
  :func:`sodlib.data.datasets.build_dataset`).
"""

from __future__ import annotations

import io
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image

from sodlib.data.formats import load_coco
from sodlib.io import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def tile_windows(
    width: int, height: int, tile: int = 800, overlap: int = 150
) -> list[tuple[int, int, int, int]]:
    """Patch windows ``(x0, y0, x1, y1)`` (pixels, x1/y1 exclusive) covering a ``width × height`` image.

    Row-major order (y then x). See the module docstring for the placement rule.
    """
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return [
        (x0, y0, min(x0 + tile, width), min(y0 + tile, height))
        for y0 in _starts(int(height), tile, overlap)
        for x0 in _starts(int(width), tile, overlap)
    ]


def _clip_to_window(box_xywh, win) -> tuple[list[float], float] | None:
    """Box (source pixels) → (box in window coordinates, visible fraction), or None if disjoint."""
    x, y, w, h = (float(v) for v in box_xywh)
    x0, y0, x1, y1 = win
    ix0, iy0 = max(x, x0), max(y, y0)
    ix1, iy1 = min(x + w, x1), min(y + h, y1)
    if ix1 <= ix0 or iy1 <= iy0 or w <= 0 or h <= 0:
        return None
    frac = (ix1 - ix0) * (iy1 - iy0) / (w * h)
    return [ix0 - x0, iy0 - y0, ix1 - ix0, iy1 - iy0], frac


def tile_coco_annotations(
    coco: Mapping,
    tile: int = 800,
    overlap: int = 150,
    min_visible: float = 0.5,
    ignore_truncated: bool = True,
) -> dict:
    """The patch COCO dict for ``coco`` (no pixels touched; see the module docstring for the rules)."""
    if not 0 < min_visible <= 1:
        raise ValueError(f"min_visible must be in (0, 1], got {min_visible}")
    anns_by_image = defaultdict(list)
    for a in coco["annotations"]:
        anns_by_image[a["image_id"]].append(a)
    images, annotations = [], []
    n_truncated = 0
    for img in coco["images"]:
        for win in tile_windows(int(img["width"]), int(img["height"]), tile, overlap):
            rec = _patch_record(img, win, len(images) + 1)
            images.append(rec)
            for a in anns_by_image.get(img["id"], []):
                clipped = _patch_annotation(
                    a, win, rec["id"], len(annotations) + 1, min_visible, ignore_truncated
                )
                if clipped is not None:
                    annotations.append(clipped[0])
                    n_truncated += int(clipped[1])
    logger.info(
        "tiled %d images into %d patches (%d px, overlap %d); %d annotations, %d truncated → ignore",
        len(coco["images"]),
        len(images),
        tile,
        overlap,
        len(annotations),
        n_truncated,
    )
    info = dict(coco.get("info", {}))
    info.update(
        {
            "tiling": {
                "tile": tile,
                "overlap": overlap,
                "min_visible": min_visible,
                "ignore_truncated": ignore_truncated,
            }
        }
    )
    return {
        "info": info,
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in coco["categories"]],
    }


def _patch_record(img: Mapping, win: tuple[int, int, int, int], patch_id: int) -> dict:
    """The image record of the patch ``win`` of ``img``, with its ignore regions and boxes clipped to it."""
    x0, y0, x1, y1 = win
    rec = {
        "id": patch_id,
        "file_name": f"{Path(img['file_name']).stem}_{x0}_{y0}.png",
        "width": x1 - x0,
        "height": y1 - y0,
        "tile_of": img["id"],
        "offset": [x0, y0],
        "source_file_name": img["file_name"],
        "source_width": img["width"],
        "source_height": img["height"],
    }
    for key in ("ignore_regions_xywh", "ignored_boxes_xywh"):
        if key in img:
            rec[key] = [c[0] for c in (_clip_to_window(b, win) for b in img[key]) if c is not None]
    return rec


def _patch_annotation(
    a: Mapping,
    win: tuple[int, int, int, int],
    image_id: int,
    ann_id: int,
    min_visible: float,
    ignore_truncated: bool,
) -> tuple[dict, bool] | None:
    """Annotation ``a`` clipped to the patch ``win``, and whether it became an ignore box for showing less
    than ``min_visible`` of itself; None when it is outside the patch, or truncated and
    ``ignore_truncated`` is False."""
    c = _clip_to_window(a["bbox"], win)
    if c is None:
        return None
    box, frac = c
    crowd = int(a.get("iscrowd", 0))
    ignore = int(a.get("ignore", crowd))
    truncated = frac < min_visible
    if truncated:
        if not ignore_truncated:
            return None
        crowd = ignore = 1
    new = {k: v for k, v in a.items() if k not in ("id", "image_id", "bbox", "area", "segmentation")}
    new.update(
        {
            "id": ann_id,
            "image_id": image_id,
            "bbox": box,
            "area": box[2] * box[3],
            "iscrowd": crowd,
            "ignore": ignore,
            "source_ann_id": a["id"],
            "visible": round(frac, 6),
        }
    )
    return new, truncated


def tile_coco(
    coco: Mapping | str | os.PathLike,
    image_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tile: int = 800,
    overlap: int = 150,
    min_visible: float = 0.5,
    split: str = "train",
    ignore_truncated: bool = True,
) -> dict:
    """Cut every image of ``coco`` (a dict or json path; images in ``image_dir``) into patches.

    Writes ``out_dir/images/<split>/<stem>_<x0>_<y0>.png`` and ``out_dir/annotations/instances_<split>.json``
    and returns the patch COCO dict. A missing source image raises ``FileNotFoundError`` naming it.
    """
    if not isinstance(coco, Mapping):
        coco = load_coco(coco)
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    tiles = tile_coco_annotations(coco, tile, overlap, min_visible, ignore_truncated)
    patch_dir = out_dir / "images" / split
    by_source = defaultdict(list)
    for rec in tiles["images"]:
        by_source[rec["tile_of"]].append(rec)
    for img in coco["images"]:
        path = image_dir / img["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        with Image.open(path) as im:
            if im.size != (int(img["width"]), int(img["height"])):
                raise ValueError(
                    f"image {path} is {im.size[0]}x{im.size[1]} but its record says "
                    f"{img['width']}x{img['height']}"
                )
            im = im.convert("RGB")
            for rec in by_source[img["id"]]:
                x0, y0 = rec["offset"]
                patch = im.crop((x0, y0, x0 + rec["width"], y0 + rec["height"]))
                buf = io.BytesIO()
                patch.save(buf, format="PNG")
                atomic_write_bytes(patch_dir / rec["file_name"], buf.getvalue())
    atomic_write_json(out_dir / "annotations" / f"instances_{split}.json", tiles)
    return tiles


def merge_tile_detections(
    dets: Sequence[Mapping],
    tiles_coco: Mapping,
    iou_thr: float = 0.5,
    max_dets: int | None = None,
    edge_tiebreak: float = 1e-6,
) -> list[dict]:
    """Patch detections (COCO results: ``image_id`` of a patch, ``category_id``, ``bbox`` xywh, ``score``)
    → detections on the source images, de-duplicated by per-class NMS (``torchvision.ops.batched_nms``).

    Boxes are shifted by the patch ``offset`` and get the source ``image_id`` (``tile_of``). For ranking
    in NMS only, a detection touching a patch border that lies inside the source image (i.e. possibly cut
    by the tiling) loses ``edge_tiebreak`` of score, so between equally scored copies the uncut one wins;
    returned scores are unchanged. ``max_dets`` keeps the best per source image. Output sorted by image
    id, then score (descending). Any extra keys of a detection are kept.
    """
    from torchvision.ops import batched_nms

    tiles = {img["id"]: img for img in tiles_coco["images"]}
    per_image: dict = defaultdict(list)
    for d in dets:
        rec = tiles.get(d["image_id"])
        if rec is None:
            raise ValueError(f"detection for unknown patch image_id {d['image_id']!r}")
        if "tile_of" not in rec or "offset" not in rec:
            raise ValueError(f"image {d['image_id']!r} is not a patch record (no tile_of/offset)")
        x, y, w, h = (float(v) for v in d["bbox"])
        ox, oy = rec["offset"]
        eps = 1e-3
        touches = (
            (x <= eps and ox > 0)
            or (y <= eps and oy > 0)
            or (x + w >= rec["width"] - eps and ox + rec["width"] < rec["source_width"])
            or (y + h >= rec["height"] - eps and oy + rec["height"] < rec["source_height"])
        )
        out = dict(d)
        out["image_id"] = rec["tile_of"]
        out["bbox"] = [x + ox, y + oy, w, h]
        per_image[rec["tile_of"]].append((out, float(d["score"]) - edge_tiebreak * touches))
    merged: list[dict] = []
    for image_id in sorted(per_image, key=lambda k: (str(type(k)), k)):
        items = per_image[image_id]
        boxes = torch.tensor([it[0]["bbox"] for it in items], dtype=torch.float64)
        boxes[:, 2:] += boxes[:, :2]
        rank = torch.tensor([it[1] for it in items], dtype=torch.float64)
        cats = [it[0]["category_id"] for it in items]
        cat_idx = {c: i for i, c in enumerate(sorted(set(cats), key=str))}
        idxs = torch.tensor([cat_idx[c] for c in cats], dtype=torch.int64)
        keep = batched_nms(boxes, rank, idxs, iou_thr)  # sorted by decreasing rank
        if max_dets is not None:
            keep = keep[:max_dets]
        merged.extend(items[i][0] for i in keep.tolist())
    logger.info("merged %d patch detections into %d", len(dets), len(merged))
    return merged


__all__ = ["merge_tile_detections", "tile_coco", "tile_coco_annotations", "tile_windows"]

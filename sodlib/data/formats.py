"""Annotation formats converted to one in-memory format, the COCO detection dict.

* ``images``: ``{"id", "file_name", "width", "height", ...}`` (``file_name`` relative to the image folder)
* ``annotations``: ``{"id", "image_id", "category_id", "bbox": [x, y, w, h] (float, pixels),
  "area", "iscrowd", "ignore"}``; in the dicts built here ``ignore == iscrowd``, because pycocotools'
  ``COCOeval`` derives its ignore flag from ``iscrowd`` alone.
* ``categories``: ``{"id", "name"}``.

Loaders (all re-exported by :mod:`sodlib.data.datasets`)
---------------------------------------------------
* :func:`load_coco` / :func:`validate_coco` – a COCO json file or dict, validated (missing keys raise
  ``ValueError`` naming file and key); :func:`subset_coco` keeps some of its images.
* :func:`visdrone_to_coco` – a VisDrone2019-DET folder (``images/*.jpg`` + ``annotations/*.txt``).
* :func:`voc_to_coco` – a Pascal VOC folder (``images/`` + ``annotations/*.xml``).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from sodlib.io import read_json

logger = logging.getLogger(__name__)

VISDRONE_CATEGORIES = (
    "pedestrian",
    "people",
    "bicycle",
    "car",
    "van",
    "truck",
    "tricycle",
    "awning-tricycle",
    "bus",
    "motor",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------------
# COCO json: loading and validation
# --------------------------------------------------------------------------------------------------

_IMAGE_KEYS = ("id", "file_name", "width", "height")
_ANN_KEYS = ("id", "image_id", "category_id", "bbox")
_CAT_KEYS = ("id", "name")


def load_coco(path: PathLike) -> dict:
    """Read and validate a COCO detection json file (see :func:`validate_coco`)."""

    return validate_coco(read_json(path, "COCO annotation"), source=str(path))


def validate_coco(coco: Mapping, source: str = "<dict>") -> dict:
    """Check a COCO detection dict and return a normalised shallow copy.

    Required: top-level ``images``, ``annotations``, ``categories``; per image ``id``, ``file_name``,
    ``width``, ``height``; per annotation ``id``, ``image_id``, ``category_id``, ``bbox`` (4 numbers);
    per category ``id``, ``name``. A missing key raises ``ValueError("<source>: ... missing key 'k'")``,
    as do duplicate ids and annotations that refer to unknown images or categories.
    Defaults filled in: ``bbox`` as floats, ``area = w*h``, ``iscrowd = 0``, ``ignore = iscrowd``.
    """
    if not isinstance(coco, Mapping):
        raise ValueError(f"{source}: expected a JSON object with images/annotations/categories")  # noqa: TRY004
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise ValueError(f"{source}: missing key '{key}'")
        if not isinstance(coco[key], list):
            raise ValueError(f"{source}: '{key}' must be a list")  # noqa: TRY004

    def _check(rec, keys, kind, i):
        if not isinstance(rec, Mapping):
            raise ValueError(f"{source}: {kind}[{i}] is not an object")  # noqa: TRY004
        for k in keys:
            if k not in rec:
                raise ValueError(f"{source}: {kind}[{i}] missing key '{k}'")

    def unique(kind: str, keys, label: str) -> tuple[list[dict], set]:
        records, ids = [], set()
        for i, rec in enumerate(coco[kind]):
            _check(rec, keys, kind, i)
            if rec["id"] in ids:
                raise ValueError(f"{source}: duplicate {label} id {rec['id']!r}")
            ids.add(rec["id"])
            records.append(dict(rec))
        return records, ids

    images, image_ids = unique("images", _IMAGE_KEYS, "image")
    categories, cat_ids = unique("categories", _CAT_KEYS, "category")
    annotations = []
    ann_ids: set = set()
    for i, ann in enumerate(coco["annotations"]):
        _check(ann, _ANN_KEYS, "annotations", i)
        if ann["id"] in ann_ids:
            raise ValueError(f"{source}: duplicate annotation id {ann['id']!r}")
        ann_ids.add(ann["id"])
        if ann["image_id"] not in image_ids:
            raise ValueError(f"{source}: annotations[{i}] refers to unknown image_id {ann['image_id']!r}")
        if ann["category_id"] not in cat_ids:
            raise ValueError(
                f"{source}: annotations[{i}] refers to unknown category_id {ann['category_id']!r}"
            )
        bbox = ann["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"{source}: annotations[{i}] 'bbox' must be [x, y, w, h]")
        try:
            bbox = [float(v) for v in bbox]
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: annotations[{i}] 'bbox' has a non-numeric value") from e
        if not all(math.isfinite(v) for v in bbox):
            raise ValueError(f"{source}: annotations[{i}] (id {ann['id']!r}) 'bbox' {bbox} is not finite")
        a = dict(ann)
        a["bbox"] = bbox
        a.setdefault("area", bbox[2] * bbox[3])
        a["iscrowd"] = int(a.get("iscrowd", 0) or 0)
        a["ignore"] = int(a.get("ignore", a["iscrowd"]) or 0)
        annotations.append(a)
    out = dict(coco)
    out["images"], out["annotations"], out["categories"] = images, annotations, categories
    return out


def subset_coco(coco: Mapping, keep: Iterable[str | int]) -> dict:
    """The images of ``coco`` whose id, ``file_name`` or file stem is in ``keep``, with their annotations.

    Handy for splitting one folder (e.g. ``neon_trees``) into train / test in memory. Unknown names raise.
    """
    keep = list(keep)
    wanted = {str(k) for k in keep}
    images = [
        img
        for img in coco["images"]
        if str(img["id"]) in wanted or img["file_name"] in wanted or Path(img["file_name"]).stem in wanted
    ]
    found = {str(img["id"]) for img in images} | {img["file_name"] for img in images}
    found |= {Path(img["file_name"]).stem for img in images}
    missing = sorted(wanted - found)
    if missing:
        raise ValueError(f"subset_coco: no image named {missing}")
    ids = {img["id"] for img in images}
    out = dict(coco)
    out["images"] = images
    out["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
    return out


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header (PIL opens lazily: no pixel decode)."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except Exception as e:  # PIL.UnidentifiedImageError, truncated files, ...
        raise OSError(f"cannot read image {path}: {e}") from e


def _clip_xywh(x: float, y: float, w: float, h: float, width: float, height: float):
    """Clip an xywh box to [0, width] x [0, height]; returns (box, was_clipped)."""
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    clipped = (x0, y0, x1, y1) != (x, y, x + w, y + h)
    return [x0, y0, x1 - x0, y1 - y0], clipped


def _list_images(image_dir: Path) -> dict[str, Path]:
    """stem -> path of the image files in a folder (one file per stem)."""
    out: dict[str, Path] = {}
    for p in sorted(image_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            if p.stem in out:
                raise ValueError(f"two images with the same stem: {out[p.stem]} and {p}")
            out[p.stem] = p
    return out


# --------------------------------------------------------------------------------------------------
# VisDrone
# --------------------------------------------------------------------------------------------------


def _parse_visdrone_line(line: str) -> tuple[list[float], int, int, int, int]:
    """One annotation line -> ([x, y, w, h], score, category, truncation, occlusion); ValueError(reason)."""
    fields = [f.strip() for f in line.strip().rstrip(",").split(",")]
    if len(fields) != 8:
        raise ValueError(
            f"expected 8 comma-separated fields x,y,w,h,score,category,truncation,occlusion, "
            f"got {len(fields)}"
        )
    try:
        x, y, w, h = (float(v) for v in fields[:4])
    except ValueError:
        raise ValueError(f"non-numeric box value in {fields[:4]}") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError("non-finite box value")
    ints = []
    for name, v in zip(("score", "category", "truncation", "occlusion"), fields[4:]):
        try:
            fv = float(v)
        except ValueError:
            raise ValueError(f"non-numeric {name} {v!r}") from None
        if fv != int(fv):
            raise ValueError(f"{name} must be an integer, got {v!r}")
        ints.append(int(fv))
    score, category, trunc, occl = ints
    if score not in (0, 1):
        raise ValueError(f"score must be 0 or 1 in ground truth, got {score}")
    if not 0 <= category <= 11:
        raise ValueError(f"category must be in 0..11, got {category}")
    return [x, y, w, h], score, category, trunc, occl


def visdrone_to_coco(
    root: PathLike,
    strict: bool = True,
    annotations_only: bool = False,
    image_sizes: Mapping[str, tuple[int, int]] | None = None,
) -> dict:
    """A VisDrone2019-DET folder as a COCO dict.

    Layout: ``root/images/<stem>.jpg`` and ``root/annotations/<stem>.txt``, one line per box,
    ``x,y,w,h,score,category,truncation,occlusion`` (a trailing comma is tolerated). Every image must
    have an annotation file and vice versa, otherwise ``FileNotFoundError`` naming the file.

    Mapping (what :mod:`sodlib.evaluation.protocols`'s VisDrone protocol relies on):

    * score 1, category 1–10 → annotation, ``iscrowd=0, ignore=0``;
    * score 0, category 1–10 → annotation, ``iscrowd=1, ignore=1``;
    * category 11 ("others") → no annotation; ``image["ignored_boxes_xywh"]`` (list of [x, y, w, h]);
    * category 0 (ignored region) → ``image["ignore_regions_xywh"]``.

    Categories are ids 1–10 with VisDrone's names. Image ids are 1..N in file-name order, annotation ids
    1..M. Annotations also carry ``truncation`` and ``occlusion``. Boxes partly outside the image are
    clipped; boxes with zero or negative size (before or after clipping) are dropped; both counts are
    logged and stored in ``coco["info"]`` (``clipped_boxes``, ``dropped_boxes``).

    A malformed line raises ``ValueError("<file>:<line>: <reason>")``; with ``strict=False`` it is
    skipped with a ``warnings.warn`` and counted in ``coco["info"]["skipped_lines"]``.

    ``annotations_only=True``: for annotation files without images (e.g. the 548 val annotation files).
    ``root`` is the folder holding the ``.txt`` files (or its parent with ``annotations/``). Image sizes
    come from ``image_sizes`` (``{stem or file name: (width, height)}``; a missing entry raises) or, when it
    is ``None``, are inferred as the maximum box extent ``ceil(max(x + w)), ceil(max(y + h))`` over all
    lines of the file (ignore regions included), i.e. a lower bound of the true size; then
    ``coco["info"]["inferred_sizes"]`` is True. ``file_name`` is ``<stem>.jpg``.
    """
    root = Path(root)
    records, skipped = _parse_visdrone(root, strict, annotations_only, image_sizes)
    return _visdrone_coco(records, root, skipped, annotations_only, image_sizes is None)


class _VisDroneImage(NamedTuple):
    """One VisDrone annotation file: its image's name and size, and its lines as
    :func:`_parse_visdrone_line` returns them."""

    file_name: str
    width: int
    height: int
    rows: list[tuple[list[float], int, int, int, int]]


def _parse_visdrone(
    root: Path, strict: bool, annotations_only: bool, image_sizes: Mapping[str, tuple[int, int]] | None
) -> tuple[list[_VisDroneImage], int]:
    """The annotation files of a VisDrone folder in file-name order, and the count of malformed lines
    skipped (``strict=False``); see :func:`visdrone_to_coco`."""
    ann_files, images_by_stem = _visdrone_files(root, annotations_only)
    records, skipped = [], 0
    for stem, ann_path in ann_files.items():
        rows = []
        with open(ann_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(_parse_visdrone_line(line))
                except ValueError as e:
                    msg = f"{ann_path}:{lineno}: {e}"
                    if strict:
                        raise ValueError(msg) from None
                    # stacklevel: the caller of visdrone_to_coco
                    warnings.warn(f"skipping malformed line {msg}", stacklevel=3)
                    skipped += 1
        if annotations_only:
            if image_sizes is not None:
                size = image_sizes.get(stem, image_sizes.get(stem + ".jpg"))
                if size is None:
                    raise ValueError(f"{ann_path}: no entry for '{stem}' in image_sizes")
                width, height = int(size[0]), int(size[1])
            else:
                width = math.ceil(max((b[0] + b[2] for b, *_ in rows), default=0))
                height = math.ceil(max((b[1] + b[3] for b, *_ in rows), default=0))
            file_name = stem + ".jpg"
        else:
            width, height = _image_size(images_by_stem[stem])
            file_name = images_by_stem[stem].name
        records.append(_VisDroneImage(file_name, width, height, rows))
    return records, skipped


def _visdrone_files(root: Path, annotations_only: bool) -> tuple[dict[str, Path], dict[str, Path]]:
    """``stem -> path`` of the annotation files and of the images (none with ``annotations_only``);
    every image must have an annotation file and vice versa."""
    if annotations_only:
        ann_dir = root / "annotations" if (root / "annotations").is_dir() else root
    else:
        ann_dir = root / "annotations"
    if not ann_dir.is_dir():
        raise FileNotFoundError(f"VisDrone annotation folder not found: {ann_dir}")
    ann_files = {p.stem: p for p in sorted(ann_dir.glob("*.txt"))}
    if annotations_only:
        images_by_stem: dict[str, Path] = {}
    else:
        image_dir = root / "images"
        if not image_dir.is_dir():
            raise FileNotFoundError(f"VisDrone image folder not found: {image_dir}")
        images_by_stem = _list_images(image_dir)
        for stem, p in images_by_stem.items():
            if stem not in ann_files:
                raise FileNotFoundError(
                    f"no annotation file for image {p} (expected {ann_dir / (stem + '.txt')})"
                )
        for stem, p in ann_files.items():
            if stem not in images_by_stem:
                raise FileNotFoundError(
                    f"no image for annotation file {p} (expected {image_dir / (stem + '.jpg')})"
                )
    if not ann_files:
        raise FileNotFoundError(f"no .txt annotation files in {ann_dir}")
    return ann_files, images_by_stem


def _visdrone_coco(
    records: list[_VisDroneImage], root: Path, skipped: int, annotations_only: bool, sizes_inferred: bool
) -> dict:
    """The COCO dict of parsed VisDrone files: boxes clipped or dropped, and sorted by category into
    annotations, ignored boxes and ignore regions (see :func:`visdrone_to_coco`)."""
    categories = [
        {"id": i + 1, "name": n, "supercategory": "visdrone"} for i, n in enumerate(VISDRONE_CATEGORIES)
    ]
    images, annotations = [], []
    dropped = clipped_n = 0
    for img_id, record in enumerate(records, start=1):
        width, height = record.width, record.height
        image = {
            "id": img_id,
            "file_name": record.file_name,
            "width": width,
            "height": height,
            "ignore_regions_xywh": [],
            "ignored_boxes_xywh": [],
        }
        for (x, y, w, h), score, category, trunc, occl in record.rows:
            if w <= 0 or h <= 0:
                dropped += 1
                continue
            box, was_clipped = _clip_xywh(x, y, w, h, width, height)
            if box[2] <= 0 or box[3] <= 0:
                dropped += 1
                continue
            clipped_n += int(was_clipped)
            if category == 0:
                image["ignore_regions_xywh"].append(box)
            elif category == 11:
                image["ignored_boxes_xywh"].append(box)
            else:
                crowd = int(score == 0)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": img_id,
                        "category_id": category,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": crowd,
                        "ignore": crowd,
                        "truncation": trunc,
                        "occlusion": occl,
                    }
                )
        images.append(image)
    if dropped:
        logger.warning("%s: dropped %d zero/negative-size boxes", root, dropped)
    if clipped_n:
        logger.info("%s: clipped %d boxes to the image border", root, clipped_n)
    if skipped:
        logger.warning("%s: skipped %d malformed lines (strict=False)", root, skipped)
    logger.info("%s: %d images, %d annotations", root, len(images), len(annotations))
    info = {
        "description": "VisDrone2019-DET converted by sodlib.datasets.visdrone_to_coco",
        "source": str(root),
        "skipped_lines": skipped,
        "dropped_boxes": dropped,
        "clipped_boxes": clipped_n,
        "annotations_only": bool(annotations_only),
        "inferred_sizes": bool(annotations_only and sizes_inferred),
    }
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


# --------------------------------------------------------------------------------------------------
# Pascal VOC
# --------------------------------------------------------------------------------------------------


def _xml_text(node: ET.Element, tag: str, xml_path: Path, required: bool = True) -> str | None:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise ValueError(f"{xml_path}: missing <{tag}>")
        return None
    return child.text.strip()


def voc_to_coco(
    root: PathLike,
    classes: Iterable[str] | None = None,
    class_map: Mapping[str, str] | None = None,
    single_class: str | None = None,
    stems: Iterable[str] | None = None,
) -> dict:
    """A Pascal VOC folder (``root/images/*`` + ``root/annotations/*.xml``) as a COCO dict.

    ``<filename>`` in each xml names the image in ``root/images`` (if it is absent there, the image with
    the xml's stem is used); a missing image raises ``FileNotFoundError`` naming xml and image.
    ``<size>`` must match the image header (``ValueError`` naming the file otherwise; a missing or zero
    ``<size>`` falls back to the header). Boxes: ``xywh = (xmin, ymin, xmax - xmin, ymax - ymin)``
    (coordinates taken as they are, no VOC 1-based shift), clipped to the image; empty boxes are
    dropped and counted. ``<difficult>1`` → ``iscrowd=1, ignore=1``.

    Classes: ``class_map`` renames names first; ``single_class`` maps every object to that one class;
    ``classes`` fixes the category order (ids 1..K; an unknown name raises), otherwise the sorted names
    found. Note that ``neon_trees`` uses ``Tree`` in three files but ``Alive``/``Dead`` in
    ``SOAP_061.xml``: use ``single_class="Tree"`` for the one-class set.
    ``stems`` restricts the conversion to these xml stems. Other files in ``annotations/`` (csv) are ignored.
    """
    root = Path(root)
    records, dropped, clipped_n = _parse_voc(root, class_map, single_class, stems)
    return _voc_coco(records, root, classes, dropped, clipped_n)


def _voc_xml_files(ann_dir: Path, stems: Iterable[str] | None) -> list[Path]:
    """The xml files of ``ann_dir`` in name order, or those of ``stems``."""
    xml_files = sorted(ann_dir.glob("*.xml"))
    if stems is not None:
        wanted = list(stems)
        by_stem = {p.stem: p for p in xml_files}
        missing = [s for s in wanted if s not in by_stem]
        if missing:
            raise FileNotFoundError(f"no annotation xml for {missing} in {ann_dir}")
        xml_files = [by_stem[s] for s in sorted(set(wanted))]
    if not xml_files:
        raise FileNotFoundError(f"no .xml annotation files in {ann_dir}")
    return xml_files


def _parse_voc(
    root: Path, class_map: Mapping[str, str] | None, single_class: str | None, stems: Iterable[str] | None
) -> tuple[list[tuple[dict, list]], int, int]:
    """The xml files of a VOC folder as ``(image record, [(class name, box, difficult)])`` with boxes
    clipped to the image, and the counts of dropped and clipped boxes (see :func:`voc_to_coco`)."""
    ann_dir, image_dir = root / "annotations", root / "images"
    for d in (ann_dir, image_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"VOC folder not found: {d}")
    xml_files = _voc_xml_files(ann_dir, stems)
    images_by_stem = _list_images(image_dir)
    class_map = dict(class_map or {})
    records = []
    dropped = clipped_n = 0
    for img_id, xml_path in enumerate(xml_files, start=1):
        try:
            tree = ET.parse(xml_path)
        except ET.ParseError as e:
            raise ValueError(f"{xml_path}: invalid XML ({e})") from e
        node = tree.getroot()
        img_path = _voc_image(node, xml_path, image_dir, images_by_stem)
        width, height = _image_size(img_path)
        _check_voc_size(node, xml_path, img_path, width, height)
        objects = []
        for k, obj in enumerate(node.findall("object")):
            name = _xml_text(obj, "name", xml_path)
            name = class_map.get(name, name)
            if single_class is not None:
                name = single_class
            bb = obj.find("bndbox")
            if bb is None:
                raise ValueError(f"{xml_path}: object {k} ({name}) has no <bndbox>")
            try:
                x0, y0, x1, y1 = (float(_xml_text(bb, t, xml_path)) for t in ("xmin", "ymin", "xmax", "ymax"))
            except ValueError as e:
                raise ValueError(f"{xml_path}: object {k}: bad <bndbox> ({e})") from None
            difficult = int(float(_xml_text(obj, "difficult", xml_path, required=False) or 0))
            if x1 <= x0 or y1 <= y0:
                dropped += 1
                continue
            box, was_clipped = _clip_xywh(x0, y0, x1 - x0, y1 - y0, width, height)
            if box[2] <= 0 or box[3] <= 0:
                dropped += 1
                continue
            clipped_n += int(was_clipped)
            objects.append((name, box, difficult))
        records.append(
            ({"id": img_id, "file_name": img_path.name, "width": width, "height": height}, objects)
        )
    return records, dropped, clipped_n


def _voc_image(node: ET.Element, xml_path: Path, image_dir: Path, images_by_stem: dict[str, Path]) -> Path:
    """The image an xml names in ``<filename>``, or else the image with the xml's stem."""
    fname = _xml_text(node, "filename", xml_path, required=False)
    img_path = image_dir / fname if fname else None
    if img_path is None or not img_path.is_file():
        img_path = images_by_stem.get(xml_path.stem)
    if img_path is None:
        raise FileNotFoundError(f"{xml_path}: image {fname or xml_path.stem} not found in {image_dir}")
    return img_path


def _check_voc_size(node: ET.Element, xml_path: Path, img_path: Path, width: int, height: int) -> None:
    """Refuse an xml whose ``<size>`` (when present and not zero) differs from its image's header."""
    size = node.find("size")
    if size is None:
        return
    try:
        xw = int(float(_xml_text(size, "width", xml_path, required=False) or 0))
        xh = int(float(_xml_text(size, "height", xml_path, required=False) or 0))
    except ValueError:
        raise ValueError(f"{xml_path}: non-numeric <size>") from None
    if xw and xh and (xw, xh) != (width, height):
        raise ValueError(f"{xml_path}: <size> {xw}x{xh} does not match image {img_path} ({width}x{height})")


def _voc_coco(
    records: list[tuple[dict, list]], root: Path, classes: Iterable[str] | None, dropped: int, clipped_n: int
) -> dict:
    """The COCO dict of parsed VOC files: categories from ``classes`` or the sorted names found."""
    found = sorted({name for _, objs in records for name, _, _ in objs})
    if classes is not None:
        classes = list(classes)
        unknown = [n for n in found if n not in classes]
        if unknown:
            raise ValueError(f"{root}: class names {unknown} not in classes={classes}")
    else:
        classes = found
    cat_id = {n: i + 1 for i, n in enumerate(classes)}
    images, annotations = [], []
    for image, objects in records:
        images.append(image)
        for name, box, difficult in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image["id"],
                    "category_id": cat_id[name],
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": int(difficult > 0),
                    "ignore": int(difficult > 0),
                }
            )
    if dropped:
        logger.warning("%s: dropped %d zero/negative-size boxes", root, dropped)
    if clipped_n:
        logger.info("%s: clipped %d boxes to the image border", root, clipped_n)
    logger.info("%s: %d images, %d annotations, classes %s", root, len(images), len(annotations), classes)
    info = {
        "description": "Pascal VOC converted by sodlib.datasets.voc_to_coco",
        "source": str(root),
        "dropped_boxes": dropped,
        "clipped_boxes": clipped_n,
    }
    return {
        "info": info,
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cat_id[n], "name": n} for n in classes],
    }


__all__ = [
    "IMAGE_EXTENSIONS",
    "VISDRONE_CATEGORIES",
    "PathLike",
    "load_coco",
    "subset_coco",
    "validate_coco",
    "visdrone_to_coco",
    "voc_to_coco",
]

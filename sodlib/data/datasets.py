"""Detection datasets over COCO dicts, as torch ``Dataset``s.

Every dataset goes through one in-memory format, the COCO detection dict (described in
:mod:`sodlib.data.formats`, which also holds the readers and converters):

* :func:`load_coco` – a COCO json file, validated (missing keys raise ``ValueError`` naming file and key).
* :func:`visdrone_to_coco` – a VisDrone2019-DET folder (``images/*.jpg`` + ``annotations/*.txt``).
* :func:`voc_to_coco` – a Pascal VOC folder (``images/`` + ``annotations/*.xml``).

Training samples
----------------
:class:`CocoDetection` returns ``(image, target)``: ``image`` a float tensor ``[3, S, S]`` in [0, 1];
``target`` a dict with ``boxes`` (``[N, 4]`` float, cxcywh normalised to the transformed image),
``labels`` (``[N]`` long, 0-based: label ``i`` is ``category_ids[i]``), ``image_id`` (int),
``orig_size`` (long ``[h, w]`` of the source image) and ``size`` (long ``[h, w]`` of the returned image).
Crowd / ignore annotations, and categories named "ignore" (SODA-D's category 10), never reach the
training targets. Images without boxes are valid samples (``boxes`` has shape ``[0, 4]``).

:func:`build_dataset` maps a :class:`~sodlib.config.DataConfig` to a dataset; the folder layout per
dataset kind is documented there.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sodlib.data import synth
from sodlib.data.formats import (
    PathLike,
    load_coco,
    validate_coco,
    visdrone_to_coco,
    voc_to_coco,
)
from sodlib.data.transforms import basic_transforms, build_transforms

logger = logging.getLogger(__name__)

IGNORE_CATEGORY_NAMES = ("ignore", "ignored", "ignored regions", "ignored_regions")


# --------------------------------------------------------------------------------------------------
# torch Dataset
# --------------------------------------------------------------------------------------------------


def _parse_xml(path: Path) -> ET.ElementTree:
    try:
        return ET.parse(path)
    except ET.ParseError as e:
        raise ValueError(f"{path}: not valid XML ({e})") from e


def _check_inside(image_dir: Path, images: list[dict], source) -> None:
    """Every ``file_name`` must name a file inside ``image_dir`` (lexically: no ``..`` escape, no absolute
    path; symlinks inside the folder are the user's business), or a ValueError names the first that does
    not."""
    root = os.path.normpath(image_dir)
    for img in images:
        name = str(img["file_name"])
        target = os.path.normpath(os.path.join(root, name))
        if os.path.isabs(name) or not (target + os.sep).startswith(root + os.sep) or target == root:
            raise ValueError(
                f"{source}: image {img['id']} file_name {name!r} lies outside the image folder "
                f"{image_dir}; set data.allow_outside_paths=true if that is intended"
            )


def rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit grey (PNG ``I;16``) keeps its top 8 bits (value >> 8) instead of PIL's clipping at
    255."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.uint32) >> 8
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    return image.convert("RGB")


class CocoDetection(torch.utils.data.Dataset):
    """Detection samples from an image folder and a COCO dict or json file.

    ``transforms(image, target)`` is a v2 pipeline from :func:`sodlib.data.transforms.build_transforms` (or
    any callable with that contract: it receives a ``tv_tensors.Image`` and ``{"boxes": BoundingBoxes
    (XYXY, pixels), "labels"}`` and returns the float image and normalised cxcywh boxes). ``None`` keeps
    the source resolution (no resize, no augmentation).

    Attributes: ``coco`` (the validated dict), ``category_ids`` (sorted; label ``i`` ↔
    ``category_ids[i]``; categories named "ignore" are left out), ``names`` (same order), ``ids`` (image
    ids in dataset order). A missing or unreadable image raises an error naming the file.
    """

    def __init__(
        self,
        image_dir: PathLike,
        ann_file_or_dict: PathLike | Mapping,
        transforms: Callable | None = None,
        allow_outside: bool = False,
    ):
        self.image_dir = Path(image_dir)
        if isinstance(ann_file_or_dict, Mapping):
            self.coco = validate_coco(ann_file_or_dict)
            self.ann_file = None
        else:
            self.ann_file = Path(ann_file_or_dict)
            self.coco = load_coco(self.ann_file)
        self.transforms = transforms
        self._basic = None  # lazily built no-resize pipeline for transforms=None
        cats = {c["id"]: c["name"] for c in self.coco["categories"]}
        self.ignore_category_ids = {
            i for i, n in cats.items() if str(n).strip().lower() in IGNORE_CATEGORY_NAMES
        }
        self.category_ids = sorted(i for i in cats if i not in self.ignore_category_ids)
        self.names = [cats[i] for i in self.category_ids]
        self.cat_to_label = {c: i for i, c in enumerate(self.category_ids)}
        self.images = list(self.coco["images"])
        if not allow_outside:
            _check_inside(self.image_dir, self.images, self.ann_file or "the annotation dict")
        self.ids = [img["id"] for img in self.images]
        self._anns: dict[Any, list[dict]] = defaultdict(list)
        for a in self.coco["annotations"]:
            self._anns[a["image_id"]].append(a)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def label_to_category_id(self, labels) -> list[int]:
        """0-based labels (ints or a tensor) → COCO category ids."""
        if isinstance(labels, torch.Tensor):
            labels = labels.tolist()
        return [self.category_ids[int(i)] for i in labels]

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.images[index]["file_name"]

    def load_image(self, index: int) -> Image.Image:
        path = self.image_path(index)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path} (image id {self.images[index]['id']})")
        try:
            with Image.open(path) as im:
                return rgb8(im)
        except Exception as e:
            raise OSError(f"cannot read image {path}: {e}") from e

    def check_images(self) -> None:
        """Every image exists, opens, and has the size its record states: a header read per file (no
        decoding), so a dataset fails when it is built, naming the file, not at the batch that reaches it."""
        for index, record in enumerate(self.images):
            path = self.image_path(index)
            if not path.is_file():
                raise FileNotFoundError(f"image not found: {path} (image id {record['id']})")
            try:
                with Image.open(path) as im:
                    size = im.size
            except Exception as e:
                raise ValueError(f"cannot read image {path} (image id {record['id']}): {e}") from e
            if size != (int(record["width"]), int(record["height"])):
                raise ValueError(
                    f"image {path} is {size[0]}x{size[1]} but its record says "
                    f"{record['width']}x{record['height']}"
                )

    def training_annotations(self, index: int) -> list[dict]:
        """The annotations that become targets: not crowd, not ignore, not an ignore category."""
        return [
            a
            for a in self._anns.get(self.images[index]["id"], [])
            if not a.get("iscrowd", 0)
            and not a.get("ignore", 0)
            and a["category_id"] not in self.ignore_category_ids
        ]

    def __getitem__(self, index: int):
        from torchvision import tv_tensors

        record = self.images[index]
        image = self.load_image(index)
        w, h = image.size
        if (int(record["width"]), int(record["height"])) != (w, h):
            raise ValueError(
                f"image {self.image_path(index)} is {w}x{h} but its record says "
                f"{record['width']}x{record['height']}"
            )
        boxes, labels = [], []
        for a in self.training_annotations(index):
            x, y, bw, bh = a["bbox"]
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)
            if x1 - x0 <= 0 or y1 - y0 <= 0:
                continue
            boxes.append([x0, y0, x1, y1])
            labels.append(self.cat_to_label[a["category_id"]])
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(h, w)
            ),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
        img = tv_tensors.Image(torch.from_numpy(_pil_to_chw(image)))
        tf = self.transforms
        if tf is None:
            if self._basic is None:
                self._basic = basic_transforms()
            tf = self._basic
        img, target = tf(img, target)
        img = img.as_subclass(torch.Tensor)
        out = {
            "boxes": torch.as_tensor(target["boxes"]).as_subclass(torch.Tensor).float().reshape(-1, 4),
            "labels": torch.as_tensor(target["labels"]).as_subclass(torch.Tensor).long(),
            "image_id": int(record["id"]),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "size": torch.tensor(list(img.shape[-2:]), dtype=torch.int64),
        }
        return img, out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(images={len(self)}, annotations={len(self.coco['annotations'])}, "
            f"classes={self.names}, image_dir='{self.image_dir}')"
        )


def _pil_to_chw(image: Image.Image):
    import numpy as np

    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


class VisDroneDataset(CocoDetection):
    """A VisDrone2019-DET folder (``root/images`` + ``root/annotations``) via :func:`visdrone_to_coco`."""

    def __init__(self, root: PathLike, transforms: Callable | None = None, strict: bool = True):
        super().__init__(Path(root) / "images", visdrone_to_coco(root, strict=strict), transforms)


def collate_fn(batch):
    """``[(image, target), ...]`` → ``(images [B, 3, S, S], [target, ...])``."""
    if not batch:
        raise ValueError("collate_fn: empty batch")
    images, targets = zip(*batch)
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(
            f"collate_fn: images of different shapes {sorted(shapes)}; resize to a square size first"
        )
    return torch.stack(list(images)), list(targets)


# --------------------------------------------------------------------------------------------------
# build_dataset
# --------------------------------------------------------------------------------------------------


def data_cache_dir() -> Path:
    """``$SODLIB_DATA`` or ``~/.cache/sodlib``."""
    env = os.environ.get("SODLIB_DATA", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sodlib"


def synthsod_root(data_cfg) -> Path:
    """Where SynthSOD for this config lives: ``data_cfg.root`` or the cache
    ``synthsod_s{size}_seed{seed}``."""
    if data_cfg.root:
        return Path(data_cfg.root).expanduser()
    return data_cache_dir() / f"synthsod_s{data_cfg.image_size}_seed{data_cfg.synth_seed}"


def _read_split_list(root: Path, split: str) -> list[str] | None:
    for p in (root / f"{split}.txt", root / "ImageSets" / "Main" / f"{split}.txt"):
        if p.is_file():
            return [s.split()[0] for s in p.read_text().splitlines() if s.strip() and not s.startswith("#")]
    return None


def build_dataset(data_cfg, split: str, train: bool, data_root: str | None = None) -> CocoDetection:
    """The dataset of ``split`` with RT-DETR transforms at ``data_cfg.image_size``.

    ``data_root`` overrides ``data_cfg.root``. Layouts by ``data_cfg.dataset``:

    * ``synthsod``: ``<root>/images/<train|val>/*.png`` + ``<root>/annotations/instances_<train|val>.json``,
      written on demand by ``sodlib.data.synth.ensure_split``; ``<root>`` is ``data_cfg.root`` or, when empty,
      ``$SODLIB_DATA`` (default ``~/.cache/sodlib``) ``/synthsod_s{image_size}_seed{synth_seed}``.
      ``split`` must be ``train``/``data_cfg.train_split`` (``synth_train_images`` images) or
      ``val``/``data_cfg.val_split`` (``synth_val_images`` images, split name "val").
    * ``coco``: ``<root>/images/<split>/`` + ``<root>/annotations/instances_<split>.json`` (falls back to
      ``<root>/annotations/<split>.json``), e.g. SODA-D or the output of :func:`sodlib.data.tiling.tile_coco`.
    * ``visdrone``: ``<root>/<split>/images/*.jpg`` + ``<root>/<split>/annotations/*.txt``, e.g.
      ``split="VisDrone2019-DET-val"``; ``<root>/VisDrone2019-DET-<split>`` is tried when ``<root>/<split>``
      does not exist.
    * ``voc``: ``<root>/<split>/{images,annotations}``; or, when that folder does not exist, ``<root>``
      itself restricted to the stems listed in ``<root>/<split>.txt`` or
      ``<root>/ImageSets/Main/<split>.txt``; or the whole ``<root>`` for ``split`` "all". With
      ``data_cfg.num_classes == 1`` every object is mapped to one class named after the most frequent class
      name (neon_trees → "Tree").
    """
    tf = build_transforms(data_cfg.image_size, train=train, augment=data_cfg.augment)
    kind = data_cfg.dataset
    root = Path(data_root or data_cfg.root).expanduser() if (data_root or data_cfg.root) else None

    if kind == "synthsod":
        ds = _synthsod_dataset(data_cfg, split, data_root, tf)
    elif root is None:
        raise ValueError(f"data.root must be set for dataset {kind!r}")
    elif kind == "coco":
        ds = _coco_dataset(root, split, tf, data_cfg.allow_outside_paths)
    elif kind == "visdrone":
        ds = _visdrone_dataset(root, split, tf)
    elif kind == "voc":
        ds = _voc_dataset(root, split, tf, data_cfg.num_classes)
    else:
        raise ValueError(f"unknown dataset {kind!r}")

    # the user's files: read every header now (SynthSOD's were just written and checked)
    if kind != "synthsod":
        ds.check_images()
    if ds.num_classes != data_cfg.num_classes:
        logger.warning(
            "%s split %r has %d classes but data.num_classes=%d",
            kind,
            split,
            ds.num_classes,
            data_cfg.num_classes,
        )
    logger.info("built %r", ds)
    return ds


def _synthsod_dataset(data_cfg, split: str, data_root: str | None, tf) -> CocoDetection:
    """SynthSOD's ``train`` or ``val`` split, written first when missing."""
    out_dir = Path(data_root).expanduser() if data_root else synthsod_root(data_cfg)
    if split in ("train", data_cfg.train_split):
        name, n = "train", data_cfg.synth_train_images
    elif split in ("val", data_cfg.val_split):
        name, n = "val", data_cfg.synth_val_images
    else:
        raise ValueError(f"SynthSOD has splits 'train' and 'val', got {split!r}")
    ann = synth.ensure_split(out_dir, name, n, data_cfg.image_size, seed=data_cfg.synth_seed)
    return CocoDetection(out_dir / "images" / name, ann, tf)


def _coco_dataset(root: Path, split: str, tf, allow_outside: bool) -> CocoDetection:
    """A COCO-layout split: ``annotations/instances_<split>.json`` (or ``<split>.json``) and
    ``images/<split>``."""
    candidates = [
        root / "annotations" / f"instances_{split}.json",
        root / "annotations" / f"{split}.json",
    ]
    ann = next((p for p in candidates if p.is_file()), None)
    if ann is None:
        raise FileNotFoundError(
            f"no annotation file for split {split!r}: tried {[str(p) for p in candidates]}"
        )
    return CocoDetection(root / "images" / split, ann, tf, allow_outside=allow_outside)


def _visdrone_dataset(root: Path, split: str, tf) -> CocoDetection:
    """A VisDrone split folder ``<root>/<split>`` (or ``<root>/VisDrone2019-DET-<split>``)."""
    folder = root / split
    if not folder.is_dir() and (root / f"VisDrone2019-DET-{split}").is_dir():
        folder = root / f"VisDrone2019-DET-{split}"
    if not folder.is_dir():
        raise FileNotFoundError(f"VisDrone split folder not found: {folder}")
    return CocoDetection(folder / "images", visdrone_to_coco(folder), tf)


def _voc_dataset(root: Path, split: str, tf, num_classes: int) -> CocoDetection:
    """A VOC split: the folder ``<root>/<split>``, or ``<root>`` restricted to a split list (all of it for
    ``split`` "all"); one class named after the most frequent name when ``num_classes`` is 1."""
    folder, stems = root / split, None
    if not (folder / "annotations").is_dir():
        folder = root
        stems = _read_split_list(root, split)
        if stems is None and split != "all":
            raise FileNotFoundError(
                f"VOC split {split!r}: neither {root / split}/annotations nor a split list "
                f"{root / (split + '.txt')} exists (use split 'all' for the whole folder)"
            )
    single = None
    if num_classes == 1:
        names = Counter(
            el.text.strip()
            for p in sorted((folder / "annotations").glob("*.xml"))
            if stems is None or p.stem in stems
            for el in _parse_xml(p).getroot().iterfind("object/name")
            if el.text
        )
        single = names.most_common(1)[0][0] if names else "object"
    return CocoDetection(folder / "images", voc_to_coco(folder, single_class=single, stems=stems), tf)


__all__ = [
    "CocoDetection",
    "VisDroneDataset",
    "build_dataset",
    "collate_fn",
    "data_cache_dir",
    "synthsod_root",
]

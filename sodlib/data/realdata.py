"""Real aerial data for the baseline-vs-full comparison: NEON tree crowns cut into patches.

``neon_trees`` in the shared sample data (:func:`sodlib.data.shared_data_dir`) holds 4 airborne RGB tiles
(NEON, 10 cm/px) with Pascal VOC boxes of one class (tree crowns; ``SOAP_061.xml`` names them Alive/Dead,
folded here into one class "Tree"). Its README suggests training on three tiles and testing on the fourth; the
tiles (400² to 2299×2472 px) are cut into square patches at native resolution (no resizing, so a crown keeps
its real pixel size: about 31% of them are under 32² px) with :func:`sodlib.data.tiling.tile_coco`:

* patch = the profile's working size (``data.image_size``), so training and test images are never resized;
* overlap: a quarter of the patch by default (80 px at 320): 95% of the crowns are at most 75 px on their
  longer side, and a box no larger than the overlap lies whole inside at least one patch;
* a crown cut by a patch border keeps its clipped box when at least half of it is visible, otherwise it
  becomes an ignore annotation (``tile_coco``'s rule): no training target, neither hit nor miss in evaluation;
* train and test are split by tile *before* cutting, so no pixel of the test tile reaches training;
* patches without any crown are kept in both splits by default (7% of the train patches at 320 px: bare
  ground, roads and shadows are the negatives a detector must learn); ``drop_empty_train=True`` removes them
  from train only (the test split always keeps every patch).

:func:`neon_patches` writes the result in the ``coco`` layout of :func:`sodlib.data.datasets.build_dataset`
(``images/{train,test}/``, ``annotations/instances_{train,test}.json``, plus the uncut tiles' ground truth
``annotations/tiles_{train,test}.json`` for merging patch detections back) into the data cache
(``$SODLIB_DATA`` or ``~/.cache/sodlib``), under a folder name that identifies the content
(:func:`patch_dataset_name`: the cutting parameters and a hash of the source files) and nothing about the
machine, so a config can carry the name as ``data.root`` while the absolute folder is passed as ``data_root``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from sodlib.data import shared_data_dir
from sodlib.data.datasets import data_cache_dir
from sodlib.data.formats import PathLike, subset_coco, visdrone_to_coco, voc_to_coco
from sodlib.data.tiling import tile_coco
from sodlib.io import atomic_write_json

logger = logging.getLogger(__name__)

NEON_TRAIN = ("OSBS_029", "SOAP_061", "2019_YELL_2_528000_4978000_image_crop2")
NEON_TEST = "2019_YELL_2_541000_4977000_image_crop"
MANIFEST = "neon_patches.json"  # written last: a folder without it is not a finished cache
FORMAT_VERSION = 1  # bump when the cutting rules change, so old caches are not reused


class NeonTreesAbsent(FileNotFoundError):
    """The neon_trees folder (``images/`` + ``annotations/``) does not exist: callers may skip."""


def _find(path: PathLike | None, name: str) -> Path | None:
    """``path`` (or the shared data's ``name`` folder when empty) if it holds ``images/`` and
    ``annotations/``."""
    src = Path(path).expanduser() if path else shared_data_dir() / name
    return src if (src / "images").is_dir() and (src / "annotations").is_dir() else None


def find_neon_trees(path: PathLike | None = "") -> Path | None:
    """The neon_trees folder (``path``, or the shared data's when empty), or None when absent."""
    return _find(path, "neon_trees")


def default_overlap(patch: int) -> int:
    """A quarter of the patch (80 px at 320): wider than 95% of the crowns (see the module docstring)."""
    return patch // 4


def _fingerprint(src: Path, stems: Sequence[str], params: dict) -> str:
    """Hash of the cutting parameters and of the bytes of the source files of ``stems``."""
    h = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **params}, sort_keys=True).encode())
    wanted = set(stems)
    for folder in ("annotations", "images"):
        for p in sorted((src / folder).iterdir()):
            if p.is_file() and p.stem in wanted and p.suffix.lower() != ".csv":
                h.update(f"{folder}/{p.name}".encode())
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
    return h.hexdigest()


def patch_dataset_name(patch: int, overlap: int, fingerprint: str, prefix: str = "neon_trees") -> str:
    """``{prefix}_p{patch}_o{overlap}_{hash}``: the cache folder, and the machine-independent
    ``data.root``."""
    return f"{prefix}_p{patch}_o{overlap}_{fingerprint[:10]}"


def read_manifest(root: PathLike) -> dict | None:
    """The manifest of a finished patch folder (parameters and per-split counts), or None if unfinished."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def _split_counts(tiles: dict, patches: dict) -> dict:
    targets = {a["image_id"] for a in patches["annotations"] if not a.get("iscrowd", 0)}
    return {
        "tiles": len(tiles["images"]),
        "source_boxes": len(tiles["annotations"]),
        "patches": len(patches["images"]),
        "empty_patches": sum(1 for img in patches["images"] if img["id"] not in targets),
        "boxes": sum(1 for a in patches["annotations"] if not a.get("iscrowd", 0)),
        "ignore_boxes": sum(1 for a in patches["annotations"] if a.get("iscrowd", 0)),
    }


def _drop_empty(root: Path, split: str, patches: dict) -> dict:
    """Remove the patches without a training target (files and records); annotations are renumbered."""
    keep = {a["image_id"] for a in patches["annotations"] if not a.get("iscrowd", 0)}
    for img in patches["images"]:
        if img["id"] not in keep:
            (root / "images" / split / img["file_name"]).unlink()
    out = dict(patches)
    out["images"] = [img for img in patches["images"] if img["id"] in keep]
    out["annotations"] = [a for a in patches["annotations"] if a["image_id"] in keep]
    atomic_write_json(root / "annotations" / f"instances_{split}.json", out)
    return out


def neon_patches(
    src_dir: PathLike | None = "",
    out_root: PathLike | None = None,
    patch: int = 320,
    overlap: int | None = None,
    train_stems: Sequence[str] = NEON_TRAIN,
    test_stem: str = NEON_TEST,
    min_visible: float = 0.5,
    drop_empty_train: bool = False,
) -> Path:
    """Cut the neon_trees tiles into a patch dataset (``coco`` layout, splits ``train`` and ``test``).

    ``src_dir``: the neon_trees folder ("" = the shared data's); ``out_root``: where the patch
    folder goes (None = the data cache, ``$SODLIB_DATA`` or ``~/.cache/sodlib``); ``overlap`` None =
    :func:`default_overlap`. Returns ``out_root / patch_dataset_name(...)``.

    Cached: a finished folder (its manifest present) with the same parameters and source bytes is reused.
    The folder is built under a temporary name in ``out_root`` and renamed into place only when complete,
    so an interrupted build never passes for a finished one; a leftover folder without manifest is rebuilt.

    Raises :class:`NeonTreesAbsent` when ``src_dir`` has no ``images/`` + ``annotations/``; a missing or
    unreadable xml or image raises naming the file (``FileNotFoundError`` / ``ValueError`` from
    :func:`sodlib.data.formats.voc_to_coco`); a tile in both splits raises ``ValueError``.
    """
    src = Path(src_dir).expanduser() if src_dir else shared_data_dir() / "neon_trees"
    if find_neon_trees(src) is None:
        raise NeonTreesAbsent(f"neon_trees data not found: {src} (expected images/ and annotations/ in it)")
    train_stems = sorted(train_stems)
    if not train_stems:
        raise ValueError("neon_patches: train_stems is empty")
    if test_stem in train_stems:
        raise ValueError(f"neon_patches: tile {test_stem!r} is both a train and the test tile")

    def splits() -> dict:
        coco = voc_to_coco(src, single_class="Tree", stems=[*train_stems, test_stem])
        return {"train": subset_coco(coco, train_stems), "test": subset_coco(coco, [test_stem])}

    return _patch_dataset(
        src,
        "neon_trees",
        splits,
        [*train_stems, test_stem],
        out_root,
        patch,
        overlap,
        min_visible,
        drop_empty_train,
        {"train_stems": train_stems, "test_stem": test_stem, "single_class": "Tree"},
    )


def find_visdrone_mini(path: PathLike | None = "") -> Path | None:
    """The visdrone_mini folder (``path``, or the shared data's when empty), or None when absent."""
    return _find(path, "visdrone_mini")


def visdrone_patches(
    src_dir: PathLike | None = "",
    out_root: PathLike | None = None,
    patch: int = 320,
    overlap: int | None = None,
    min_visible: float = 0.5,
) -> Path:
    """Cut every image of a VisDrone2019-DET folder (default: the shared data's visdrone_mini) into patches.

    Both splits hold all the images (``train`` and ``test`` are the same patches): the eight images of
    visdrone_mini are too few to hold any out, so a model trained on this folder has *seen* what it is
    evaluated on. It exists to give VisDrone-format checkpoints whose detections score (the SAHI
    comparison of ``sodlib bench sahi``, heatmaps on VisDrone images), not generalisation numbers.
    The 10 VisDrone classes keep their ids (1-10); "others" and ignored regions are not targets; boxes with
    score 0 become ignore annotations. Layout, caching and atomicity as :func:`neon_patches`; the folder is
    ``visdrone_p{patch}_o{overlap}_{hash}``. Raises ``FileNotFoundError`` when the folder is absent.
    """

    src = Path(src_dir).expanduser() if src_dir else shared_data_dir() / "visdrone_mini"
    if find_visdrone_mini(src) is None:
        raise FileNotFoundError(f"VisDrone folder not found: {src} (expected images/ and annotations/ in it)")
    stems = sorted(p.stem for p in (src / "images").glob("*.jpg"))

    def splits() -> dict:
        coco = visdrone_to_coco(src)
        return {"train": coco, "test": coco}

    return _patch_dataset(
        src,
        "visdrone",
        splits,
        stems,
        out_root,
        patch,
        overlap,
        min_visible,
        False,
        {"split": "train=test=all"},
    )


def _patch_dataset(
    src: Path,
    prefix: str,
    make_splits,
    stems: Sequence[str],
    out_root: PathLike | None,
    patch: int,
    overlap: int | None,
    min_visible: float,
    drop_empty_train: bool,
    extra: dict,
) -> Path:
    """Build (or reuse) ``out_root / patch_dataset_name(...)`` from ``make_splits()`` = {split: COCO dict of
    whole images in ``src / "images"``}; see :func:`neon_patches` for the caching and atomicity rules."""

    overlap = default_overlap(patch) if overlap is None else int(overlap)
    params = {
        "patch": int(patch),
        "overlap": overlap,
        "min_visible": float(min_visible),
        "drop_empty_train": bool(drop_empty_train),
        **extra,
    }
    fingerprint = _fingerprint(src, stems, params)
    out_root = Path(out_root).expanduser() if out_root else data_cache_dir()
    final = out_root / patch_dataset_name(patch, overlap, fingerprint, prefix)
    if read_manifest(final) is not None:
        logger.info("reusing %s", final)
        return final

    splits = make_splits()  # the whole source is converted and checked before any patch is written
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=out_root))
    try:
        counts = {}
        for split, tiles in splits.items():
            logger.info(
                "cutting %d %s image(s) into %d px patches (overlap %d)",
                len(tiles["images"]),
                split,
                patch,
                overlap,
            )
            patches = tile_coco(
                tiles, src / "images", tmp, tile=patch, overlap=overlap, min_visible=min_visible, split=split
            )
            if split == "train" and drop_empty_train:
                patches = _drop_empty(tmp, split, patches)
            tiles = {**tiles, "info": {**tiles.get("info", {}), "source": src.name}}
            atomic_write_json(tmp / "annotations" / f"tiles_{split}.json", tiles)
            counts[split] = _split_counts(tiles, patches)
        atomic_write_json(
            tmp / MANIFEST,
            {
                "format": FORMAT_VERSION,
                "source": src.name,
                **params,
                "fingerprint": fingerprint,
                "counts": counts,
            },
        )
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like the files in it
        _install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s: %s", final, counts)
    return final


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` folder to ``final``; an unfinished ``final`` is removed first, a finished
    one (written meanwhile by a concurrent call with the same arguments) is kept and ``tmp`` removed."""
    if final.exists() and read_manifest(final) is None:
        stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".stale", dir=final.parent))
        os.replace(final, stale / "old")
        shutil.rmtree(stale)
    try:
        os.replace(tmp, final)
    except OSError:
        if read_manifest(final) is None:
            raise
        shutil.rmtree(tmp)


__all__ = [
    "MANIFEST",
    "NEON_TEST",
    "NEON_TRAIN",
    "NeonTreesAbsent",
    "default_overlap",
    "find_neon_trees",
    "find_visdrone_mini",
    "neon_patches",
    "patch_dataset_name",
    "read_manifest",
    "visdrone_patches",
]

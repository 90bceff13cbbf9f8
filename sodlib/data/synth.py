"""SynthSOD: the embedded default dataset -- aerial-like clutter with many small objects.

Every image is drawn from its own RNG, ``SeedSequence(split_seed(seed, split), spawn_key=(index,))``,
so a split is reproducible image by image and a longer split starts with the shorter one.

Scene: textured ground with fields, roads with lane markings, parking lots, and unlabelled clutter
(buildings, trees, rocks, containers), all casting shadows from one sun direction. Objects (six
classes, ``CLASSES``) come in parking rows, tank farms, loose clusters and singles; later-drawn
objects occlude earlier ones, every box is the full object extent clipped to the image (COCO
``[x, y, w, h]`` in pixels). Box sizes are long-tailed: about 30 % of boxes have area < 16² and
about 70 % < 32² at the image size passed in (object sizes are in pixels, not relative).

Confusable pairs: ``car``/``van`` (same chamfered-rectangle shape, red vs orange-red, aspect
≈2.0 vs ≈2.8, car shows windscreen+rear window, van a front windscreen and a long pale roof) and
``tank``/``silo`` (same disc, light grey vs cream, tank has a dark concentric ring and centre dot,
silo a shaded dome with a highlight). ``truck`` (blue cab + white ribbed trailer) and ``plane``
(swept-wing cross) stand apart by shape.

This module holds the public API (seeds, :func:`generate_image`, splits on disk); the shapes, scene
planning and rendering primitives it composes live in :mod:`sodlib.data.synth_scene`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sodlib.data.synth_scene import (
    _COUNT_MU,
    _clutter,
    _draw,
    _extent,
    _ground,
    _noise_tile,
    _populate,
    _roads,
    _Scene,
)
from sodlib.io import atomic_write_bytes, atomic_write_json, file_lock

GENERATOR_VERSION = "synthsod-1"
CLASSES: tuple[str, ...] = ("car", "van", "truck", "tank", "silo", "plane")


def split_seed(seed: int, split: str) -> int:
    """Seed of a split: train and val of the same base seed get unrelated streams."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    state = np.random.SeedSequence([int(seed), zlib.crc32(split.encode())]).generate_state(2)
    return (int(state[0]) << 31) ^ int(state[1])  # < 2**63: fits any JSON/int64 reader


def image_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """Per-image seed sequence derived from (base seed, split, index)."""
    return np.random.SeedSequence(split_seed(seed, split), spawn_key=(int(index),))


# ----------------------------------------------------------------------------- image


def generate_image(seed_seq_or_rng, size: int, ignore_regions: bool = False):
    """One SynthSOD image.

    Args:
        seed_seq_or_rng: ``np.random.SeedSequence``, ``np.random.Generator`` or int.
        size: square image side in pixels (object sizes are in pixels at this size).
        ignore_regions: when True, about a third of the images get one blurred, hazy rectangle with
            small objects inside; it is annotated once per class present inside it with the region
            box and ``iscrowd=1, ignore=1`` (the objects inside get no regular annotation).

    Returns:
        (image [size, size, 3] uint8, annotations) with each annotation a dict holding
        ``bbox`` [x, y, w, h] float pixels, ``category_id`` in 1..6, ``iscrowd``, ``ignore``.
    """
    rng = (
        seed_seq_or_rng
        if isinstance(seed_seq_or_rng, np.random.Generator)
        else np.random.default_rng(seed_seq_or_rng)
    )
    size = int(size)
    sc = _Scene(rng, size)
    g = float(np.exp(sc.img_log_scale))
    big = _ground(rng, size).resize((2 * size, 2 * size), Image.BILINEAR)  # drawn at 2x, reduced: AA
    anchors = _roads(rng, size, ImageDraw.Draw(big), g)
    clutter = _clutter(sc, g)

    region = _ignore_region(sc, rng, size) if ignore_regions else None
    n_region = len(sc.objects)
    n = 0 if rng.random() < 0.02 else int(np.clip(np.exp(rng.normal(_COUNT_MU, 0.62)), 5, 90))
    _populate(sc, min(n, size * size // 1200), anchors)

    big = _cast_shadows(big, sc, clutter, rng)
    img = _draw_scene(big, sc, clutter, rng, region)
    return _photometric(img, rng, size), _annotations(sc, region, n_region)


def _ignore_region(sc: _Scene, rng: np.random.Generator, size: int) -> np.ndarray | None:
    """For about a third of the images: an xyxy rectangle filled with small objects (placed now, before
    the regular ones), to be blurred and annotated as ignore; otherwise None."""
    if not (rng.random() < 0.33 and size >= 48):
        return None
    w, h = rng.uniform(0.15, 0.3, 2) * size
    x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
    region = np.array([x, y, x + w, y + h])
    sc.keep_out = sc.inside = region
    saved, sc.img_log_scale = sc.img_log_scale, np.log(0.5)
    _populate(sc, int(rng.integers(3, 12)), [], region)
    sc.img_log_scale, sc.inside = saved, None
    return region


def _cast_shadows(big: Image.Image, sc: _Scene, clutter: list, rng: np.random.Generator) -> Image.Image:
    """Shadows: a 1x mask, softened, darkens the 2x ground under everything drawn afterwards."""
    size = sc.size
    mask = Image.new("L", (size, size), 0)
    md = ImageDraw.Draw(mask)
    for parts in clutter:
        r = _extent(parts[:1])
        _draw(md, parts[:1], 1.0, sc.sun_vec * 0.25 * np.sqrt((r[2] - r[0]) * (r[3] - r[1])), 255)
    for _, out, _, b in sc.objects:
        _draw(md, out, 1.0, sc.sun_vec * (0.5 + 0.12 * np.sqrt((b[2] - b[0]) * (b[3] - b[1]))), 255)
    mask = mask.filter(ImageFilter.BoxBlur(1)).resize(big.size, Image.BILINEAR)
    f = 1 - rng.uniform(0.35, 0.55)
    return Image.composite(big.point([int(v * f) for v in range(256)] * 3), big, mask)


def _draw_scene(
    big: Image.Image, sc: _Scene, clutter: list, rng: np.random.Generator, region: np.ndarray | None
) -> Image.Image:
    """Clutter and objects drawn on the 2x ground, reduced to 1x, sometimes blurred; the ignore region
    blurred and hazed."""
    draw = ImageDraw.Draw(big)
    for parts in clutter:
        _draw(draw, parts)
    for _, out, det, _ in sc.objects:  # in placement order: later objects occlude earlier ones
        _draw(draw, out)
        _draw(draw, det)
    img = big.reduce(2)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 0.8)))
    if region is not None:
        box = tuple(int(v) for v in np.round(region))
        crop = img.crop(box).filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 2.5)))
        img.paste(Image.blend(crop, Image.new("RGB", crop.size, (190, 190, 190)), 0.4), box[:2])
    return img


def _photometric(img: Image.Image, rng: np.random.Generator, size: int) -> np.ndarray:
    """Global photometric change (exposure, colour cast, haze) as one LUT, then sensor noise: uint8."""
    gain = rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, 3)
    haze = rng.uniform(0.1, 0.3) if rng.random() < 0.15 else 0.0
    lut = np.clip(np.arange(256)[None] * gain[:, None] * (1 - haze) + haze * 200 + 0.5, 0, 255)
    out = np.asarray(img.point(lut.astype(np.uint8).ravel().tolist()), np.int16)
    sigma = int(rng.integers(1, 5))
    out = out + ((_noise_tile(rng, size).astype(np.int16) * sigma) >> 4)
    return np.clip(out, 0, 255).astype(np.uint8)


def _annotations(sc: _Scene, region: np.ndarray | None, n_region: int) -> list[dict]:
    """The ignore region once per class inside it (crowd), then every object placed after it."""
    anns = []
    if region is not None:
        x0, y0, x1, y1 = (float(v) for v in region)
        for cls in sorted({o[0] for o in sc.objects[:n_region]}):
            anns.append(
                {"bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": cls + 1, "iscrowd": 1, "ignore": 1}
            )
    for cls, _, _, b in sc.objects[n_region:]:
        bb = [round(float(v), 2) for v in (b[0], b[1], b[2] - b[0], b[3] - b[1])]
        anns.append({"bbox": bb, "category_id": cls + 1, "iscrowd": 0, "ignore": 0})
    return anns


# ----------------------------------------------------------------------------- COCO splits on disk


def _info(split, num_images, size, seed, ignore_regions) -> dict:
    # the description is the format's identity: check_ours looks for "sodlib.synth" in it, so it stays as it
    # is (the module's path is sodlib.data.synth) for existing splits to be recognised
    return {
        "description": "SynthSOD synthetic aerial small-object dataset (sodlib.synth)",
        "generator": GENERATOR_VERSION,
        "seed": int(seed),
        "split": str(split),
        "split_seed": split_seed(seed, split),
        "size": int(size),
        "num_images": int(num_images),
        "ignore_regions": bool(ignore_regions),
    }


def _same_but_count(a: dict | None, b: dict) -> bool:
    drop = ("num_images",)
    return a is not None and {k: v for k, v in a.items() if k not in drop} == {
        k: v for k, v in b.items() if k not in drop
    }


def _load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def annotation_path(out_dir, split: str) -> Path:
    return Path(out_dir) / "annotations" / f"instances_{split}.json"


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # deterministic; no metadata
    return buf.getvalue()


OWNER_MARK = ".synthsod"  # written into every image folder SynthSOD creates


def _written_by_us(name: str) -> bool:
    return name == OWNER_MARK or (len(name) == 10 and name.endswith(".png") and name[:6].isdigit())


def check_ours(out_dir, split: str) -> None:
    """Refuse (ValueError naming the folder) to touch a split that SynthSOD did not write.

    Ours: nothing there yet; an annotation json whose ``info`` SynthSOD wrote; or an image folder holding
    :data:`OWNER_MARK` (a write interrupted between removing the old json and swapping the folders); and in
    any case an image folder holding only the files SynthSOD names (``NNNNNN.png`` and the mark). Anything
    else — a COCO dataset pointed at without ``--set data.dataset=coco``, or a file added to a SynthSOD
    folder — is the user's, and generating there would replace it.
    """
    out_dir = Path(out_dir)
    json_path, folder = annotation_path(out_dir, split), out_dir / "images" / split
    if not json_path.exists() and not folder.exists():
        return
    data = _load_json(json_path) if json_path.exists() else None
    info = data.get("info") if isinstance(data, dict) else None
    ours = isinstance(info, dict) and "sodlib.synth" in str(info.get("description", ""))
    if ours or (folder.is_dir() and (folder / OWNER_MARK).exists()):
        # the json lists what SynthSOD wrote; without it (a write interrupted before the swap), its names do
        listed = {im.get("file_name") for im in data.get("images", [])} | {OWNER_MARK} if ours else None
        mine = (lambda name: name in listed) if ours else _written_by_us
        foreign = sorted(p.name for p in folder.iterdir() if not mine(p.name)) if folder.is_dir() else []
        if foreign:  # regenerating replaces the folder: a file SynthSOD did not write there would be lost
            raise ValueError(
                f"{folder / foreign[0]}: SynthSOD did not write this file ({len(foreign)} such in "
                f"{folder}); nothing was changed. Move your files out, or choose an empty folder"
            )
        return
    raise ValueError(
        f"{out_dir}: images/{split} or annotations/instances_{split}.json exist and SynthSOD did not "
        f"write them; nothing was changed. For your own COCO data add --set data.dataset=coco; for "
        f"SynthSOD choose an empty folder"
    )


def write_split(
    out_dir,
    split: str,
    num_images: int,
    size: int,
    seed: int = 0,
    ignore_regions: bool = False,
    progress: bool = True,
    reuse: bool = False,
) -> Path:
    """Generate a split as ``out_dir/images/<split>/<index:06d>.png`` +
    ``annotations/instances_<split>.json``.

    Crash-safe and resumable: images (and per-image annotation side files) go to hidden partial
    folders first; an interrupted run leaves the previous complete split (or nothing) in place and the
    next run picks up the finished images. When the folders are complete the old json is removed,
    the image folder swapped in with ``os.replace`` and the new json written last (atomically), so a
    json never points at missing images. With ``reuse=True`` (what ``ensure_split`` does) the images
    of an existing split that differs only in ``num_images`` are hard-linked instead of redrawn (the
    prefix property makes them identical). Returns the json path.
    """
    from tqdm.auto import tqdm

    if num_images < 0 or size < 16:
        raise ValueError(f"need num_images >= 0 and size >= 16, got {num_images}, {size}")
    out_dir = Path(out_dir)
    check_ours(out_dir, split)  # before anything is removed
    info = _info(split, num_images, size, seed, ignore_regions)
    json_path = annotation_path(out_dir, split)
    final, partial, side = _split_folders(out_dir, split)
    _start_partial(partial, side, info)
    old_anns, old_n = _old_annotations(json_path, info) if reuse and final.is_dir() else ({}, 0)

    per_image = []
    for index in tqdm(range(num_images), desc=f"SynthSOD {split}", disable=not progress, unit="img"):
        name, side_file = f"{index:06d}.png", side / f"{index:06d}.json"
        anns = _load_json(side_file) if (partial / name).exists() else None
        if anns is None and index < old_n and (final / name).exists():
            _link_or_copy(final / name, partial / name)
            anns = old_anns.get(index, [])
            atomic_write_json(side_file, anns, indent=None)
        if anns is None:
            image, anns = generate_image(image_seed(seed, split, index), size, ignore_regions)
            atomic_write_bytes(partial / name, _png_bytes(image))
            atomic_write_json(side_file, anns, indent=None)  # written after its image: marks it complete
        per_image.append(anns)
    for stale in partial.glob("*.png"):  # left over from a longer interrupted run
        if int(stale.stem) >= num_images:
            stale.unlink()
    _swap_in(out_dir, split, _split_coco(info, per_image, size))
    return json_path


def _start_partial(partial: Path, side: Path, info: dict) -> None:
    """The hidden partial folders of a split being written: kept when they hold the same split (of any
    count), started afresh otherwise."""
    marker = side / "params.json"
    if side.exists() and not _same_but_count(_load_json(marker), info):
        shutil.rmtree(side)
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / OWNER_MARK).touch()
    if not marker.exists():
        atomic_write_json(marker, info)


def _old_annotations(json_path: Path, info: dict) -> tuple[dict[int, list], int]:
    """The annotations per image index of the existing split and its image count, when it differs from
    ``info`` only in the count (its images are then the first ones of the new split); else nothing."""
    old = _load_json(json_path)
    if old is None or not _same_but_count(old.get("info"), info):
        return {}, 0
    old_anns: dict[int, list] = {}
    for a in old["annotations"]:
        old_anns.setdefault(a["image_id"] - 1, []).append(
            {k: a[k] for k in ("bbox", "category_id", "iscrowd", "ignore")}
        )
    return old_anns, len(old["images"])


def _split_coco(info: dict, per_image: list[list[dict]], size: int) -> dict:
    """The COCO dict of a split from each image's annotations (image ids 1..N, file names by index)."""
    images, annotations = [], []
    for index, anns in enumerate(per_image):
        name = f"{index:06d}.png"
        images.append({"id": index + 1, "file_name": name, "width": int(size), "height": int(size)})
        for a in anns:
            w, h = a["bbox"][2:]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": a["category_id"],
                    "bbox": a["bbox"],
                    "area": round(w * h, 2),
                    "iscrowd": a["iscrowd"],
                    "ignore": a["ignore"],
                }
            )
    return {
        "info": info,
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "synthsod"} for i, n in enumerate(CLASSES)],
    }


def _swap_in(out_dir: Path, split: str, coco: dict) -> None:
    """Replace the split by its completed partial folders: the old json removed first, the image folder
    swapped in, the new json written last, so that no json ever points at missing images."""
    json_path = annotation_path(out_dir, split)
    final, partial, side = _split_folders(out_dir, split)
    json_path.unlink(missing_ok=True)  # from here until the json is written no json exists for this split
    trash = out_dir / "images" / f".{split}.old"
    shutil.rmtree(trash, ignore_errors=True)
    if final.exists():
        os.replace(final, trash)
    os.replace(partial, final)
    atomic_write_json(json_path, coco, indent=None)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(side, ignore_errors=True)


def _split_folders(out_dir: Path, split: str) -> tuple[Path, Path, Path]:
    """The image folder of a split, its hidden partial image folder and partial annotation side folder."""
    images = out_dir / "images"
    return images / split, images / f".{split}.partial", out_dir / "annotations" / f".{split}.partial"


def _link_or_copy(src: Path, dst: Path):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _complete(out_dir, split: str, info: dict) -> bool:
    data = _load_json(annotation_path(out_dir, split))
    if data is None or data.get("info") != info:
        return False
    folder = Path(out_dir) / "images" / split
    return all((folder / im["file_name"]).exists() for im in data["images"])


def ensure_split(
    out_dir,
    split: str,
    num_images: int,
    size: int,
    seed: int = 0,
    ignore_regions: bool = False,
    progress: bool = True,
) -> Path:
    """Return the json path of a split, generating it only when it is missing, incomplete or its
    ``info`` does not match the requested parameters. Safe to call from several processes at once."""
    info = _info(split, num_images, size, seed, ignore_regions)
    if _complete(out_dir, split, info):
        return annotation_path(out_dir, split)
    # a folder of someone else's files is refused before the lock file is made
    check_ours(Path(out_dir), split)
    # processes that need the same split at once (parallel trainings, test workers) generate it once
    with file_lock(Path(out_dir) / f".{split}.lock"):
        if _complete(out_dir, split, info):  # another process finished it while this one waited
            return annotation_path(out_dir, split)
        return write_split(out_dir, split, num_images, size, seed, ignore_regions, progress, reuse=True)

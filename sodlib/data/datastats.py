"""Box statistics of COCO-style detection datasets (SynthSOD, SODA-D, converted VisDrone).

``box_stats`` gives one row per box; ``plot_stats`` draws the size and density histograms that the
small-object literature reports (sqrt(area) on log-spaced bins with the 16 px / 32 px marks, objects
per image, boxes per class) and returns the headline numbers; ``format_stats`` prints them.
Crowd / ignore annotations are regions, not objects, and are left out everywhere.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sodlib.io import atomic_write_bytes, read_json


def _load(path) -> dict:

    return read_json(path, "COCO annotation")


def _resolve(paths) -> list[Path]:
    """Json files from paths or dataset folders (``<dir>/annotations/instances_*.json`` or
    ``<dir>/*.json``)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            hits = sorted((p / "annotations").glob("instances_*.json")) or sorted(p.glob("*.json"))
            if not hits:
                raise FileNotFoundError(f"{p}: no annotations/instances_*.json or *.json inside")
            found += hits
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such annotation file or folder")
    return found


def _is_object(a: dict) -> bool:
    return not a.get("iscrowd", 0) and not a.get("ignore", 0)


def box_stats(ann_json_path):
    """One row per (non-crowd, non-ignore) box: image_id, category (name), w, h, area (w*h), sqrt_area.

    ``ann_json_path`` may also be an already loaded COCO dict.
    """
    import pandas as pd

    coco = ann_json_path if isinstance(ann_json_path, dict) else _load(ann_json_path)
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    rows = [
        (a["image_id"], names.get(a["category_id"], str(a["category_id"])), *a["bbox"][2:4])
        for a in coco["annotations"]
        if _is_object(a)
    ]
    df = pd.DataFrame(rows, columns=["image_id", "category", "w", "h"]).astype({"w": float, "h": float})
    df["area"] = df["w"] * df["h"]
    df["sqrt_area"] = np.sqrt(df["area"])
    return df


def summarize(cocos: list[dict]) -> dict:
    """Headline numbers over one or more COCO dicts (image ids are taken per file)."""
    counts, sqrt_areas, per_class = [], [], {}
    for coco in cocos:
        names = {c["id"]: c["name"] for c in coco.get("categories", [])}
        for n in names.values():
            per_class.setdefault(n, 0)
        per_image = {im["id"]: 0 for im in coco["images"]}
        for a in coco["annotations"]:
            if not _is_object(a):
                continue
            per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
            name = names.get(a["category_id"], str(a["category_id"]))
            per_class[name] = per_class.get(name, 0) + 1
            sqrt_areas.append(float(np.sqrt(a["bbox"][2] * a["bbox"][3])))
        counts += list(per_image.values())
    s, c = np.asarray(sqrt_areas), np.asarray(counts)
    return {
        "num_images": int(c.size),
        "num_boxes": int(s.size),
        "frac_under_16": float((s < 16).mean()) if s.size else 0.0,  # area < 16²
        "frac_under_32": float((s < 32).mean()) if s.size else 0.0,  # area < 32²
        "median_sqrt_area": float(np.median(s)) if s.size else 0.0,
        "mean_per_image": float(c.mean()) if c.size else 0.0,
        "max_per_image": int(c.max()) if c.size else 0,
        "frac_empty_images": float((c == 0).mean()) if c.size else 0.0,
        "per_class": per_class,
        "_sqrt_areas": s,
        "_counts": c,
    }


def plot_stats(ann_json_paths_or_dirs, out_png, title: str | None = None) -> dict:
    """Box-size, objects-per-image and per-class histograms in one PNG (written atomically).

    Returns the summary numbers: num_images, num_boxes, frac_under_16, frac_under_32,
    median_sqrt_area, mean_per_image, max_per_image, frac_empty_images, per_class.
    """
    from matplotlib.backends.backend_agg import (
        FigureCanvasAgg,  # no pyplot: never touches the session backend
    )
    from matplotlib.figure import Figure

    paths = _resolve(ann_json_paths_or_dirs)
    summary = summarize([_load(p) for p in paths])
    s, c = summary.pop("_sqrt_areas"), summary.pop("_counts")

    fig = Figure(figsize=(13, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    hi = max(64.0, float(s.max()) * 1.05) if s.size else 64.0
    ax1.hist(
        s, bins=np.geomspace(max(1.0, float(s.min()) * 0.95) if s.size else 1.0, hi, 40), color="#4C72B0"
    )
    ax1.set_xscale("log")
    for px, lab in ((16, "16 px"), (32, "32 px")):
        ax1.axvline(px, color="#C44E52", ls="--", lw=1)
        ax1.text(px, 0.97, f" {lab}", color="#C44E52", transform=ax1.get_xaxis_transform(), va="top")
    ax1.set(
        xlabel="box sqrt(area) [px]",
        ylabel="boxes",
        title=f"<16²: {summary['frac_under_16']:.0%}   <32²: {summary['frac_under_32']:.0%}",
    )
    top = int(c.max()) if c.size else 1
    ax2.hist(c, bins=np.linspace(-0.5, top + 0.5, min(top + 1, 40) + 1), color="#55A868")
    ax2.set(
        xlabel="objects per image",
        ylabel="images",
        title=f"mean {summary['mean_per_image']:.1f}, max {summary['max_per_image']}",
    )
    names = list(summary["per_class"])
    ax3.bar(range(len(names)), [summary["per_class"][n] for n in names], color="#8172B2")
    ax3.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax3.set(ylabel="boxes", title=f"{summary['num_boxes']} boxes / {summary['num_images']} images")
    fig.suptitle(title or ", ".join(p.name for p in paths), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out_png, buf.getvalue())
    return summary


def format_stats(summary: dict) -> str:
    """Human-readable multi-line rendering of a ``plot_stats`` summary."""
    median = summary.get("median_sqrt_area", float("nan"))
    lines = [
        f"images: {summary['num_images']}   boxes: {summary['num_boxes']}",
        (
            f"area < 16²: {summary['frac_under_16']:.1%}   area < 32²: {summary['frac_under_32']:.1%}   "
            f"median sqrt(area): {median:.1f} px"
        ),
        (
            f"objects / image: mean {summary['mean_per_image']:.1f}, max {summary['max_per_image']}, "
            f"empty images {summary.get('frac_empty_images', 0.0):.1%}"
        ),
        "per class: " + ", ".join(f"{k} {v}" for k, v in summary["per_class"].items()),
    ]
    return "\n".join(lines)


def min_instance_size_px(dataset, image_size: int) -> float:
    """sqrt of the smallest positive gt area after the square resize to ``image_size`` (pixels, a length).

    ``dataset``: a :class:`~sodlib.data.datasets.CocoDetection` (its training annotations: no crowd, no
    ignore) or a COCO dict (non-crowd, non-ignore annotations).
    """
    coco = dataset if isinstance(dataset, Mapping) else dataset.coco
    sizes = {im["id"]: (float(im["width"]), float(im["height"])) for im in coco["images"]}
    if isinstance(dataset, Mapping):
        anns = [a for a in coco["annotations"] if not a.get("iscrowd", 0) and not a.get("ignore", 0)]
    else:
        anns = [a for i in range(len(dataset)) for a in dataset.training_annotations(i)]
    best = float("inf")
    for a in anns:
        w, h = sizes[a["image_id"]]
        area = a["bbox"][2] * a["bbox"][3] * (image_size / w) * (image_size / h)
        if area > 0:
            best = min(best, area)
    if best == float("inf"):
        raise ValueError("min_instance_size_px: the dataset has no box of positive area")
    return best**0.5

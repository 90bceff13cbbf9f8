"""Inference: evaluate a model on a dataset, load a checkpoint for prediction, sliced prediction."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from sodlib.build import build_detector
from sodlib.checkpoints import load_checkpoint
from sodlib.config import RunConfig
from sodlib.data.datasets import collate_fn
from sodlib.data.tiling import tile_windows
from sodlib.evaluation.protocols import evaluate
from sodlib.io import atomic_write_bytes, atomic_write_json
from sodlib.models.detector import eval_mode, postprocess, to_coco_results

log = logging.getLogger(__name__)


def post_nms_iou(model: nn.Module) -> float:
    """The post-processing NMS IoU of a detector built from a config (``model.post_nms``; 0 = none, also for a
    detector assembled by hand, whose ``config`` is None)."""
    return float(model.config.post_nms) if model.config is not None else 0.0


@torch.no_grad()
def predict_dataset(
    model: nn.Module, dataset, device="cpu", batch_size: int = 8, num_top: int = 100, progress: bool = False
) -> list[dict]:
    """COCO results (pixels of the source images) for every image of ``dataset``."""

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    results = []
    with eval_mode(model):
        for images, targets in tqdm(loader, desc="predict", disable=not progress, dynamic_ncols=True):
            outputs = model(images.to(device))
            sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
            processed = postprocess(outputs, sizes, num_top=num_top, nms_iou=post_nms_iou(model))
            results += to_coco_results(processed, [int(t["image_id"]) for t in targets], dataset.category_ids)
    return results


def evaluate_model(
    model: nn.Module,
    dataset,
    protocol: str = "coco",
    device="cpu",
    batch_size: int = 8,
    num_top: int | None = None,
):
    """(metrics, detections) of ``model`` on ``dataset`` under an evaluation protocol.

    ``num_top``: (query, class) pairs kept per image; None = the protocol's default (coco 100, sodad 300,
    visdrone 500). RT-DETR's own evaluation keeps 300 for COCO (pycocotools' maxDets 100 then applies per
    image and class).
    """

    if num_top is None:
        num_top = 500 if protocol == "visdrone" else 300 if protocol == "sodad" else 100
    dets = predict_dataset(model, dataset, device, batch_size, num_top=num_top)
    return evaluate(dataset.coco, dets, protocol=protocol), dets


def load_model(checkpoint: str | Path, device="cpu", use_ema: bool = True, with_categories: bool = False):
    """The detector stored in a checkpoint (EMA weights when present), its RunConfig (and categories).

    A file that is not a sodlib checkpoint (truncated, a foreign pickle, no config, shapes that do not fit)
    raises a one-line ValueError naming it."""

    try:
        state = load_checkpoint(checkpoint, map_location=device)
        cfg = RunConfig.from_dict(state["config"])
        model = build_detector(cfg.model).to(device)
        weights = state["ema"]["module"] if use_ema and state.get("ema") else state["model"]
        model.load_state_dict(weights)
    except FileNotFoundError:
        raise
    except Exception as exc:  # a truncated file, a foreign pickle, a state dict without config, other shapes
        raise ValueError(
            f"{checkpoint}: not a sodlib checkpoint ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0]})"
        ) from exc
    if with_categories:
        cats = state.get("categories") or [
            {"id": i + 1, "name": str(i + 1)} for i in range(cfg.model.num_classes)
        ]
        return model.eval(), cfg, cats
    return model.eval(), cfg


MIN_SLICE_PX = 32  # the smallest --slice window: the coarsest feature stride


def output_names(paths, suffix: str) -> list[str]:
    """``<stem><suffix>`` per input path, made unique: a repeated stem (``a/x.png``, ``b/x.png``) gets ``_2``,
    ``_3``, ... (the first free one, so ``c/x_2.png`` after them becomes ``x_2_2``): no output replaces
    another."""
    taken: set[str] = set()
    names = []
    for path in paths:
        stem, k = Path(path).stem, 1
        name = f"{stem}{suffix}"
        while name in taken:
            k += 1
            name = f"{stem}_{k}{suffix}"
        taken.add(name)
        names.append(name)
    return names


def read_image_rgb(path: str | Path) -> torch.Tensor:
    """uint8 [3, H, W], as training reads images (:func:`sodlib.data.datasets.rgb8`: a 16-bit image keeps its
    top 8 bits); a missing or unreadable file raises an error naming it."""
    from torchvision.io import ImageReadMode, decode_image

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the image files (e.g. {path}/*.jpg)")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        raise ValueError(f"cannot decode image {path}: {exc}") from exc
    if image.ndim == 4:  # an animated image: its first frame, as training's image reader takes
        warnings.warn(f"{path}: {image.shape[0]} frames; the first is used", stacklevel=2)
        image = image[0]
    if image.dtype == torch.uint16:
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    if image.dtype != torch.uint8:
        raise ValueError(f"cannot read image {path}: {image.dtype} pixels; give an 8- or 16-bit image")
    return image


@torch.no_grad()
def predict_image(
    model: nn.Module,
    image_uint8: torch.Tensor,
    image_size: int,
    slice_size: int | None = None,
    overlap: float = 0.2,
    num_top: int = 100,
    nms_iou: float = 0.5,
    batch_size: int = 8,
) -> dict:
    """Detections (``boxes_xyxy`` in pixels, ``scores``, ``labels``) for one image.

    With ``slice_size`` the image is cut into overlapping windows (``overlap`` × slice), each window is
    resized to the model's working size, and the window detections are mapped back and merged with
    per-class NMS (sliced inference for large drone images).
    """
    from torchvision.ops import batched_nms

    device = next(model.parameters()).device
    _, h, w = image_uint8.shape
    if slice_size and slice_size < MIN_SLICE_PX:
        raise ValueError(
            f"--slice {slice_size}: a window must be at least {MIN_SLICE_PX} px (one cell of the "
            f"coarsest feature level); windows are resized to {image_size} px"
        )
    if slice_size and (h > slice_size or w > slice_size):
        windows = tile_windows(w, h, slice_size, round(overlap * slice_size))
    else:
        windows = [(0, 0, w, h)]
    image = image_uint8.to(device).float().div_(255)
    boxes, scores, labels = [], [], []
    starts = range(0, len(windows), batch_size)
    for i in tqdm(starts, desc="windows", disable=len(starts) < 8, leave=False, dynamic_ncols=True):
        chunk = windows[i : i + batch_size]
        crops = [
            nn.functional.interpolate(
                image[None, :, y0:y1, x0:x1],
                size=(image_size, image_size),
                mode="bilinear",
                align_corners=False,
            )
            for x0, y0, x1, y1 in chunk
        ]
        sizes = torch.tensor([[y1 - y0, x1 - x0] for x0, y0, x1, y1 in chunk], device=device)
        processed = postprocess(model(torch.cat(crops)), sizes, num_top=num_top, nms_iou=post_nms_iou(model))
        for (x0, y0, _, _), det in zip(chunk, processed):
            shift = torch.tensor([x0, y0, x0, y0], device=device, dtype=det["boxes_xyxy"].dtype)
            boxes.append(det["boxes_xyxy"] + shift)
            scores.append(det["scores"])
            labels.append(det["labels"])
    boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    if len(windows) > 1:
        keep = batched_nms(boxes, scores, labels, nms_iou)[:num_top]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    return {"boxes_xyxy": boxes.cpu(), "scores": scores.cpu(), "labels": labels.cpu()}


def predict_files(
    checkpoint: str | Path,
    images: list[str | Path],
    out_dir: str | Path,
    device="cpu",
    slice_size: int | None = None,
    overlap: float = 0.2,
    score_thr: float = 0.3,
) -> Path:
    """Predict on image files; write ``predictions.json`` (COCO results + an image list) and drawn PNGs."""
    from torchvision.io import encode_png
    from torchvision.utils import draw_bounding_boxes

    model, cfg, categories = load_model(checkpoint, device, with_categories=True)
    out_dir = Path(out_dir)
    names = [c["name"] for c in categories]
    results, image_records = [], []
    drawn_names = output_names(images, "_pred.png")
    for path in images:  # every input decodes before the first file is written
        read_image_rgb(path)
    for image_id, path in enumerate(tqdm(images, desc="predict", dynamic_ncols=True), start=1):
        img = read_image_rgb(path)
        det = predict_image(
            model, img, cfg.data.image_size, slice_size, overlap, num_top=500 if slice_size else 100
        )
        image_records.append(
            {"id": image_id, "file_name": str(path), "height": img.shape[1], "width": img.shape[2]}
        )
        for b, s, lab in zip(det["boxes_xyxy"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": categories[lab]["id"],
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "score": s,
                }
            )
        keep = det["scores"] >= score_thr
        drawn = draw_bounding_boxes(
            img,
            det["boxes_xyxy"][keep],
            labels=[names[i] for i in det["labels"][keep]],
            colors="red",
            width=1,
        )
        atomic_write_bytes(out_dir / drawn_names[image_id - 1], encode_png(drawn).numpy().tobytes())
    return atomic_write_json(out_dir / "predictions.json", {"images": image_records, "detections": results})

"""SAHI driving sodlib detectors: a ``sahi.models.base.DetectionModel`` for sodlib checkpoints (``pip install
sodlib[sahi]``), and the comparison of SAHI's sliced prediction with ``sodlib predict --slice``.

::

    from sahi.predict import get_sliced_prediction

    model = SodlibDetectionModel(
        model_path="results/runs/<hash>/checkpoints/last.pt", confidence_threshold=0.05
    )
    result = get_sliced_prediction("image.jpg", model, slice_height=640, slice_width=640,
                                   overlap_height_ratio=0.2, overlap_width_ratio=0.2)

Each slice SAHI hands over (an RGB ``H × W × 3`` array) is resized to the run's working size, as
``sodlib predict`` does with its windows, and the detector's top ``num_top`` (query, class) pairs above the
confidence threshold come back in the slice's pixels; SAHI shifts and merges them.

:func:`compare_sliced` runs both pipelines with the same checkpoint, slice size and overlap on a set of images
and reports detection counts, AP under a protocol, and seconds: what decides which one ``predict --slice``
uses (results/tables/sahi_vs_predict_slice.csv, README).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from sodlib.evaluation.protocols import evaluate
from sodlib.inference.predict import load_model, predict_image, read_image_rgb
from sodlib.models.detector import postprocess

try:
    from sahi.models.base import DetectionModel
    from sahi.prediction import ObjectPrediction
except ImportError as exc:  # pragma: no cover - the dev environment has sahi
    raise ImportError("sodlib.inference.sahi needs SAHI: pip install 'sodlib[sahi]'") from exc

__all__ = ["SodlibDetectionModel", "compare_sliced"]


class SodlibDetectionModel(DetectionModel):
    """A sodlib checkpoint (``model_path``) or detector (``model=``, with ``image_size=``) as a SAHI model.

    ``category_mapping`` defaults to the checkpoint's categories (``{"0": "pedestrian", ...}``: SAHI's
    category id is sodlib's 0-based label; :attr:`category_ids` maps it back to the dataset's ids).
    """

    num_top = 100

    def load_model(self) -> None:

        model, cfg, categories = load_model(self.model_path, device=str(self.device), with_categories=True)
        self.image_size = self.image_size or cfg.data.image_size
        self._set(model, categories)

    def set_model(self, model, **kwargs) -> None:
        if self.image_size is None:
            raise ValueError(
                "SodlibDetectionModel(model=...) needs image_size= (the detector's working size)"
            )
        config = getattr(model, "config", None)
        categories = kwargs.get("categories") or [
            {"id": i + 1, "name": str(i + 1)} for i in range(config.num_classes if config else 0)
        ]
        self._set(model, categories)

    def _set(self, model, categories) -> None:
        self.model = model.eval().to(self.device)
        self.category_ids = [int(c["id"]) for c in categories]
        if self.category_mapping is None:
            self.category_mapping = {str(i): str(c["name"]) for i, c in enumerate(categories)}

    @property
    def num_categories(self) -> int:
        return len(self.category_mapping or {})

    @property
    def has_mask(self) -> bool:
        return False

    @property
    def category_names(self) -> list[str]:
        return list((self.category_mapping or {}).values())

    @torch.no_grad()
    def perform_inference(self, image: np.ndarray) -> None:

        h, w = image.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float().div_(255)
        x = torch.nn.functional.interpolate(
            x[None].to(self.device),
            size=(self.image_size, self.image_size),
            mode="bilinear",
            align_corners=False,
        )
        config = getattr(self.model, "config", None)
        det = postprocess(
            self.model(x), [[h, w]], num_top=self.num_top, nms_iou=float(getattr(config, "post_nms", 0.0))
        )[0]
        self._original_predictions = {k: v.cpu() for k, v in det.items()}

    def _create_object_prediction_list_from_original_predictions(
        self, shift_amount_list=((0, 0),), full_shape_list=None
    ) -> None:
        det = self._original_predictions

        def first(pairs):  # SAHI passes [[a, b], ...] or, for one image, [a, b]
            if not pairs:
                return None
            return list(pairs[0]) if isinstance(pairs[0], (list, tuple)) else list(pairs)

        shift, full = first(shift_amount_list) or [0, 0], first(full_shape_list)
        keep = det["scores"] > self.confidence_threshold
        predictions = []
        for box, score, label in zip(
            det["boxes_xyxy"][keep].tolist(), det["scores"][keep].tolist(), det["labels"][keep].tolist()
        ):
            predictions.append(
                ObjectPrediction(
                    bbox=box,
                    category_id=int(label),
                    category_name=(self.category_mapping or {}).get(str(label), ""),
                    score=score,
                    shift_amount=shift,
                    full_shape=full,
                )
            )
        self._object_prediction_list_per_image = [predictions]


# the pipelines compare_sliced runs: None is ``sodlib predict --slice``, a dict the options of SAHI's
# get_sliced_prediction
_PIPELINES = {
    "sodlib predict --slice": None,
    "SAHI, sodlib's merge (NMS IoU 0.5, slices only)": {
        "perform_standard_pred": False,
        "postprocess_type": "NMS",
        "postprocess_match_metric": "IOU",
        "postprocess_match_threshold": 0.5,
    },
    "SAHI defaults (greedy NMM IoS 0.5, + full image)": {"force_postprocess_type": True},
}


def compare_sliced(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    gt: dict | str | Path,
    slice_size: int,
    overlap: float = 0.2,
    score_thr: float = 0.05,
    protocol: str = "visdrone",
    max_det: int = 500,
) -> list[dict]:
    """``sodlib predict --slice`` and SAHI's ``get_sliced_prediction`` (NMS on IoU 0.5 per class, no
    full-image pass: sodlib's merge; and SAHI's defaults: greedy NMM on IoS 0.5 plus a full-image pass) on
    ``images`` with the same checkpoint, slice and overlap (``slice_size`` 0 = the checkpoint's working
    size). ``gt``: COCO dict or json path whose ``file_name`` s end in the images' names. Rows: pipeline,
    detections, AP, AP50 (``protocol``), seconds, and ``agreement``: the share of ``predict --slice``'s
    detections that the pipeline also returns (same image and class, IoU >= 0.9), slice_size."""
    model, cfg, categories = load_model(checkpoint, with_categories=True)
    slice_size = slice_size or cfg.data.image_size
    label_to_id = [int(c["id"]) for c in categories]
    if not isinstance(gt, dict):
        gt = json.loads(Path(gt).read_text())
    by_name = {Path(im["file_name"]).name: im["id"] for im in gt["images"]}
    sahi_model = SodlibDetectionModel(
        model=model, image_size=cfg.data.image_size, confidence_threshold=score_thr, load_at_init=True
    )
    sahi_model.category_ids = label_to_id
    sahi_model.num_top = max_det  # per slice, as predict_image keeps per window
    rows, reference = [], []
    for name, options in _PIPELINES.items():
        if options is None:
            detect = partial(
                _predict_slice,
                model=model,
                image_size=cfg.data.image_size,
                slice_size=slice_size,
                overlap=overlap,
                score_thr=score_thr,
                max_det=max_det,
            )
        else:
            detect = partial(
                _sahi_sliced, model=sahi_model, slice_size=slice_size, overlap=overlap, options=options
            )
        detect(images[0])  # warm-up: first-call costs (imports, allocator) are not the pipeline's
        dets, seconds = _timed_detections(detect, images, by_name, label_to_id, max_det)
        metrics = evaluate(gt, dets, protocol=protocol) if dets else {"AP": 0.0, "AP50": 0.0}
        reference = reference if rows else dets
        rows.append(
            {
                "pipeline": name,
                "slice_size": slice_size,
                "detections": len(dets),
                "AP": metrics["AP"],
                "AP50": metrics["AP50"],
                "seconds": seconds,
                "agreement": _agreement(reference, dets),
            }
        )
    return rows


def _predict_slice(
    path, model, image_size: int, slice_size: int, overlap: float, score_thr: float, max_det: int
):
    """``sodlib predict --slice`` on one image: (xyxy, score, label) above ``score_thr``."""
    det = predict_image(model, read_image_rgb(path), image_size, slice_size, overlap, num_top=max_det)
    keep = det["scores"] > score_thr
    return zip(det["boxes_xyxy"][keep].tolist(), det["scores"][keep].tolist(), det["labels"][keep].tolist())


def _sahi_sliced(path, model, slice_size: int, overlap: float, options: dict) -> list:
    """SAHI's ``get_sliced_prediction`` with ``options`` on one image: (xyxy, score, label)."""
    from sahi.predict import get_sliced_prediction

    result = get_sliced_prediction(
        str(path),
        model,
        slice_height=slice_size,
        slice_width=slice_size,
        overlap_height_ratio=overlap,
        overlap_width_ratio=overlap,
        verbose=0,
        **options,
    )
    return [(p.bbox.to_xyxy(), p.score.value, p.category.id) for p in result.object_prediction_list]


def _timed_detections(
    detect, images: Sequence[str | Path], by_name: dict, label_to_id: list[int], max_det: int
) -> tuple[list[dict], float]:
    """``detect`` on every image as COCO results (the ``max_det`` best per image), and the seconds it took."""
    dets, t0 = [], time.perf_counter()
    for path in images:
        image_id = by_name[Path(path).name]
        ranked = sorted(detect(path), key=lambda t: -t[1])[:max_det]
        dets += [
            {
                "image_id": image_id,
                "category_id": label_to_id[int(lab)],
                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                "score": float(s),
            }
            for b, s, lab in ranked
        ]
    return dets, time.perf_counter() - t0


def _agreement(reference: list[dict], other: list[dict], iou: float = 0.9) -> float:
    """Share of ``reference`` detections with a detection in ``other`` of the same image and class at
    IoU >= iou."""
    from torchvision.ops import box_iou

    if not reference:
        return float("nan")

    def group(dets):
        out: dict[tuple[int, int], list] = {}
        for d in dets:
            x, y, w, h = d["bbox"]
            out.setdefault((d["image_id"], d["category_id"]), []).append([x, y, x + w, y + h])
        return {k: torch.tensor(v) for k, v in out.items()}

    ref, oth = group(reference), group(other)
    matched = sum(
        int((box_iou(boxes, oth[k]).max(1).values >= iou).sum()) for k, boxes in ref.items() if k in oth
    )
    return matched / len(reference)

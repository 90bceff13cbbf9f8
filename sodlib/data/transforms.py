"""RT-DETR's data pipelines on ``torchvision.transforms.v2``.

A pipeline is called as ``image, target = tf(image, target)`` with ``image`` a PIL image or a
(``tv_tensors.Image``) uint8 tensor ``[3, H, W]`` and ``target = {"boxes": tv_tensors.BoundingBoxes
(any format, pixels), "labels": LongTensor[N]}``. It returns a float image in [0, 1] and ``boxes`` as a
plain float tensor ``[N, 4]`` in cxcywh normalised by the output image size (what the detector and the
matcher consume); ``labels`` are filtered together with the boxes.

Train (``augment=True``), as RT-DETR's ``rtdetr_r50vd`` recipe:
``RandomPhotometricDistort(p=0.5) → RandomZoomOut(fill=0, p=0.5) → RandomIoUCrop (applied with p=0.8)
→ SanitizeBoundingBoxes → RandomHorizontalFlip → Resize((S, S)) → SanitizeBoundingBoxes → ToDtype(float32,
scale=True) → ConvertBoundingBoxFormat(CXCYWH) → NormalizeBoxes``.
Eval: ``Resize((S, S)) → ToDtype → convert → normalise``; train with ``augment=False`` is the same with a
``SanitizeBoundingBoxes`` after the resize. ``SanitizeBoundingBoxes`` drops boxes smaller than 1 px and their
labels.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


class NormalizeBoxes(v2.Transform):
    """Bounding boxes → plain float tensor in cxcywh, divided by (W, H, W, H) of their canvas.

    Returns a plain tensor (not ``BoundingBoxes``): normalised values no longer live on a pixel canvas,
    so this must be the last step of a pipeline.
    """

    _transformed_types = (tv_tensors.BoundingBoxes,)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:  # torchvision >= 0.21 name
        boxes = F.convert_bounding_box_format(inpt, new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
        h, w = boxes.canvas_size
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=boxes.device)
        return boxes.as_subclass(torch.Tensor).float() / scale

    _transform = transform  # older torchvision (< 0.21) calls _transform


class SafeRandomIoUCrop(v2.RandomIoUCrop):
    """``RandomIoUCrop`` that leaves samples without boxes unchanged.

    (torchvision's version keeps drawing crops until it samples the "no crop" option when there is no box
    to satisfy, which wastes time on empty images.)
    """

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        boxes = [x for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes)]
        if not boxes or boxes[0].numel() == 0:
            return {}
        return super().make_params(flat_inputs)


def build_transforms(image_size: int, train: bool, augment: str | bool = "rtdetr") -> v2.Compose:
    """The v2 pipeline of the module docstring for a square working size ``image_size``.

    ``augment`` (train only): ``"rtdetr"`` = photometric distort, zoom-out, IoU crop, flip (RT-DETR's
    recipe); ``"flip"`` = horizontal flip only (short CPU schedules: zoom-out shrinks objects that are
    already a few pixels wide); ``"none"``. ``True``/``False`` mean ``"rtdetr"``/``"none"``.
    """
    if isinstance(augment, bool):
        augment = "rtdetr" if augment else "none"
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    size = (int(image_size), int(image_size))
    steps: list = [v2.ToImage()]
    if train and augment == "rtdetr":
        steps += [
            v2.RandomPhotometricDistort(p=0.5),
            v2.RandomZoomOut(fill=0, p=0.5),
            v2.RandomApply([SafeRandomIoUCrop()], p=0.8),
            v2.SanitizeBoundingBoxes(),
        ]
    if train and augment in ("rtdetr", "flip"):
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    steps.append(v2.Resize(size, antialias=True))
    if train:
        steps.append(v2.SanitizeBoundingBoxes())
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.ConvertBoundingBoxFormat(tv_tensors.BoundingBoxFormat.CXCYWH),
        NormalizeBoxes(),
    ]
    return v2.Compose(steps)


def basic_transforms() -> v2.Compose:
    """No resize, no augmentation: float image in [0, 1] and normalised cxcywh boxes."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.ConvertBoundingBoxFormat(tv_tensors.BoundingBoxFormat.CXCYWH),
            NormalizeBoxes(),
        ]
    )


AUGMENTATIONS = ("rtdetr", "flip", "none")

__all__ = ["AUGMENTATIONS", "NormalizeBoxes", "SafeRandomIoUCrop", "basic_transforms", "build_transforms"]

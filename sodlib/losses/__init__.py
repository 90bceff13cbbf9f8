"""Objectives: the Hungarian matcher, RT-DETR's set criterion, paper A's terms (Scale-aligned Target, Sample
Reweighting, Sample Points Refinement) and MRQM's (IoU-aware head, auxiliary queries), and the formulas they
are built from (:mod:`sodlib.losses.formulas`, importable from here: ``from sodlib.losses import
scale_aligned_target``).

May import: :mod:`sodlib.config`, :mod:`sodlib.box_ops` and this package; criteria see model outputs
(dicts of tensors), never model classes. Which criterion a config gets is decided in :mod:`sodlib.build`.
"""

from sodlib.losses.formulas import (
    giou_box_loss,
    l1_box_loss,
    quality_focal_loss,
    reweight_factor,
    scale_aligned_quality,
    scale_aligned_target,
    spr_attention_loss,
    spr_offset_loss,
    task_aligned_loss,
    task_aligned_target,
    varifocal_loss,
)

__all__ = [
    "giou_box_loss",
    "l1_box_loss",
    "quality_focal_loss",
    "reweight_factor",
    "scale_aligned_quality",
    "scale_aligned_target",
    "spr_attention_loss",
    "spr_offset_loss",
    "task_aligned_loss",
    "task_aligned_target",
    "varifocal_loss",
]

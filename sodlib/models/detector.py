"""RT-DETR as plain composition (backbone → encoder → decoder) and its post-processing (built by
:mod:`sodlib.build`).

Output contract of ``RTDETR.forward(images, targets=None, return_sampling=False, return_hidden=False)``:

* always: ``pred_logits`` [B, Q, num_classes] (sigmoid scores), ``pred_boxes`` [B, Q, 4] normalised
  (cx, cy, w, h) of the last decoder layer;
* training mode: ``aux_outputs`` (list of dicts ``pred_logits``/``pred_boxes`` for layers 0..L-2),
  ``enc_outputs`` (dict for the Q selected encoder proposals, before refinement), ``enc_dense_outputs``
  (the same for every token queries may be selected from: ``loss.enc_o2m``'s input), and, when targets
  were given and denoising is on, ``dn_outputs`` (list of L dicts over the denoising queries) and
  ``dn_meta`` (``dn_positive_idx``, ``dn_num_group``, ``dn_num_split``; see ``sodlib.models.denoising``);
* ``return_sampling=True``: every layer dict (aux, dn and the top level) also has
  ``sampling_locations`` [B, Q, heads, levels, points, 2], ``attention_weights`` [B, Q, heads, levels,
  points] and ``ref_boxes`` [B, Q, 4]; ``return_hidden=True``: ``hidden_cls`` and ``hidden_reg`` [B, Q, C].
  In eval mode the per-layer dicts are returned as ``layers`` (L dicts). The flags never change
  ``pred_logits`` / ``pred_boxes``.
* MRQM's IoU-aware head (``model.iah``; training mode with targets only): ``iah_outputs`` (dense head
  outputs and its one-to-many assignment), ``aux_query_outputs`` (L dicts over the auxiliary positive
  queries) and ``aux_query_indices``; see :class:`sodlib.models.iou_head.IoUAwareHead`. The head is a
  submodule (``aux_head``) but eval-mode forward never calls it: predictions and their graph are the same as
  without it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_convert

from sodlib.config import ModelConfig

__all__ = ["RTDETR", "eval_mode", "postprocess", "to_coco_results"]


class RTDETR(nn.Module):
    """backbone → encoder → decoder (the decoder builds the output dict; see the module docstring).

    ``aux_head`` (optional, training only): called with the decoder memory when training with targets,
    its outputs are added to the dict (MRQM's :class:`~sodlib.models.iou_head.IoUAwareHead`); ``None``
    registers nothing, so the state dict is the baseline's. Eval-mode forward never calls it; to deploy
    without its parameters, build with ``model.iah=false`` and load the state dict without the ``aux_head.``
    keys.
    """

    def __init__(
        self,
        backbone: nn.Module,
        encoder: nn.Module,
        decoder: nn.Module,
        aux_head: nn.Module | None = None,
        config: ModelConfig | None = None,
    ):
        super().__init__()
        self.backbone, self.encoder, self.decoder = backbone, encoder, decoder
        self.aux_head = aux_head
        self.config = config  # the ModelConfig it was built from (None when assembled by hand)

    def forward(
        self,
        images: Tensor,
        targets: list[dict[str, Tensor]] | None = None,
        return_sampling: bool = False,
        return_hidden: bool = False,
    ) -> dict:
        feats = self.encoder(self.backbone(images))
        if not (self.training and targets is not None and self.aux_head is not None):
            return self.decoder(
                feats,
                targets if self.training else None,
                return_sampling=return_sampling,
                return_hidden=return_hidden,
            )
        memory, shapes = self.decoder.memory(feats)
        out = self.decoder.forward_memory(memory, shapes, targets, return_sampling, return_hidden)
        out.update(
            self.aux_head_outputs(
                memory, shapes, targets, tuple(images.shape[-2:]), return_sampling, return_hidden
            )
        )
        return out

    def aux_head_outputs(
        self,
        memory: Tensor,
        shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
        image_hw: tuple[int, int],
        return_sampling: bool = False,
        return_hidden: bool = False,
    ) -> dict:
        """The auxiliary head on the decoder memory: it gets the decoder's token anchors (fp32) and its
        ``decode_queries`` explicitly, nothing else of the decoder."""
        anchors, valid = self.decoder.anchors(shapes, memory.device, torch.float32)
        return self.aux_head(
            memory,
            shapes,
            targets,
            anchors=anchors,
            valid=valid,
            decode=self.decoder.decode_queries,
            image_hw=image_hw,
            return_sampling=return_sampling,
            return_hidden=return_hidden,
        )


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode for the block and give each back the mode it had, so that whoever
    evaluates or inspects a model never leaves its caller's training mode changed."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


@torch.no_grad()
def postprocess(
    outputs: dict, orig_sizes_hw: Tensor | Sequence[Sequence[int]], num_top: int = 100, nms_iou: float = 0.0
) -> list[dict]:
    """Top-``num_top`` (query, class) pairs per image by sigmoid score, as RT-DETR's post-processor.

    Args:
        outputs: dict with ``pred_logits`` [B, Q, K] and ``pred_boxes`` [B, Q, 4] normalised cxcywh.
        orig_sizes_hw: [B, 2] (height, width) in pixels of the images the boxes should refer to.
        nms_iou: 0 (default, end-to-end as RT-DETR) or the IoU of a per-class NMS over all (query, class)
            pairs before the top-``num_top`` cut (``model.post_nms``: for short schedules, where the
            one-to-one head has not yet learned to suppress duplicates).

    Returns: per image ``scores`` [n], ``labels`` [n] (0-based), ``boxes_xyxy`` [n, 4] in pixels.
    """
    if num_top < 1:
        raise ValueError(f"postprocess: num_top must be >= 1, got {num_top}")
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    bs, _, num_classes = logits.shape
    sizes = torch.as_tensor(orig_sizes_hw, dtype=torch.float32, device=boxes.device).reshape(bs, 2)
    scale = sizes.flip(-1).repeat(1, 2).unsqueeze(1)  # [B, 1, 4] (w, h, w, h)
    xyxy = box_convert(boxes.float(), "cxcywh", "xyxy") * scale
    scores = logits.float().sigmoid().flatten(1)  # [B, Q*K]
    if nms_iou > 0:
        pair = torch.arange(scores.shape[1], device=scores.device)
        query, labels = pair // num_classes, pair % num_classes
        # batched_nms returns the survivors in decreasing score order
        kept = [batched_nms(b[query], s, labels, nms_iou)[:num_top] for s, b in zip(scores, xyxy)]
        return [
            {"scores": s[i], "labels": labels[i], "boxes_xyxy": b[query[i]]}
            for s, b, i in zip(scores, xyxy, kept)
        ]
    k = min(num_top, scores.shape[1])
    scores, index = scores.topk(k, dim=1)
    labels = index % num_classes
    query = index // num_classes
    picked = xyxy.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
    return [{"scores": s, "labels": lab, "boxes_xyxy": b} for s, lab, b in zip(scores, labels, picked)]


def to_coco_results(
    processed: list[dict],
    image_ids: Sequence[int],
    label_to_category: Mapping[int, int] | Sequence[int] | None = None,
) -> list[dict]:
    """Post-processed detections → COCO results (``image_id``, ``category_id``, ``bbox`` xywh, ``score``).

    ``label_to_category`` maps the 0-based label to the dataset's category id (dict or sequence);
    ``None`` means ``label + 1``.
    """
    if len(processed) != len(image_ids):
        raise ValueError(f"{len(processed)} detections for {len(image_ids)} image ids")
    results = []
    for det, image_id in zip(processed, image_ids):
        boxes = det["boxes_xyxy"].detach().float().cpu()
        xywh = box_convert(boxes, "xyxy", "xywh").tolist()
        for label, score, box in zip(det["labels"].tolist(), det["scores"].tolist(), xywh):
            category = label + 1 if label_to_category is None else label_to_category[label]
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(category),
                    "bbox": [round(float(v), 3) for v in box],
                    "score": float(score),
                }
            )
    return results

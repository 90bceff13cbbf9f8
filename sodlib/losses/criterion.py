"""RT-DETR's set criterion: matching, then named, unweighted loss terms for every supervised output.

Outputs consumed (the detector contract): ``pred_logits`` [B, Q, K] (sigmoid, no background class),
``pred_boxes`` [B, Q, 4] normalised cxcywh for the last decoder layer; optional ``aux_outputs``
(decoder layers 0..L-2, same keys), ``enc_outputs`` (the top-K encoder proposals), ``dn_outputs``
(L dicts for the denoising queries) with ``dn_meta`` (``dn_positive_idx``, ``dn_num_group``).
Targets: B dicts with ``boxes`` [N, 4] normalised cxcywh and ``labels`` [N] int64, N may be 0.

Loss keys: ``loss_<term>`` for the last layer, ``loss_<term>_aux_{i}`` for decoder layer i < L-1,
``loss_<term>_enc_0`` for the encoder proposals, ``loss_<term>_dn_{i}`` for the denoising queries of
decoder layer i, ``loss_<term>_o2m_0`` for every encoder token matched one-to-many (``enc_o2m`` > 0, on
``enc_dense_outputs``: each target repeated ``enc_o2m`` times in the Hungarian matching, H-DETR style).
Terms: ``loss_vfl`` | ``loss_qfl`` | ``loss_tal`` (classification), ``loss_bbox`` (L1), ``loss_giou``.
Weights are applied in one place, :meth:`SetCriterion.weighted_total`. MRQM's criterion
(:mod:`sodlib.losses.mrqm`) adds ``loss_iah_{cls,bbox,giou}`` and ``loss_auxq_<term>_{i}``.

Extending (paper A): a new term is a new entry in :meth:`SetCriterion.loss_map` (a method taking
``outputs, targets, indices, num_boxes, layer``); ST changes :meth:`SetCriterion.positive_target`, SR
returns weights from :meth:`SetCriterion.sample_weights`; SPR reads ``sampling_locations`` etc. from
``outputs`` and ``layer.decoder_layer`` for its eta.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sodlib.box_ops import box_cxcywh_to_xyxy, paired_iou_xyxy
from sodlib.losses import formulas as L
from sodlib.losses.matcher import Indices

_LAYER_SUFFIX = re.compile(r"(_(aux|enc|o2m|dn))?_\d+$")
_NESTED_OUTPUTS = (
    "aux_outputs",
    "enc_outputs",
    "enc_dense_outputs",
    "dn_outputs",
    "dn_meta",
    "iah_outputs",
    "aux_query_outputs",
    "aux_query_indices",
)  # the last three: MRQM


def base_loss_name(key: str) -> str:
    """``loss_vfl_aux_3`` -> ``loss_vfl``, ``loss_auxq_vfl_3`` -> ``loss_auxq_vfl``: the weight_dict key."""
    return _LAYER_SUFFIX.sub("", key)


@dataclass(frozen=True)
class LayerInfo:
    """Which supervised output a loss term is computed on."""

    name: str  # "final" | "aux_{i}" | "enc_0" | "o2m_0" | "dn_{i}"
    decoder_layer: int | None  # decoder layer 0..L-1 (index into loss.eta_per_layer); None for the encoder
    denoising: bool = False
    matches_per_target: int = 1  # how many queries each target is matched to: the loss normaliser's factor

    @property
    def suffix(self) -> str:
        return "" if self.name == "final" else f"_{self.name}"


@dataclass(frozen=True)
class Matched:
    """The M matched (query, ground truth) pairs of one output, flattened over the batch."""

    batch_idx: Tensor  # [M] image of each pair
    query_idx: Tensor  # [M] query index within its image
    labels: Tensor  # [M] gt class
    instance_ids: Tensor  # [M] gt index across the batch (image offset + index within the image)
    pred_boxes: Tensor  # [M, 4] cxcywh, in the graph
    gt_boxes: Tensor  # [M, 4] cxcywh
    iou: Tensor  # [M] IoU(pred, gt), detached


class SetCriterion(nn.Module):
    """Loss of a DETR-style detector, RT-DETR flavour (VFL + L1 + GIoU; Hungarian and denoising matching).

    ``weight_dict`` maps the base term names (``loss_vfl``, ``loss_bbox``, ``loss_giou``, ...) to their
    weights; ``losses`` names the loss functions to run (keys of :meth:`loss_map`). ``alpha``/``gamma``
    are VFL's negative-term scale and focusing exponent (Eq. 3); ``gamma`` is also the QFL beta and TAL's
    focusing exponent; ``tal_a``/``tal_b`` are TOOD's alignment exponents. ``enc_o2m`` > 0 adds the
    one-to-many encoder terms (``loss_<term>_o2m_0``, normalised by targets × ``enc_o2m``).

    ``needs_sampling`` / ``needs_hidden``: whether the detector must be called with ``return_sampling`` /
    ``return_hidden`` for this criterion (False here; paper A's criterion sets them from its switches).
    """

    needs_sampling: bool = False
    needs_hidden: bool = False

    def __init__(
        self,
        matcher: nn.Module,
        num_classes: int,
        weight_dict: Mapping[str, float],
        losses: tuple[str, ...] = ("vfl", "boxes"),
        alpha: float = 0.75,
        gamma: float = 2.0,
        tal_a: float = 1.0,
        tal_b: float = 6.0,
        enc_o2m: int = 0,
    ):
        super().__init__()
        self.enc_o2m = enc_o2m
        self.matcher = matcher
        self.num_classes = num_classes
        self.weight_dict = dict(weight_dict)
        self.losses = tuple(losses)
        self.cls_loss = next((name for name in self.losses if name in ("vfl", "qfl", "tal")), None)
        self.alpha, self.gamma = alpha, gamma
        self.tal_a, self.tal_b = tal_a, tal_b
        unknown = [name for name in self.losses if name not in self.loss_map()]
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {unknown}; available: {sorted(self.loss_map())}")

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, losses={self.losses}, weight_dict={self.weight_dict}"

    # ------------------------------------------------------------ dispatch, matching, the loss loop

    def loss_map(self) -> dict[str, Callable[..., dict[str, Tensor]]]:
        """Name -> loss function ``f(outputs, targets, indices, num_boxes, layer) -> {loss_*: Tensor}``."""
        return {"vfl": self.loss_vfl, "qfl": self.loss_qfl, "tal": self.loss_tal, "boxes": self.loss_boxes}

    def get_loss(
        self,
        name: str,
        outputs: dict,
        targets: list[dict],
        indices: Indices,
        num_boxes: float,
        layer: LayerInfo,
    ) -> dict[str, Tensor]:
        return self.loss_map()[name](outputs, targets, indices, num_boxes, layer)

    def match_layers(self, outputs: dict, targets: list[dict]) -> list[tuple[LayerInfo, dict, Indices]]:
        """Every supervised output with its matching: Hungarian for decoder/encoder, fixed for denoising."""
        aux = list(outputs.get("aux_outputs") or [])
        num_layers = len(aux) + 1
        final = {k: v for k, v in outputs.items() if k not in _NESTED_OUTPUTS}
        layers = [(LayerInfo("final", num_layers - 1), final, self.matcher(final, targets))]
        for i, out in enumerate(aux):
            layers.append((LayerInfo(f"aux_{i}", i), out, self.matcher(out, targets)))
        if outputs.get("enc_outputs") is not None:
            enc = outputs["enc_outputs"]
            layers.append((LayerInfo("enc_0", None), enc, self.matcher(enc, targets)))
        if self.enc_o2m and outputs.get("enc_dense_outputs") is not None:
            dense = outputs["enc_dense_outputs"]
            indices = one_to_many(self.matcher, dense, targets, self.enc_o2m)
            layers.append((LayerInfo("o2m_0", None, matches_per_target=self.enc_o2m), dense, indices))
        if outputs.get("dn_outputs"):
            if outputs.get("dn_meta") is None:
                raise ValueError("SetCriterion: outputs has 'dn_outputs' but no 'dn_meta'")
            dn_indices = denoising_indices(outputs["dn_meta"], targets, outputs["pred_logits"].device)
            num_group = int(outputs["dn_meta"]["dn_num_group"])  # RT-DETR: dn positives = N x groups
            for i, out in enumerate(outputs["dn_outputs"]):
                layers.append(
                    (LayerInfo(f"dn_{i}", i, denoising=True, matches_per_target=num_group), out, dn_indices)
                )
        return layers

    def forward(self, outputs: dict, targets: list[dict], return_indices: bool = False):
        """Unweighted loss terms ``{loss_<term><suffix>: scalar}``.

        With ``return_indices`` also returns ``{layer name: indices}`` (names ``final``, ``aux_{i}``,
        ``enc_0``, ``dn_{i}``; indices as the matcher's: per image (query_idx, gt_idx) int64 tensors).
        """
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
        loss_dict: dict[str, Tensor] = {}
        all_indices: dict[str, Indices] = {}
        for layer, out, indices in self.match_layers(outputs, targets):
            all_indices[layer.name] = indices
            n = num_boxes * layer.matches_per_target
            for name in self.losses:
                terms = self.get_loss(name, out, targets, indices, n, layer)
                loss_dict.update({k + layer.suffix: v for k, v in terms.items()})
        return (loss_dict, all_indices) if return_indices else loss_dict

    @staticmethod
    def num_boxes(targets: list[dict], device: torch.device) -> float:
        """Targets in the batch, averaged over distributed workers, at least 1."""
        n = float(sum(len(t["labels"]) for t in targets))
        if dist.is_available() and dist.is_initialized():
            count = torch.tensor([n], dtype=torch.float, device=device)
            dist.all_reduce(count)
            n = count.item() / dist.get_world_size()
        return max(n, 1.0)

    # ------------------------------------------------------------ weights

    def weighted(self, loss_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Weighted copies of the ``loss_*`` terms (for logging); a term without a weight is an error."""
        out = {}
        for key, value in loss_dict.items():
            if not key.startswith("loss_"):
                continue
            base = base_loss_name(key)
            if base not in self.weight_dict:
                raise KeyError(
                    f"SetCriterion: no weight for {key!r} (looked up {base!r}); "
                    f"weight_dict has {sorted(self.weight_dict)}"
                )
            out[key] = value * self.weight_dict[base]
        return out

    def weighted_total(self, loss_dict: Mapping[str, Tensor]) -> Tensor:
        """The training objective: sum of weight_dict[base name] * term over all terms and layers."""
        terms = list(self.weighted(loss_dict).values())
        if not terms:
            raise ValueError("SetCriterion.weighted_total: the loss dict holds no loss_* terms")
        return torch.stack([t.float() for t in terms]).sum()

    # ------------------------------------------------------------ extension points (paper A)

    def positive_target(self, outputs: dict, matched: Matched, layer: LayerInfo) -> Tensor:
        """Classification target score of each matched query [M]; baseline: the detached IoU."""
        return matched.iou

    def sample_weights(
        self, outputs: dict, matched: Matched, target: Tensor | None, layer: LayerInfo, task: str
    ) -> Tensor | None:
        """Per-positive weight [M] replacing the positive-term weight (``task`` ``"cls"`` or ``"reg"``).

        Baseline: None (VFL weights positives by their target, boxes are unweighted). SR returns r (Eq. 20).
        """
        return None

    def baseline_positive_weight(self, target: Tensor, score: Tensor, task: str) -> Tensor:
        """The weight each positive gets without SR [M] (what SR's r replaces, Eq. 20): VFL's q = target,
        QFL's and TAL's modulation |target - s|^gamma (for TAL with its t_hat taken as the target), 1 for
        the box terms."""
        if task == "reg":
            return torch.ones_like(target)
        if self.cls_loss == "vfl":
            return target
        return (target - score).abs().pow(self.gamma)

    # ------------------------------------------------------------ loss terms

    def matched(self, outputs: dict, targets: list[dict], indices: Indices) -> Matched:
        """Gather the matched pairs of one output."""
        device = outputs["pred_boxes"].device
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([src for src, _ in indices]).to(device)
        offsets = [0]
        for t in targets[:-1]:
            offsets.append(offsets[-1] + len(t["labels"]))
        instance_ids = torch.cat([tgt.to(device) + off for (_, tgt), off in zip(indices, offsets)])
        labels = torch.cat([t["labels"].to(device)[tgt.to(device)] for t, (_, tgt) in zip(targets, indices)])
        gt_boxes = torch.cat([t["boxes"].to(device)[tgt.to(device)] for t, (_, tgt) in zip(targets, indices)])
        pred_boxes = outputs["pred_boxes"][batch_idx, query_idx].float()  # [M, 4]
        gt_boxes = gt_boxes.to(pred_boxes.dtype).reshape(-1, 4)
        iou, _ = paired_iou_xyxy(box_cxcywh_to_xyxy(pred_boxes.detach()), box_cxcywh_to_xyxy(gt_boxes))
        return Matched(
            batch_idx,
            query_idx=query_idx,
            labels=labels,
            instance_ids=instance_ids,
            pred_boxes=pred_boxes,
            gt_boxes=gt_boxes,
            iou=iou,
        )

    def _dense(self, logits: Tensor, m: Matched, values: Tensor) -> Tensor:
        """Scatter per-pair ``values`` [M] to [B, Q, K] at (image, query, gt class); 0 elsewhere."""
        dense = torch.zeros_like(logits)
        dense[m.batch_idx, m.query_idx, m.labels] = values.to(logits.dtype)
        return dense

    def _classification_inputs(self, outputs, targets, indices, layer):
        logits = outputs["pred_logits"].float()  # [B, Q, K]
        m = self.matched(outputs, targets, indices)
        score = self.positive_target(outputs, m, layer)  # [M]
        target = self._dense(logits, m, score)  # [B, Q, K]
        onehot = self._dense(logits, m, torch.ones_like(score))
        weight = self.sample_weights(outputs, m, score, layer, "cls")
        pos_weight = None if weight is None else self._dense(logits, m, weight)
        return logits, m, target, onehot, pos_weight

    def loss_vfl(self, outputs, targets, indices, num_boxes, layer) -> dict[str, Tensor]:
        """Varifocal loss (Eq. 3), target = IoU of the matched pair at its gt class, summed / num_boxes."""
        logits, _, target, onehot, pos_weight = self._classification_inputs(outputs, targets, indices, layer)
        loss = L.varifocal_loss(
            logits, target, self.alpha, self.gamma, pos_weight=pos_weight, positive_mask=onehot
        )
        return {"loss_vfl": loss.sum() / num_boxes}

    def loss_qfl(self, outputs, targets, indices, num_boxes, layer) -> dict[str, Tensor]:
        """GFL's quality focal loss with beta = gamma, target as VFL's, summed / num_boxes."""
        logits, _, target, onehot, pos_weight = self._classification_inputs(outputs, targets, indices, layer)
        loss = L.quality_focal_loss(
            logits, target, beta=self.gamma, pos_weight=pos_weight, positive_mask=onehot
        )
        return {"loss_qfl": loss.sum() / num_boxes}

    def loss_tal(self, outputs, targets, indices, num_boxes, layer) -> dict[str, Tensor]:
        """TOOD's task-aligned loss; t_hat is normalised over the positives of each gt instance.

        Under one-to-one matching each instance has one positive, so t_hat = IoU; on denoising outputs
        the dn_num_group positives of a gt form its instance.
        """
        logits, m, target, onehot, pos_weight = self._classification_inputs(outputs, targets, indices, layer)
        instance_ids = torch.full(logits.shape[:2], -1, dtype=torch.long, device=logits.device)
        instance_ids[m.batch_idx, m.query_idx] = m.instance_ids
        loss = L.task_aligned_loss(
            logits,
            target,
            onehot,
            a=self.tal_a,
            b=self.tal_b,
            pos_weight=pos_weight,
            gamma=self.gamma,
            instance_ids=instance_ids,
        )
        return {"loss_tal": loss.sum() / num_boxes}

    def loss_boxes(self, outputs, targets, indices, num_boxes, layer) -> dict[str, Tensor]:
        """L1 (``loss_bbox``) and 1 - GIoU (``loss_giou``) of matched pairs, summed / num_boxes (Eq. 4)."""
        m = self.matched(outputs, targets, indices)
        l1 = L.l1_box_loss(m.pred_boxes, m.gt_boxes)  # [M]
        giou = L.giou_box_loss(m.pred_boxes, m.gt_boxes)  # [M]
        weight = self.sample_weights(outputs, m, None, layer, "reg")
        if weight is not None:
            l1, giou = l1 * weight, giou * weight
        return {"loss_bbox": l1.sum() / num_boxes, "loss_giou": giou.sum() / num_boxes}


def one_to_many(matcher, outputs: dict, targets: list[dict], k: int) -> Indices:
    """Hungarian matching against every target repeated ``k`` times: up to k queries per target (H-DETR)."""
    repeated = [{"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
    indices = matcher(outputs, repeated)
    return [(src, tgt % max(len(t["labels"]), 1)) for (src, tgt), t in zip(indices, targets)]


def denoising_indices(dn_meta: Mapping, targets: list[dict], device: torch.device) -> Indices:
    """Fixed matching of the positive denoising queries: index j of each group -> gt j mod N."""
    positive_idx, num_group = dn_meta["dn_positive_idx"], int(dn_meta["dn_num_group"])
    if len(positive_idx) != len(targets):
        raise ValueError(
            f"dn_meta['dn_positive_idx'] has {len(positive_idx)} entries for {len(targets)} images"
        )
    indices = []
    for i, (pos, t) in enumerate(zip(positive_idx, targets)):
        n = len(t["labels"])
        pos = torch.as_tensor(pos, dtype=torch.int64, device=device).reshape(-1)
        if len(pos) != n * num_group:
            raise ValueError(
                f"dn_meta: image {i} has {len(pos)} positive denoising queries, expected "
                f"{n} targets x {num_group} groups = {n * num_group}"
            )
        indices.append((pos, torch.arange(n, dtype=torch.int64, device=device).repeat(num_group)))
    return indices


def positive_mask(indices: Indices, num_queries: int) -> Tensor:
    """Bool mask [B, Q] of the matched queries."""
    device = indices[0][0].device if indices else torch.device("cpu")
    mask = torch.zeros(len(indices), num_queries, dtype=torch.bool, device=device)
    for i, (src, _) in enumerate(indices):
        mask[i, src] = True
    return mask

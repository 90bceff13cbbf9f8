"""Paper A's training objective (§4, Eq. 22): RT-DETR's criterion + ST, SR and SPR, each switchable.

:class:`BetterSamplingCriterion` plugs into :class:`~sodlib.losses.criterion.SetCriterion`'s hooks:

* ST (Eqs. 7-15): :meth:`positive_target` returns t = c·s instead of the IoU, c from the matched
  prediction's and ground truth's box areas (normalised areas; only their ratio ρ matters). The same
  target serves VFL, QFL and TAL (where it replaces the IoU u).
* SR (Eqs. 16-21): :meth:`sample_weights` returns r = w^(1-|t-s|) (Eq. 19) from the weight generator
  (:class:`~sodlib.losses.reweight.SampleWeightGenerator`, a submodule of the criterion): r^cls replaces the
  positive-term weight of the classification loss, r^reg scales L1 + GIoU of each matched query.
  Negatives keep α·p^γ. r is normalised so that its mean over the positives equals the mean of the weight
  it replaces (VFL: q = t; boxes: 1): SR redistributes weight among the positives, it does not change
  the positive/negative balance. ``sr_grad="difficulty"`` (default): r is detached; the generator, fed
  detached features, learns to predict the difficulty 1 − t with its own BCE (``loss_sr_gen``), so hard
  positives (low t) get a larger w and so a larger r (§4.3: attention toward challenging positives).
  ``sr_grad="end_to_end"``: r stays in the graph; the gradient of the weighted loss then lowers the
  weight of the positives with the largest loss, i.e. it learns to favour the *easy* positives (kept as
  an option and as an extra row of Table 3).
* SPR (Eq. 5, L_atten): ``loss_offset`` and ``loss_atten`` on every decoder layer with that layer's η.

Requires the detector's extras (see ``needs_sampling`` / ``needs_hidden``): call the model with
``return_sampling=criterion.needs_sampling, return_hidden=criterion.needs_hidden``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from sodlib.losses import formulas as L
from sodlib.losses.criterion import LayerInfo, Matched, SetCriterion, positive_mask
from sodlib.losses.reweight import SampleWeightGenerator

__all__ = ["BetterSamplingCriterion"]

_SAMPLING_KEYS = ("sampling_locations", "attention_weights", "ref_boxes")
_HIDDEN_KEYS = ("hidden_cls", "hidden_reg")


class BetterSamplingCriterion(SetCriterion):
    """SetCriterion with paper A's Scale-aligned Target, Sample Reweighting and Sample Points Refinement.

    Extra keyword arguments (all off by default, which reproduces :class:`SetCriterion` exactly):
    ``st``, ``st_mode`` (``"label"`` | ``"pred"``), ``beta``, ``theta`` (Eqs. 13-15); ``sr``, ``sr_grad``
    (``"difficulty"`` | ``"end_to_end"``), ``hidden_dim`` (C of the generator; required with ``sr``);
    ``spr``, ``eta_per_layer`` (η of each decoder layer), ``spr_denoising``.

    Extra loss terms: ``loss_offset``, ``loss_atten`` (SPR; decoder layers only) and ``loss_sr_gen``
    (SR with ``sr_grad="difficulty"``; decoder layers only), each with the usual layer suffixes.
    """

    def __init__(
        self,
        matcher,
        num_classes: int,
        weight_dict: Mapping[str, float],
        losses: tuple[str, ...] = ("vfl", "boxes"),
        *,
        st: bool = False,
        st_mode: str = "label",
        beta: float = 0.73,
        theta: float = 6.0,
        sr: bool = False,
        sr_grad: str = "difficulty",
        hidden_dim: int | None = None,
        spr: bool = False,
        eta_per_layer: tuple[float, ...] = (),
        spr_denoising: bool = False,
        **kwargs,
    ):
        if st_mode not in ("label", "pred"):
            raise ValueError(f"st_mode must be 'label' or 'pred', got {st_mode!r}")
        if sr_grad not in ("difficulty", "end_to_end"):
            raise ValueError(f"sr_grad must be 'difficulty' or 'end_to_end', got {sr_grad!r}")
        if sr and not hidden_dim:
            raise ValueError("sr=True needs hidden_dim (the width C of the decoder features)")
        if spr and not eta_per_layer:
            raise ValueError("spr=True needs eta_per_layer (one η per decoder layer)")
        extra = (("sr_gen",) if sr and sr_grad == "difficulty" else ()) + (("spr",) if spr else ())
        super().__init__(matcher, num_classes, weight_dict, tuple(losses) + extra, **kwargs)
        self.st, self.st_mode, self.beta, self.theta = st, st_mode, beta, theta
        self.sr, self.sr_grad = sr, sr_grad
        self.spr, self.eta_per_layer, self.spr_denoising = spr, tuple(eta_per_layer), spr_denoising
        self.generator = SampleWeightGenerator(hidden_dim) if sr else None
        self.needs_sampling = spr  # the engine calls the model with return_sampling=needs_sampling
        self.needs_hidden = sr  # ... and return_hidden=needs_hidden

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, st={self.st} ({self.st_mode}, beta={self.beta}, theta={self.theta}), "
            f"sr={self.sr} ({self.sr_grad}), spr={self.spr} (eta={self.eta_per_layer}, "
            f"denoising={self.spr_denoising})"
        )

    def loss_map(self):
        return {**super().loss_map(), "sr_gen": self.loss_sr_gen, "spr": self.loss_spr}

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _matched_score(outputs: dict, m: Matched) -> Tensor:
        """Detached predicted confidence s of each matched query at its gt class [M]."""
        return outputs["pred_logits"][m.batch_idx, m.query_idx, m.labels].detach().float().sigmoid()

    def _generator_logits(self, outputs: dict, m: Matched, layer: LayerInfo) -> tuple[Tensor, Tensor]:
        missing = [k for k in _HIDDEN_KEYS if k not in outputs]
        if missing:
            raise ValueError(
                f"loss.sr: layer {layer.name!r} has no {missing}; call the detector with "
                f"return_hidden=True (criterion.needs_hidden)"
            )
        h_cls = outputs["hidden_cls"][m.batch_idx, m.query_idx].float()  # [M, C]
        h_reg = outputs["hidden_reg"][m.batch_idx, m.query_idx].float()  # [M, C]
        if self.sr_grad == "difficulty":  # the generator's own BCE must not train the detector features
            h_cls, h_reg = h_cls.detach(), h_reg.detach()
        return self.generator.logits(h_cls, h_reg)

    def _sr_applies(self, m: Matched, layer: LayerInfo) -> bool:
        # encoder proposals have no head features: they keep the baseline weights
        return self.sr and layer.decoder_layer is not None and len(m.query_idx) > 0

    # ------------------------------------------------------------ hooks

    def positive_target(self, outputs: dict, matched: Matched, layer: LayerInfo) -> Tensor:
        """ST: t = c·s (Eq. 15) with c from IoU and the normalised box areas; baseline: the IoU."""
        if not self.st:
            return matched.iou
        pred_wh = matched.pred_boxes.detach()[:, 2:]
        gt_wh = matched.gt_boxes[:, 2:]
        score = self._matched_score(outputs, matched) if self.st_mode == "pred" else None
        return L.scale_aligned_target(
            matched.iou, pred_wh.prod(-1), gt_wh.prod(-1), score, self.beta, self.theta, self.st_mode
        ).detach()

    def sample_weights(
        self, outputs: dict, matched: Matched, target: Tensor | None, layer: LayerInfo, task: str
    ) -> Tensor | None:
        """SR: r^cls / r^reg = w^(1-|t-s|) (Eq. 19), mean-normalised over the positives of this output."""
        if not self._sr_applies(matched, layer):
            return None
        logit_cls, logit_reg = self._generator_logits(outputs, matched, layer)
        w = (logit_cls if task == "cls" else logit_reg).sigmoid()  # Eqs. 17/18
        t = self.positive_target(outputs, matched, layer) if target is None else target.detach()
        score = self._matched_score(outputs, matched)
        r = L.reweight_factor(w, t, score)  # Eq. 19
        if self.sr_grad == "difficulty":
            r = r.detach()
        # r only redistributes weight over the positives: its mean equals the mean of the weight it replaces
        # (VFL's q = t, QFL/TAL's |t - s|^gamma, 1 for the boxes), so the positive/negative balance stays
        replaced = self.baseline_positive_weight(t, score, task).detach()
        return r / r.mean().clamp(min=1e-6) * replaced.mean()

    # ------------------------------------------------------------ extra terms

    def loss_sr_gen(self, outputs, targets, indices, num_boxes, layer) -> dict[str, Tensor]:
        """The SR generator's own objective (``sr_grad="difficulty"``): BCE(w, 1 − t) for w_cls and w_reg,
        summed over the matched queries / num_boxes. Only the generator receives its gradient."""
        if layer.decoder_layer is None:
            return {}
        m = self.matched(outputs, targets, indices)
        if len(m.query_idx) == 0:  # keep the generator in the graph (DDP) with an exact zero
            return {"loss_sr_gen": sum(p.sum() for p in self.generator.parameters()) * 0.0}
        difficulty = 1 - self.positive_target(outputs, m, layer)  # [M] in [0, 1]
        logit_cls, logit_reg = self._generator_logits(outputs, m, layer)
        bce = F.binary_cross_entropy_with_logits(
            logit_cls, difficulty, reduction="sum"
        ) + F.binary_cross_entropy_with_logits(logit_reg, difficulty, reduction="sum")
        return {"loss_sr_gen": bce / num_boxes}

    def loss_spr(self, outputs, targets, indices, num_boxes, layer) -> dict[str, Tensor]:
        """SPR's ``loss_offset`` (Eq. 5) and ``loss_atten`` of a decoder layer, positives = matched queries,
        averaged over them (see :func:`sodlib.losses.formulas.spr_offset_loss`)."""
        if layer.decoder_layer is None:
            return {}
        # Denoising queries are reconstructions of noised ground truth, not the sampling the decoder learns
        # for detection, and the paper (§4.1) only speaks of the N+ matched queries: off by default.
        if layer.denoising and not self.spr_denoising:
            return {}
        missing = [k for k in _SAMPLING_KEYS if k not in outputs]
        if missing:
            raise ValueError(
                f"loss.spr: layer {layer.name!r} has no {missing}; call the detector with "
                f"return_sampling=True (criterion.needs_sampling)"
            )
        if layer.decoder_layer >= len(self.eta_per_layer):
            raise ValueError(
                f"loss.spr: decoder layer {layer.decoder_layer} but eta_per_layer has "
                f"{len(self.eta_per_layer)} values"
            )
        locations, attention, ref_boxes = (outputs[k] for k in _SAMPLING_KEYS)
        mask = positive_mask(indices, locations.shape[1]).to(locations.device)  # [B, Q]
        eta = self.eta_per_layer[layer.decoder_layer]
        return {
            "loss_offset": L.spr_offset_loss(locations, ref_boxes, eta, mask),  # Eq. 5
            "loss_atten": L.spr_attention_loss(locations, attention, ref_boxes, mask),
        }  # L_atten

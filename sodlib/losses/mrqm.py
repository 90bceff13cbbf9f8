"""MRQM's training objective: paper A's criterion (switches st/sr/spr, all off = RT-DETR) + the IAH terms.

:class:`MRQMCriterion` adds, when the detector's output holds them (``model.iah``, training):

* ``loss_iah_cls``, ``loss_iah_bbox``, ``loss_iah_giou``: the IoU-aware head on every encoder token,
  classification (``loss.cls_loss``: VFL by default, target = IoU of the positive's box with its gt, or
  ST's c with ``loss.st``) over all tokens and L1 / 1 − GIoU over the positives of the one-to-many
  assignment (``iah_outputs["indices"]``), each summed and divided by the number of positives.
* ``loss_auxq_<term>_{i}`` for decoder layer i (Eq. 10, L(P̂_l, P_pos)): the decoder terms of the
  auxiliary positive queries against their assigned gt (fixed assignment, no Hungarian matching), the
  same loss functions and hooks as the matching queries (so ST / SR / SPR apply to them too), divided by
  the number of auxiliary queries. Weighted by ``loss.weight_auxq`` × the term's own weight.

The head's assignment is made in the detector (it also picks the auxiliary queries); the criterion
only reads it. Positive counts are per process (not averaged over distributed workers).
"""

from __future__ import annotations

from sodlib.losses.criterion import LayerInfo
from sodlib.losses.matcher import Indices
from sodlib.losses.sampling import BetterSamplingCriterion

__all__ = ["MRQMCriterion"]

_IAH_NAMES = {
    "loss_vfl": "loss_iah_cls",
    "loss_qfl": "loss_iah_cls",
    "loss_tal": "loss_iah_cls",
    "loss_bbox": "loss_iah_bbox",
    "loss_giou": "loss_iah_giou",
}


def _count(indices: Indices) -> float:
    return max(float(sum(len(src) for src, _ in indices)), 1.0)


class MRQMCriterion(BetterSamplingCriterion):
    """:class:`~sodlib.losses.sampling.BetterSamplingCriterion` + the IAH and auxiliary-query terms.

    Same constructor; ``weight_dict`` must also hold ``loss_iah_cls``, ``loss_iah_bbox``, ``loss_iah_giou``
    and ``loss_auxq_<term>`` for every decoder term (``build_criterion`` fills them in).
    """

    def mrqm_layers(self, outputs: dict) -> list[tuple[LayerInfo, dict, Indices, float]]:
        """(layer, output, indices, normaliser) of the IAH and of every auxiliary-query decoder layer."""
        layers = []
        iah = outputs.get("iah_outputs")
        if iah is not None:
            layers.append((LayerInfo("iah", None), iah, iah["indices"], _count(iah["indices"])))
        aux = outputs.get("aux_query_outputs") or []
        if aux:
            indices = outputs["aux_query_indices"]
            layers += [
                (LayerInfo(f"auxq_{i}", i), out, indices, _count(indices)) for i, out in enumerate(aux)
            ]
        return layers

    @staticmethod
    def _key(name: str, layer: LayerInfo) -> str | None:
        if layer.name == "iah":
            return _IAH_NAMES.get(name)  # the head has no decoder extras (SPR / SR terms are empty)
        return f"loss_auxq_{name.removeprefix('loss_')}_{layer.decoder_layer}"

    def forward(self, outputs: dict, targets: list[dict], return_indices: bool = False):
        """Paper A's terms (see :class:`~sodlib.losses.criterion.SetCriterion`) + ``loss_iah_*`` +
        ``loss_auxq_*``; ``return_indices`` adds ``iah`` and ``auxq_{i}`` to the indices dict."""
        loss_dict, all_indices = super().forward(outputs, targets, return_indices=True)
        for layer, out, indices, n in self.mrqm_layers(outputs):
            all_indices[layer.name] = indices
            for name in self.losses:
                for key, value in self.get_loss(name, out, targets, indices, n, layer).items():
                    new_key = self._key(key, layer)
                    if new_key is not None:
                        loss_dict[new_key] = value
        return (loss_dict, all_indices) if return_indices else loss_dict

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mrqm=iah+aux queries"

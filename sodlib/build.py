"""The composition root: a detector and its criterion from a config, and nothing else decides which parts.

Every choice a config makes between classes is made here, by passing classes or built modules: the backbone
(``model.backbone``), the encoder (``model.encoder``: RT-DETR's hybrid encoder or MRQM's BiFPN + SAE), the
training-only head (``model.iah``: MRQM's IoU-aware head), and the criterion (RT-DETR's, paper A's
:class:`~sodlib.losses.sampling.BetterSamplingCriterion` or MRQM's
:class:`~sodlib.losses.mrqm.MRQMCriterion`). The parts themselves (:mod:`sodlib.models`, :mod:`sodlib.losses`)
know nothing of configs' choices.

Layer: imports :mod:`sodlib.config`, :mod:`sodlib.models` and :mod:`sodlib.losses`; used by training,
inference, :mod:`sodlib.official` and ``sodlib.build_detector`` / ``sodlib.build_criterion``.
"""

from __future__ import annotations

from torch import nn

from sodlib.config import LossConfig, ModelConfig
from sodlib.losses.criterion import SetCriterion
from sodlib.losses.matcher import HungarianMatcher
from sodlib.losses.mrqm import MRQMCriterion
from sodlib.losses.sampling import BetterSamplingCriterion
from sodlib.models.backbone import PResNet, ResNetBackbone, TinyBackbone, load_state_dict_file
from sodlib.models.bifpn import BiFPNSAEEncoder
from sodlib.models.decoder import RTDETRDecoder
from sodlib.models.detector import RTDETR
from sodlib.models.encoder import HybridEncoder
from sodlib.models.iou_head import IoUAwareHead

__all__ = [
    "build_backbone",
    "build_criterion",
    "build_detector",
    "build_encoder",
    "criterion_class",
    "encoder_levels",
]


def build_backbone(cfg: ModelConfig, return_levels: tuple[int, ...] = (3, 4, 5)) -> nn.Module:
    """``tiny`` → :class:`TinyBackbone` (trainable BatchNorm; ``freeze_norm`` applies to ResNets only);
    ``resnetNN`` → torchvision's :class:`ResNetBackbone`, ``presnetNNvd`` → RT-DETR's :class:`PResNet`
    (``model.freeze_at``: 0 freezes the stem, as RT-DETR-R50 does)."""
    if cfg.backbone == "tiny":
        backbone = TinyBackbone(cfg.backbone_width, return_levels)
        if cfg.pretrained_path:
            load_state_dict_file(backbone, cfg.pretrained_path)
        return backbone
    if cfg.backbone.startswith("presnet"):
        cls, depth = PResNet, int(cfg.backbone.removeprefix("presnet").removesuffix("vd"))
    else:
        cls, depth = ResNetBackbone, int(cfg.backbone.removeprefix("resnet"))
    return cls(
        depth,
        return_levels=return_levels,
        freeze_norm=cfg.freeze_norm,
        freeze_at=cfg.freeze_at,
        pretrained_path=cfg.pretrained_path,
    )


def encoder_levels(cfg: ModelConfig) -> tuple[int, ...]:
    """Backbone levels the encoder reads: C3..C5 (``hybrid``), C2..C5 (``bifpn_sae``, MRQM, or ``hybrid`` with
    ``p2_values``)."""
    return (2, 3, 4, 5) if cfg.encoder == "bifpn_sae" or cfg.p2_values else (3, 4, 5)


def build_encoder(cfg: ModelConfig, in_channels: tuple[int, ...]) -> nn.Module:
    """``hybrid`` → RT-DETR's :class:`HybridEncoder`; ``bifpn_sae`` → MRQM's BiFPN + scale-aware encoder."""
    if cfg.encoder == "hybrid":
        return HybridEncoder(
            in_channels,
            hidden_dim=cfg.encoder_dim or cfg.hidden_dim,
            num_heads=cfg.num_heads,
            dim_feedforward=cfg.encoder_ffn,
            dropout=cfg.dropout,
            csp_blocks=cfg.csp_blocks,
            expansion=cfg.expansion,
            light_levels=int(cfg.p2_values),
            pos_embed=cfg.pos_embed,
        )
    if cfg.encoder == "bifpn_sae":
        return BiFPNSAEEncoder(
            in_channels,
            hidden_dim=cfg.hidden_dim,
            num_heads=cfg.num_heads,
            num_points=cfg.num_points,
            dim_feedforward=cfg.encoder_ffn,
            dropout=cfg.dropout,
            bifpn_repeats=cfg.bifpn_repeats,
            sae_high_updates=cfg.sae_high_updates,
        )
    raise NotImplementedError(f"unknown encoder {cfg.encoder!r}")


def build_detector(model_cfg: ModelConfig) -> RTDETR:
    """RT-DETR from a :class:`~sodlib.config.ModelConfig` (kept as ``.config``).

    ``encoder="bifpn_sae"`` makes it MRQM's detector (backbone levels 2..5, 4 decoder levels);
    ``iah=True`` adds the training-only IoU-aware head as ``aux_head``.
    """
    cfg = model_cfg
    backbone = build_backbone(cfg, encoder_levels(cfg))
    encoder = build_encoder(cfg, tuple(backbone.out_channels))
    decoder = RTDETRDecoder(
        cfg.num_classes,
        in_channels=tuple(encoder.out_channels),
        hidden_dim=cfg.hidden_dim,
        num_queries=cfg.num_queries,
        num_levels=cfg.num_levels,
        num_points=cfg.num_points,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_decoder_layers,
        dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout,
        num_denoising=cfg.num_denoising,
        label_noise_ratio=cfg.label_noise_ratio,
        box_noise_scale=cfg.box_noise_scale,
        query_nms=cfg.query_nms,
        select_from_level=int(cfg.p2_values),
        fp32_geometry=cfg.fp32_geometry,
        bf16_geometry=cfg.bf16_geometry,
    )
    aux_head = (
        IoUAwareHead(
            cfg.hidden_dim,
            cfg.num_classes,
            tb=cfg.iah_tb,
            k=cfg.iah_k,
            p=cfg.iah_p,
            as_px=cfg.iah_as_px,
            max_queries=cfg.iah_max_queries,
            reading=cfg.iah_reading,
        )
        if cfg.iah
        else None
    )
    return RTDETR(backbone, encoder=encoder, decoder=decoder, aux_head=aux_head, config=cfg)


def criterion_class(loss_cfg: LossConfig, model_cfg: ModelConfig) -> type[SetCriterion]:
    """MRQM's criterion with ``model.iah`` (it also carries paper A's switches); paper A's with any of
    ``loss.st`` / ``loss.sr`` / ``loss.spr``; otherwise RT-DETR's :class:`SetCriterion`."""
    if model_cfg.iah:
        return MRQMCriterion
    if loss_cfg.st or loss_cfg.sr or loss_cfg.spr:
        return BetterSamplingCriterion
    return SetCriterion


def build_criterion(loss_cfg: LossConfig, model_cfg: ModelConfig) -> SetCriterion:
    """The criterion described by ``loss_cfg`` for a detector built from ``model_cfg`` (class:
    :func:`criterion_class`)."""
    matcher = HungarianMatcher(
        cost_class=loss_cfg.cost_class,
        cost_bbox=loss_cfg.cost_bbox,
        cost_giou=loss_cfg.cost_giou,
        alpha=loss_cfg.cost_alpha,
        gamma=loss_cfg.cost_gamma,
    )
    weight_dict = {
        f"loss_{loss_cfg.cls_loss}": loss_cfg.weight_vfl,
        "loss_bbox": loss_cfg.weight_bbox,
        "loss_giou": loss_cfg.weight_giou,
    }
    common = {
        "losses": (loss_cfg.cls_loss, "boxes"),
        "alpha": loss_cfg.alpha,
        "gamma": loss_cfg.gamma,
        "tal_a": loss_cfg.tal_a,
        "tal_b": loss_cfg.tal_b,
        "enc_o2m": loss_cfg.enc_o2m,
    }
    cls = criterion_class(loss_cfg, model_cfg)
    if cls is SetCriterion:
        return SetCriterion(matcher, model_cfg.num_classes, weight_dict, **common)
    if loss_cfg.spr:
        weight_dict.update(loss_offset=loss_cfg.weight_offset, loss_atten=loss_cfg.weight_atten)  # Eq. 22
    if loss_cfg.sr and loss_cfg.sr_grad == "difficulty":
        weight_dict["loss_sr_gen"] = loss_cfg.weight_sr_gen
    if cls is MRQMCriterion:
        # Eq. 10: the auxiliary queries' decoder terms, scaled by loss.weight_auxq
        weight_dict.update(
            {f"loss_auxq_{k.removeprefix('loss_')}": loss_cfg.weight_auxq * w for k, w in weight_dict.items()}
        )
        scale = loss_cfg.weight_iah  # the IAH's balance against the decoder (config.py, notebook 06)
        weight_dict.update(
            loss_iah_cls=scale * loss_cfg.weight_iah_cls,
            loss_iah_bbox=scale * loss_cfg.weight_iah_bbox,
            loss_iah_giou=scale * loss_cfg.weight_iah_giou,
        )
    return cls(
        matcher,
        model_cfg.num_classes,
        weight_dict,
        **common,
        st=loss_cfg.st,
        st_mode=loss_cfg.st_mode,
        beta=loss_cfg.beta,
        theta=loss_cfg.theta,
        sr=loss_cfg.sr,
        sr_grad=loss_cfg.sr_grad,
        hidden_dim=model_cfg.hidden_dim,
        spr=loss_cfg.spr,
        eta_per_layer=loss_cfg.eta_per_layer,
        spr_denoising=loss_cfg.spr_denoising,
    )

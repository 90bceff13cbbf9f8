"""RT-DETR's decoder: query selection from the encoder memory, deformable decoder layers, box refinement.

``RTDETRDecoder(feats, targets) -> dict`` (see :meth:`RTDETRDecoder.forward` for the keys):

1. input projection of the encoder maps (1×1 conv + BN; extra 3×3/2 levels if ``num_levels`` asks
   for more), flattened to the memory [B, ΣHW, C];
2. anchors at the grid centres with wh = 0.05 · 2^level (invalid within ``eps`` of the border),
   an encoder head (Linear + LayerNorm, class Linear, box MLP on top of the anchors);
3. top-K selection (K = ``num_queries``) by the best class score — optionally among proposals made
   distinct first by class-agnostic NMS (``query_nms``, see :func:`distinct_topk`) and only among the
   levels from ``select_from_level`` on (``model.p2_values``: the stride-4 level is sampled, never
   selected); the selected memory features (detached) are the content queries, their boxes (detached)
   the first reference boxes. In training the scores and boxes of every selectable token are returned
   too (``enc_dense_outputs``, for ``loss.enc_o2m``);
4. contrastive denoising queries in front (training), with their attention mask;
5. decoder layers (self-attention → deformable cross-attention around the reference box → FFN); each
   layer's box head predicts a delta in logit space; the refined box, detached, is the next layer's
   reference. As in RT-DETR (DINO's "look forward twice"), the box reported for layer i > 0 adds the
   delta to the *undetached* box of layer i − 1, so a layer's box loss also trains the previous head.
"""

from __future__ import annotations

import itertools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_convert

from sodlib.models.deform_attn import MSDeformableAttention, bf16_round
from sodlib.models.denoising import get_contrastive_denoising_training_group, inverse_sigmoid

__all__ = ["MLP", "DecoderLayer", "RTDETRDecoder"]


class MLP(nn.Module):
    """Linear layers with ReLU in between; ``forward(x, return_hidden=True)`` also returns the input of
    the last layer (the post-ReLU hidden feature of the penultimate layer)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: Tensor, return_hidden: bool = False):
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        out = self.layers[-1](x)
        return (out, x) if return_hidden else out


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention, deformable cross-attention, FFN."""

    def __init__(
        self,
        dim: int = 256,
        num_heads: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        num_levels: int = 3,
        num_points: int = 4,
        fp32_geometry: bool = False,
        bf16_geometry: bool = False,
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MSDeformableAttention(
            dim,
            num_heads=num_heads,
            num_levels=num_levels,
            num_points=num_points,
            sample_fp32=fp32_geometry,
            bf16_geometry=bf16_geometry,
        )
        self.norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.dropout3, self.dropout4 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        ref_boxes: Tensor,
        memory: Tensor,
        spatial_shapes: list[tuple[int, int]],
        attn_mask: Tensor | None,
        query_pos: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """tgt [B, Q, C], ref_boxes [B, Q, 4] cxcywh → (tgt, sampling_locations, attention_weights)."""
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q, k, tgt, attn_mask=attn_mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2, locations, weights = self.cross_attn(tgt + query_pos, ref_boxes, memory, spatial_shapes)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        tgt = self.norm3(tgt + self.dropout4(tgt2))
        return tgt, locations, weights


def distinct_topk(scores: Tensor, boxes_unact: Tensor, k: int, iou_threshold: float) -> Tensor:
    """Indices [B, k] of the best-scoring proposals after class-agnostic NMS (DDQ-DETR's distinct queries).

    ``scores`` [B, N] (any monotone score), ``boxes_unact`` [B, N, 4] logit-space cxcywh. NMS runs on the
    best ``min(4k, N)`` proposals of each image; the survivors come first in score order, then, when fewer
    than ``k`` survive, the suppressed ones in score order, so every image still gets exactly ``k`` queries.
    Selection only: no gradient flows through it.
    """
    b, n = scores.shape
    m = min(4 * k, n)
    with torch.no_grad():
        cand_scores, cand = scores.float().topk(m, dim=1)  # [B, m]
        boxes = boxes_unact.gather(1, cand.unsqueeze(-1).expand(-1, -1, 4)).float().sigmoid()
        boxes = box_convert(boxes.reshape(-1, 4), "cxcywh", "xyxy")
        image = torch.arange(b, device=scores.device).repeat_interleave(m)
        keep = batched_nms(boxes, cand_scores.reshape(-1), image, iou_threshold)
        kept = torch.zeros(b * m, dtype=torch.bool, device=scores.device)
        kept[keep] = True
        # survivors outrank every suppressed proposal; within each group the candidate order (score) holds
        rank = torch.arange(m, device=scores.device).expand(b, m) + (~kept.view(b, m)) * m
        order = rank.topk(k, dim=1, largest=False).indices
        return cand.gather(1, order)


class RTDETRDecoder(nn.Module):
    """Query selection + deformable transformer decoder + heads (RT-DETR's ``RTDETRTransformer``)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: tuple[int, ...] = (256, 256, 256),
        hidden_dim: int = 256,
        num_queries: int = 300,
        num_levels: int = 3,
        num_points: int = 4,
        num_heads: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        eps: float = 1e-2,
        query_nms: float = 0.0,
        select_from_level: int = 0,
        fp32_geometry: bool = False,
        bf16_geometry: bool = False,
    ):
        super().__init__()
        if len(in_channels) > num_levels:
            raise ValueError(f"{len(in_channels)} input maps but num_levels={num_levels}")
        self.num_classes, self.hidden_dim, self.num_queries = num_classes, hidden_dim, num_queries
        self.num_levels, self.num_layers, self.eps = num_levels, num_layers, eps
        self.query_nms = query_nms
        self.fp32_geometry = fp32_geometry
        self.bf16_geometry = bf16_geometry
        self.select_from_level = select_from_level
        self.num_denoising, self.label_noise_ratio, self.box_noise_scale = (
            num_denoising,
            label_noise_ratio,
            box_noise_scale,
        )

        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim))
            for c in in_channels
        )
        c_in = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):  # extra coarser levels from the last map
            self.input_proj.append(
                nn.Sequential(nn.Conv2d(c_in, hidden_dim, 3, 2, 1, bias=False), nn.BatchNorm2d(hidden_dim))
            )
            c_in = hidden_dim

        self.layers = nn.ModuleList(
            DecoderLayer(
                hidden_dim,
                num_heads=num_heads,
                dim_feedforward=dim_feedforward,
                dropout=dropout,
                num_levels=num_levels,
                num_points=num_points,
                fp32_geometry=fp32_geometry,
                bf16_geometry=bf16_geometry,
            )
            for _ in range(num_layers)
        )
        self.denoising_class_embed = (
            nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes) if num_denoising > 0 else None
        )
        self.query_pos_head = MLP(4, hidden_dim=2 * hidden_dim, out_dim=hidden_dim, num_layers=2)
        self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim=hidden_dim, out_dim=4, num_layers=3)
        self.dec_score_head = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_layers))
        self.dec_bbox_head = nn.ModuleList(
            MLP(hidden_dim, hidden_dim=hidden_dim, out_dim=4, num_layers=3) for _ in range(num_layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        prior = -math.log((1 - 0.01) / 0.01)  # class bias for a 1% prior
        nn.init.constant_(self.enc_score_head.bias, prior)
        for head in self.dec_score_head:
            nn.init.constant_(head.bias, prior)
        for mlp in [self.enc_bbox_head, *self.dec_bbox_head]:
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        nn.init.xavier_uniform_(self.enc_output[0].weight)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)

    # ------------------------------------------------------------------ pieces

    def memory(self, feats: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Encoder maps → projected, flattened memory [B, ΣHW, C] (levels finest first) and their (H, W)."""
        proj = [p(f) for p, f in zip(self.input_proj, feats)]
        for p in self.input_proj[len(feats) :]:
            proj.append(p(feats[-1] if len(proj) == len(feats) else proj[-1]))
        shapes = [(int(x.shape[2]), int(x.shape[3])) for x in proj]
        memory = torch.cat([x.flatten(2).transpose(1, 2) for x in proj], dim=1)  # [B, ΣHW, C]
        return memory, shapes

    def anchors(
        self, shapes: list[tuple[int, int]], device=None, dtype=torch.float32, grid_size: float = 0.05
    ) -> tuple[Tensor, Tensor]:
        """Logit-space anchors [1, ΣHW, 4] (cxcywh; ``inf`` where invalid) and valid mask [1, ΣHW, 1]."""
        out = []
        for lvl, (h, w) in enumerate(shapes):
            ys, xs = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=device),
                torch.arange(w, dtype=torch.float32, device=device),
                indexing="ij",
            )
            centres = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], -1).reshape(-1, 2)
            out.append(torch.cat([centres, torch.full_like(centres, grid_size * 2.0**lvl)], -1))
        anchors = torch.cat(out).unsqueeze(0)
        valid = ((anchors > self.eps) & (anchors < 1 - self.eps)).all(-1, keepdim=True)
        logits = torch.log(anchors / (1 - anchors))
        return torch.where(valid, logits, torch.inf).to(dtype), valid

    def round_geometry(self, x: Tensor) -> Tensor:
        """``bf16_geometry`` (a diagnostic): boxes and references rounded to bfloat16 precision, as bf16
        autocast leaves them, while computing in float32; otherwise ``x`` itself."""
        return bf16_round(x) if self.bf16_geometry else x

    def geometry_dtype(self, features: Tensor) -> torch.dtype:
        """dtype of boxes, reference points and sampling locations: float32 with ``fp32_geometry`` (under
        bf16 autocast a coordinate near 1 is quantised to 1/256 of the image, 1.25 px at 320 px), else
        the features' dtype."""
        return torch.float32 if self.fp32_geometry else features.dtype

    def _select_queries(self, memory: Tensor, shapes):
        skip = self.select_from_level  # the finest levels that are only sampled, never selected
        memory, shapes = memory[:, sum(h * w for h, w in shapes[:skip]) :], shapes[skip:]
        anchors, valid = self.anchors(shapes, memory.device, self.geometry_dtype(memory))
        out_memory = self.enc_output(memory * valid.to(memory.dtype))
        enc_logits = self.enc_score_head(out_memory)  # [B, ΣHW, K]
        enc_coords = self.round_geometry(
            self.enc_bbox_head(out_memory).to(anchors.dtype) + anchors
        )  # logit cxcywh
        k = min(self.num_queries, memory.shape[1])
        if k < self.num_queries and not getattr(self, "_warned_queries", False):
            self._warned_queries = True  # once per model: said, not silently used
            warnings.warn(
                f"model.num_queries={self.num_queries} exceeds the {memory.shape[1]} selectable encoder "
                f"tokens at this image size; {k} queries are used",
                stacklevel=2,
            )
        scores = enc_logits.max(-1).values  # [B, ΣHW]
        if self.query_nms > 0:
            topk = distinct_topk(scores, enc_coords, k, self.query_nms)
        else:
            topk = scores.topk(k, dim=1).indices  # [B, k]

        def take(x: Tensor) -> Tensor:
            return x.gather(1, topk.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

        ref_unact = take(enc_coords)
        enc_out = {"pred_logits": take(enc_logits), "pred_boxes": ref_unact.sigmoid()}
        dense_out = {"pred_logits": enc_logits, "pred_boxes": enc_coords.sigmoid()}
        return take(out_memory).detach(), ref_unact.detach(), enc_out, dense_out

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        feats: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        return_sampling: bool = False,
        return_hidden: bool = False,
    ) -> dict:
        """
        Args:
            feats: encoder maps [B, C_l, H_l, W_l], finest first.
            targets: per image ``boxes`` [N, 4] normalised cxcywh, ``labels`` [N]; used for denoising in
                training mode only.
            return_sampling: add ``sampling_locations`` [B, Q, heads, L, P, 2], ``attention_weights``
                [B, Q, heads, L, P] and ``ref_boxes`` [B, Q, 4] (the detached cxcywh box the layer
                sampled around) to every layer dict.
            return_hidden: add ``hidden_cls`` [B, Q, C] (input of the class head) and ``hidden_reg``
                [B, Q, C] (post-ReLU penultimate feature of the box MLP) to every layer dict.

        Returns (training): ``pred_logits`` [B, Q, K], ``pred_boxes`` [B, Q, 4] (last layer, normalised
        cxcywh), ``aux_outputs`` (layers 0..L-2), ``enc_outputs`` (the K selected proposals), and when
        denoising ran ``dn_outputs`` (L dicts over the denoising queries) and ``dn_meta``.
        Returns (eval): ``pred_logits``, ``pred_boxes`` and, when extras are requested, the last layer's
        extras at the top level and ``layers`` (L dicts).
        """
        return self.forward_memory(*self.memory(feats), targets, return_sampling, return_hidden)

    def forward_memory(
        self,
        memory: Tensor,
        shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
        return_sampling: bool = False,
        return_hidden: bool = False,
    ) -> dict:
        """:meth:`forward` from an already projected memory (see :meth:`memory`); same output dict."""
        dn_embed = dn_boxes = attn_mask = dn_meta = None
        target, ref_unact, enc_out, dense_out = self._select_queries(memory, shapes)
        if self.training and targets is not None and self.denoising_class_embed is not None:
            dn_embed, dn_boxes, attn_mask, dn_meta = get_contrastive_denoising_training_group(
                targets,
                self.num_classes,
                target.shape[1],
                self.denoising_class_embed,
                self.num_denoising,
                self.label_noise_ratio,
                self.box_noise_scale,
            )
        if dn_meta is not None:
            target = torch.cat([dn_embed.to(target.dtype), target], 1)
            ref_unact = torch.cat([dn_boxes.to(ref_unact.dtype), ref_unact], 1)

        layers = self.decode_queries(
            target, ref_unact, memory, shapes, attn_mask, return_sampling, return_hidden
        )

        if dn_meta is not None:
            split = dn_meta["dn_num_split"]
            halves = [{k: v.split(split, dim=1) for k, v in layer.items()} for layer in layers]
            dn_layers = [{k: v[0] for k, v in h.items()} for h in halves]
            layers = [{k: v[1] for k, v in h.items()} for h in halves]
        out = dict(layers[-1])
        if self.training:
            out["aux_outputs"] = layers[:-1]
            out["enc_outputs"] = enc_out
            out["enc_dense_outputs"] = dense_out
            if dn_meta is not None:
                out["dn_outputs"] = dn_layers
                out["dn_meta"] = dn_meta
        elif return_sampling or return_hidden:
            out["layers"] = layers
        return out

    def decode_queries(
        self,
        target: Tensor,
        ref_unact: Tensor,
        memory: Tensor,
        shapes,
        attn_mask: Tensor | None,
        return_sampling: bool = False,
        return_hidden: bool = False,
    ) -> list[dict[str, Tensor]]:
        """Run content queries ``target`` [B, Q, C] with logit-space reference boxes ``ref_unact`` [B, Q, 4]
        through all decoder layers; one dict per layer (``pred_logits``, ``pred_boxes`` and extras).
        ``attn_mask``: None, [Q, Q] (every image) or [B, Q, Q] (per image) bool, True = may not attend."""
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.repeat_interleave(self.layers[0].self_attn.num_heads, dim=0)
        output = target
        ref = self.round_geometry(ref_unact.sigmoid())  # detached reference boxes
        prev_box = None  # undetached refined box of the previous layer
        layers = []
        for i, layer in enumerate(self.layers):
            query_pos = self.query_pos_head(ref)
            output, locations, weights = layer(output, ref, memory, shapes, attn_mask, query_pos)
            delta, hidden_reg = self.dec_bbox_head[i](output, return_hidden=True)
            delta = delta.to(ref.dtype)  # fp32_geometry: the refined box is added up in float32
            box = self.round_geometry(torch.sigmoid(delta + inverse_sigmoid(ref)))
            # the reported box adds this layer's delta to the undetached previous box (same value as `box`)
            reported = (
                box
                if prev_box is None
                else self.round_geometry(torch.sigmoid(delta + inverse_sigmoid(prev_box)))
            )
            entry = {"pred_logits": self.dec_score_head[i](output), "pred_boxes": reported}
            if return_sampling:
                entry.update(sampling_locations=locations, attention_weights=weights, ref_boxes=ref)
            if return_hidden:
                entry.update(hidden_cls=output, hidden_reg=hidden_reg)
            layers.append(entry)
            prev_box = box
            ref = box.detach()
        return layers

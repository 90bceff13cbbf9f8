"""MRQM's encoder (paper B): a BiFPN over P2..P5 followed by the scale-aware encoder (SAE).

``BiFPNSAEEncoder(feats) -> [F''_2, F''_3, F''_4, F''_5]`` (all ``hidden_dim`` channels, strides 4..32):

1. :class:`BiFPN` (EfficientDet): 1×1 conv + BN lateral projections to C, then ``repeats`` BiFPN layers.
   Each layer has a top-down and a bottom-up path; every node fuses its inputs with fast normalised
   fusion, ``out = Σ_i w_i·x_i / (Σ_j w_j + 1e-4)`` with ``w = ReLU(learned)``, followed by a
   depthwise-separable 3×3 conv + BN + SiLU. Resampling: nearest upsampling, 3×3/2 max-pooling down.
2. :class:`ScaleAwareEncoder`: the high-level tokens F_H = concat(F3, F4, F5) are updated
   ``high_updates`` times, F'_H = Attn(Q=F_H, K=V=F) with F = (F2, F_H) the current pyramid; then the
   low-level tokens once, F'_2 = Attn(Q=F2, K=V=F') with F' = (F2, F'_H); F'' = (F'_2, F'_H).
   The notes write softmax(QKᵀ/√d)V but name it DeformAttn; as in Lite DETR every update is a
   post-norm Deformable-DETR encoder layer (multi-scale deformable self-attention over all 4 levels +
   FFN), queries carry a 2-D sin-cos position embedding plus a learned level embedding, and each
   token's reference point is its own centre.

:class:`NaiveDeformableEncoder` is the cost baseline of ``sodlib.studies.bench.encoder_cost``: the same
layers, but every layer updates ALL tokens of all levels (``high_updates + 1`` layers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sodlib.models.deform_attn import MSDeformableAttention
from sodlib.models.encoder import sincos_position_embedding_2d

__all__ = [
    "BiFPN",
    "BiFPNLayer",
    "BiFPNSAEEncoder",
    "DeformableEncoderLayer",
    "NaiveDeformableEncoder",
    "ScaleAwareEncoder",
    "SeparableConvBlock",
    "flatten_levels",
    "unflatten_levels",
]


class SeparableConvBlock(nn.Sequential):
    """Depthwise 3×3 conv → pointwise 1×1 conv → BN → activation (EfficientDet's fusion conv)."""

    def __init__(self, channels: int, act: Callable[[], nn.Module] = nn.SiLU):
        super().__init__(
            nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            act(),
        )


class _FastFusion(nn.Module):
    """Fast normalised fusion of ``n`` same-shape maps: Σ ReLU(w_i) x_i / (Σ ReLU(w_j) + eps)."""

    def __init__(self, n: int, eps: float = 1e-4):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, xs: list[Tensor]) -> Tensor:
        w = F.relu(self.weight)
        w = w / (w.sum() + self.eps)
        return sum(wi * x for wi, x in zip(w.to(xs[0].dtype), xs))


def _resize_to(x: Tensor, ref: Tensor) -> Tensor:
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="nearest")


class BiFPNLayer(nn.Module):
    """One BiFPN layer over ``num_levels`` maps of C channels, finest first.

    Top-down: td_{n-1} = x_{n-1}; td_i = conv(fuse(x_i, up(td_{i+1}))).
    Bottom-up: out_0 = td_0; out_i = conv(fuse(x_i, td_i, down(out_{i-1}))) for 0 < i < n-1;
    out_{n-1} = conv(fuse(x_{n-1}, down(out_{n-2}))).
    """

    def __init__(self, channels: int, num_levels: int = 4, act: Callable[[], nn.Module] = nn.SiLU):
        super().__init__()
        n = num_levels
        self.td_fuse = nn.ModuleList(_FastFusion(2) for _ in range(n - 1))  # levels 0..n-2
        self.td_conv = nn.ModuleList(SeparableConvBlock(channels, act) for _ in range(n - 1))
        self.bu_fuse = nn.ModuleList(_FastFusion(3 if i < n - 1 else 2) for i in range(1, n))  # levels 1..n-1
        self.bu_conv = nn.ModuleList(SeparableConvBlock(channels, act) for _ in range(n - 1))

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        n = len(xs)
        td = [None] * n
        td[-1] = xs[-1]
        for i in range(n - 2, -1, -1):
            td[i] = self.td_conv[i](self.td_fuse[i]([xs[i], _resize_to(td[i + 1], xs[i])]))
        outs = [td[0]]
        for i in range(1, n):
            down = _resize_to(F.max_pool2d(outs[-1], 3, 2, 1), xs[i])
            inputs = [xs[i], td[i], down] if i < n - 1 else [xs[i], down]
            outs.append(self.bu_conv[i - 1](self.bu_fuse[i - 1](inputs)))
        return outs


class BiFPN(nn.Module):
    """Lateral 1×1 conv + BN projections to ``channels``, then ``repeats`` :class:`BiFPNLayer`."""

    def __init__(
        self,
        in_channels: tuple[int, ...],
        channels: int,
        repeats: int = 2,
        act: Callable[[], nn.Module] = nn.SiLU,
    ):
        super().__init__()
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, channels, 1, bias=False), nn.BatchNorm2d(channels))
            for c in in_channels
        )
        self.layers = nn.ModuleList(BiFPNLayer(channels, len(in_channels), act) for _ in range(repeats))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        xs = [p(f) for p, f in zip(self.lateral, feats)]
        for layer in self.layers:
            xs = layer(xs)
        return xs


# ---------------------------------------------------------------- deformable encoder layers


def flatten_levels(maps: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
    """[B, C, H_l, W_l] maps → tokens [B, ΣHW, C] (row-major, levels in order) and their (H, W)."""
    shapes = [(int(m.shape[2]), int(m.shape[3])) for m in maps]
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1), shapes


def unflatten_levels(tokens: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """Inverse of :func:`flatten_levels`."""
    parts = tokens.split([h * w for h, w in shapes], dim=1)
    return [p.transpose(1, 2).reshape(p.shape[0], p.shape[2], h, w) for p, (h, w) in zip(parts, shapes)]


def _token_centres(shapes: list[tuple[int, int]], device, dtype) -> Tensor:
    """Normalised (x, y) centre of every token [ΣHW, 2]."""
    out = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(
            torch.arange(h, device=device, dtype=torch.float32),
            torch.arange(w, device=device, dtype=torch.float32),
            indexing="ij",
        )
        out.append(torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], -1).reshape(-1, 2))
    return torch.cat(out).to(dtype)


class DeformableEncoderLayer(nn.Module):
    """Post-norm Deformable DETR encoder layer: multi-scale deformable attention + FFN.

    ``forward(query, pos, reference, value, value_shapes)``: ``query`` [B, Q, C] tokens to update, ``pos``
    [B|1, Q, C] their position embedding, ``reference`` [B|1, Q, 2] normalised centres, ``value`` [B, ΣHW, C]
    the whole pyramid (levels in ``value_shapes`` order).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_levels: int,
        num_points: int,
        dim_feedforward: int,
        dropout: float = 0.0,
        act: Callable[[], nn.Module] = nn.ReLU,
    ):
        super().__init__()
        self.attn = MSDeformableAttention(
            dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim_feedforward), act(), nn.Dropout(dropout), nn.Linear(dim_feedforward, dim)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, query: Tensor, pos: Tensor, reference: Tensor, value: Tensor, value_shapes) -> Tensor:
        ref = reference.expand(query.shape[0], -1, -1)
        out = self.attn(query + pos, ref, value, value_shapes)[0]
        query = self.norm1(query + self.dropout1(out))
        return self.norm2(query + self.dropout2(self.ffn(query)))


class _PyramidEncoder(nn.Module):
    """Shared parts of the SAE and the naive encoder: position/level embeddings and reference points."""

    def __init__(self, dim: int, num_levels: int, pe_temperature: float = 10000.0):
        super().__init__()
        self.dim, self.num_levels, self.pe_temperature = dim, num_levels, pe_temperature
        self.level_embed = nn.Parameter(torch.empty(num_levels, dim))
        nn.init.normal_(self.level_embed)

    def embed(self, shapes: list[tuple[int, int]], device, dtype) -> tuple[Tensor, Tensor]:
        """Position embedding [1, ΣHW, C] (2-D sin-cos + level embedding) and centres [1, ΣHW, 2]."""
        pos = torch.cat(
            [
                sincos_position_embedding_2d(h, w, self.dim, self.pe_temperature, device, dtype)
                + self.level_embed[lvl].to(dtype)
                for lvl, (h, w) in enumerate(shapes)
            ],
            1,
        )
        return pos, _token_centres(shapes, device, dtype).unsqueeze(0)

    @staticmethod
    def _layers(n: int, dim, num_heads, num_levels, num_points, dim_feedforward, dropout) -> nn.ModuleList:
        return nn.ModuleList(
            DeformableEncoderLayer(
                dim,
                num_heads=num_heads,
                num_levels=num_levels,
                num_points=num_points,
                dim_feedforward=dim_feedforward,
                dropout=dropout,
            )
            for _ in range(n)
        )

    def _check(self, maps: list[Tensor]) -> None:
        if len(maps) != self.num_levels:
            raise ValueError(f"{type(self).__name__}: expected {self.num_levels} maps, got {len(maps)}")


class ScaleAwareEncoder(_PyramidEncoder):
    """SAE: ``high_updates`` layers update F_H = (F3, F4, F5) over the pyramid, then one layer updates F2.

    Input / output: ``num_levels`` maps [B, C, H_l, W_l], finest (F2) first.
    """

    def __init__(
        self,
        dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        dim_feedforward: int = 1024,
        high_updates: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__(dim, num_levels)
        spec = (dim, num_heads, num_levels, num_points, dim_feedforward, dropout)
        self.high_layers = self._layers(high_updates, *spec)
        self.low_layer = DeformableEncoderLayer(*spec)

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        self._check(maps)
        tokens, shapes = flatten_levels(maps)
        pos, ref = self.embed(shapes, tokens.device, tokens.dtype)
        n_low = shapes[0][0] * shapes[0][1]
        low, high = tokens[:, :n_low], tokens[:, n_low:]
        for layer in self.high_layers:  # F'_H = Attn(Q=F_H, K=V=F), repeated on the current pyramid
            high = layer(high, pos[:, n_low:], ref[:, n_low:], torch.cat([low, high], 1), shapes)
        # F'_L = Attn(Q=F_L, K=V=F') with F' = (F_L, F'_H); F'' = (F'_L, F'_H)
        low = self.low_layer(low, pos[:, :n_low], ref[:, :n_low], torch.cat([low, high], 1), shapes)
        return unflatten_levels(torch.cat([low, high], 1), shapes)


class NaiveDeformableEncoder(_PyramidEncoder):
    """Cost baseline: ``num_layers`` deformable encoder layers, each updating every token of every level."""

    def __init__(
        self,
        dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        dim_feedforward: int = 1024,
        num_layers: int = 3,
        dropout: float = 0.0,
    ):
        super().__init__(dim, num_levels)
        self.layers = self._layers(
            num_layers, dim, num_heads, num_levels, num_points, dim_feedforward, dropout
        )

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        self._check(maps)
        tokens, shapes = flatten_levels(maps)
        pos, ref = self.embed(shapes, tokens.device, tokens.dtype)
        for layer in self.layers:
            tokens = layer(tokens, pos, ref, tokens, shapes)
        return unflatten_levels(tokens, shapes)


class BiFPNSAEEncoder(nn.Module):
    """MRQM's encoder: :class:`BiFPN` then a pyramid encoder (default :class:`ScaleAwareEncoder`).

    Args:
        in_channels: backbone channels of C2..C5 (strides 4..32).
        hidden_dim, num_heads, num_points, dim_feedforward, dropout: of the deformable encoder layers.
        bifpn_repeats: BiFPN layers; sae_high_updates: SAE updates of F_H.
        pyramid: the encoder after the BiFPN, a module over the 4 ``hidden_dim`` maps; ``None`` builds the
            :class:`ScaleAwareEncoder` from the arguments above (``encoder_cost`` passes a
            :class:`NaiveDeformableEncoder` for its cost comparison).

    Forward: 4 maps [B, C_in_l, H_l, W_l] → 4 maps [B, hidden_dim, H_l, W_l]; ``out_channels`` as
    HybridEncoder.
    """

    def __init__(
        self,
        in_channels: tuple[int, ...],
        *,
        hidden_dim: int = 256,
        num_heads: int = 8,
        num_points: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        bifpn_repeats: int = 2,
        sae_high_updates: int = 2,
        pyramid: nn.Module | None = None,
    ):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"BiFPNSAEEncoder needs the 4 backbone levels C2..C5, got {len(in_channels)}")
        self.in_channels = tuple(in_channels)
        self.out_channels = (hidden_dim,) * len(in_channels)
        self.bifpn = BiFPN(self.in_channels, hidden_dim, bifpn_repeats)
        self.sae = (
            pyramid
            if pyramid is not None
            else ScaleAwareEncoder(
                hidden_dim,
                num_heads=num_heads,
                num_levels=4,
                num_points=num_points,
                dim_feedforward=dim_feedforward,
                high_updates=sae_high_updates,
                dropout=dropout,
            )
        )

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature maps, got {len(feats)}")
        return self.sae(self.bifpn(feats))

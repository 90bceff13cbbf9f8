"""RT-DETR's hybrid encoder: AIFI (intra-scale attention on the stride-32 map) + CCFM (cross-scale fusion).

``HybridEncoder(feats) -> [P3, P4, P5]``: each backbone map is projected to ``hidden_dim`` by a 1×1
conv + BN; one transformer encoder layer with a fixed 2-D sin-cos position embedding runs on the
last (stride-32) map only; then a top-down (FPN) and a bottom-up (PAN) path fuse the scales with
CSPRepLayers built from RepVGG blocks. All outputs have ``hidden_dim`` channels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AIFILayer",
    "CSPRepLayer",
    "ConvNormLayer",
    "HybridEncoder",
    "RepVggBlock",
    "sincos_position_embedding_2d",
]


def sincos_position_embedding_2d(
    h: int,
    w: int,
    dim: int,
    temperature: float = 10000.0,
    device=None,
    dtype=torch.float32,
    layout: str = "xy",
) -> Tensor:
    """Fixed 2-D sin-cos embedding [1, h·w, dim] for a row-major flattened h×w map.

    ``layout="xy"``: token (y, x) gets [sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)] with
    ω_k = temperature^(-k/(dim/4)).

    ``layout="rtdetr"``: what RT-DETR's released code computes, needed to reproduce its checkpoints. It
    builds the grid as (w, h) and flattens it in that order, so token t = y·w + x gets the pair
    (a, b) = (t // h, t % h) in place of (x, y). On a square map that is (y, x): the same embedding as
    ``xy`` with its two halves swapped (transformers' RT-DETR port computes (y, x) on every map; the two
    agree on square maps, the size RT-DETR trains and evaluates at). On a non-square map (a, b) is not a
    spatial coordinate; we keep it for equal outputs with the released weights.
    """
    if dim % 4:
        raise ValueError(f"embedding dim must be divisible by 4 for a 2-D sin-cos embedding, got {dim}")
    if layout not in ("xy", "rtdetr"):
        raise ValueError(f"position embedding layout must be 'xy' or 'rtdetr', got {layout!r}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    token = torch.arange(h * w, device=device)
    if layout == "xy":
        first, second = token % w, token // w  # x, y
    else:
        first, second = token // h, token % h
    out_1 = first.to(torch.float32).reshape(-1, 1) * omega
    out_2 = second.to(torch.float32).reshape(-1, 1) * omega
    emb = torch.cat([out_1.sin(), out_1.cos(), out_2.sin(), out_2.cos()], dim=1)
    return emb.unsqueeze(0).to(dtype)


class ConvNormLayer(nn.Sequential):
    """Conv (no bias) + BatchNorm + activation (``nn.Identity`` for none)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int = 1,
        act: Callable[[], nn.Module] | None = nn.SiLU,
    ):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, bias=False),
            nn.BatchNorm2d(c_out),
            act() if act is not None else nn.Identity(),
        )


class RepVggBlock(nn.Module):
    """act(BN(conv3×3(x)) + BN(conv1×1(x))) — RepVGG's training-time form (no identity branch)."""

    def __init__(self, channels: int, act: Callable[[], nn.Module] = nn.SiLU):
        super().__init__()
        self.conv3 = ConvNormLayer(channels, channels, 3, act=None)
        self.conv1 = ConvNormLayer(channels, channels, 1, act=None)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv3(x) + self.conv1(x))


class CSPRepLayer(nn.Module):
    """CSP layer: conv1 → RepVGG blocks, plus conv2 shortcut branch, summed, then conv3 (if widths differ)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        num_blocks: int = 3,
        expansion: float = 1.0,
        act: Callable[[], nn.Module] = nn.SiLU,
    ):
        super().__init__()
        hidden = max(int(c_out * expansion), 1)
        self.conv1 = ConvNormLayer(c_in, hidden, 1, act=act)
        self.conv2 = ConvNormLayer(c_in, hidden, 1, act=act)
        self.blocks = nn.Sequential(*[RepVggBlock(hidden, act) for _ in range(num_blocks)])
        self.conv3 = ConvNormLayer(hidden, c_out, 1, act=act) if hidden != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.blocks(self.conv1(x)) + self.conv2(x))


class AIFILayer(nn.Module):
    """Post-norm transformer encoder layer; the position embedding is added to queries and keys."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dim_feedforward: int,
        dropout: float = 0.0,
        act: Callable[[], nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim_feedforward), act(), nn.Dropout(dropout), nn.Linear(dim_feedforward, dim)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        q = k = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, src, need_weights=False)[0]))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class HybridEncoder(nn.Module):
    """AIFI + CCFM.

    Args:
        in_channels: channels of the backbone maps, finest first (e.g. C3, C4, C5).
        hidden_dim: output channels C of every level.
        num_heads, dim_feedforward, dropout: of the AIFI layer(s).
        num_encoder_layers: AIFI layers (RT-DETR: 1) on the map(s) in ``use_encoder_idx`` (default: last).
        csp_blocks: RepVGG blocks per CSPRepLayer (RT-DETR: round(3 · depth_mult)).
        expansion: CSPRepLayer hidden width factor.
        pe_temperature: temperature of the sin-cos position embedding.
        pos_embed: layout of the AIFI position embedding, ``xy`` or ``rtdetr`` (see
            :func:`sincos_position_embedding_2d`).
        light_levels: how many of the finest maps bypass AIFI and CCFM (not RT-DETR; ``model.p2_values``):
            each is a 1×1 projection plus the nearest-upsampled output of the next coarser level, a cheap
            high-resolution level for the decoder to sample.

    Forward: list of maps [B, C_in_l, H_l, W_l] → list of maps [B, hidden_dim, H_l, W_l].
    """

    def __init__(
        self,
        in_channels: tuple[int, ...] = (512, 1024, 2048),
        hidden_dim: int = 256,
        num_heads: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        num_encoder_layers: int = 1,
        use_encoder_idx: tuple[int, ...] = (-1,),
        csp_blocks: int = 3,
        expansion: float = 1.0,
        pe_temperature: float = 10000.0,
        act: Callable[[], nn.Module] = nn.SiLU,
        enc_act: Callable[[], nn.Module] = nn.GELU,
        light_levels: int = 0,
        pos_embed: str = "xy",
    ):
        super().__init__()
        sincos_position_embedding_2d(1, 1, hidden_dim, layout=pos_embed)  # validates dim and layout now
        self.pos_embed = pos_embed
        if not 0 <= light_levels < len(in_channels):
            raise ValueError(f"light_levels must lie in [0, {len(in_channels)}), got {light_levels}")
        self.in_channels = tuple(in_channels)
        self.light_levels = light_levels
        # the finest `light_levels` maps skip AIFI/CCFM: 1×1 projection + the upsampled next-coarser output
        self.light_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim))
            for c in in_channels[:light_levels]
        )
        in_channels = in_channels[light_levels:]
        n = len(in_channels)
        self.hidden_dim = hidden_dim
        self.pe_temperature = pe_temperature
        self.use_encoder_idx = tuple(i % n for i in use_encoder_idx)
        self.out_channels = (hidden_dim,) * len(self.in_channels)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim))
            for c in in_channels
        )
        self.encoder = nn.ModuleList(
            nn.ModuleList(
                AIFILayer(
                    hidden_dim,
                    num_heads=num_heads,
                    dim_feedforward=dim_feedforward,
                    dropout=dropout,
                    act=enc_act,
                )
                for _ in range(num_encoder_layers)
            )
            for _ in self.use_encoder_idx
        )
        # top-down: lateral_convs[i] / fpn_blocks[i] fuse level n-1-i into level n-2-i
        self.lateral_convs = nn.ModuleList(
            ConvNormLayer(hidden_dim, hidden_dim, 1, act=act) for _ in range(n - 1)
        )
        self.fpn_blocks = nn.ModuleList(
            CSPRepLayer(2 * hidden_dim, c_out=hidden_dim, num_blocks=csp_blocks, expansion=expansion, act=act)
            for _ in range(n - 1)
        )
        # bottom-up: downsample_convs[i] / pan_blocks[i] fuse level i into level i+1
        self.downsample_convs = nn.ModuleList(
            ConvNormLayer(hidden_dim, c_out=hidden_dim, kernel=3, stride=2, act=act) for _ in range(n - 1)
        )
        self.pan_blocks = nn.ModuleList(
            CSPRepLayer(2 * hidden_dim, c_out=hidden_dim, num_blocks=csp_blocks, expansion=expansion, act=act)
            for _ in range(n - 1)
        )

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature maps, got {len(feats)}")
        light, feats = feats[: self.light_levels], feats[self.light_levels :]
        outs = self._fuse(feats)
        for p, f in zip(reversed(self.light_proj), reversed(light)):  # FPN-style top-down, no conv block
            outs.insert(0, p(f) + F.interpolate(outs[0], size=f.shape[-2:], mode="nearest"))
        return outs

    def _fuse(self, feats: list[Tensor]) -> list[Tensor]:
        """AIFI on the coarsest map, then CCFM's top-down and bottom-up paths (RT-DETR)."""
        proj = [p(f) for p, f in zip(self.input_proj, feats)]
        for layers, idx in zip(self.encoder, self.use_encoder_idx):
            b, c, h, w = proj[idx].shape
            src = proj[idx].flatten(2).transpose(1, 2)  # [B, H*W, C]
            pos = sincos_position_embedding_2d(
                h, w, c, self.pe_temperature, src.device, src.dtype, self.pos_embed
            )
            for layer in layers:
                src = layer(src, pos)
            proj[idx] = src.transpose(1, 2).reshape(b, c, h, w)

        n = len(proj)
        inner = [proj[-1]]  # top-down, coarsest first
        for i in range(n - 1):
            high = self.lateral_convs[i](inner[0])
            inner[0] = high
            low = proj[n - 2 - i]
            up = F.interpolate(high, size=low.shape[-2:], mode="nearest")
            inner.insert(0, self.fpn_blocks[i](torch.cat([up, low], dim=1)))

        outs = [inner[0]]  # bottom-up, finest first
        for i in range(n - 1):
            down = self.downsample_convs[i](outs[-1])
            high = inner[i + 1]
            if down.shape[-2:] != high.shape[-2:]:  # odd sizes
                down = F.interpolate(down, size=high.shape[-2:], mode="nearest")
            outs.append(self.pan_blocks[i](torch.cat([down, high], dim=1)))
        return outs

"""Multi-scale deformable attention (Deformable DETR / RT-DETR), pure PyTorch.

``ms_deform_attn_core`` is the hot path of the decoder. RT-DETR's ``deformable_attention_core_func``
runs one ``grid_sample`` per level, stacks the samples to [B·heads, D, Q, L·P] and reduces them with
the attention weights; that version is kept as :func:`ms_deform_attn_core_reference` for tests and
benchmarks. Two faster implementations share its exact semantics:

* ``gather`` (used when no gradient is recorded: evaluation, inference, heat-maps): the 2×2 pixel
  cell of every point is computed directly, bilinear (tent) weight × attention weight becomes one
  weight per corner, and ``F.embedding_bag(mode="sum", per_sample_weights=...)`` gathers and sums all
  levels in one kernel. Each (batch, query, head) is a bag of L·P·4 rows of the value table
  [B·ΣHW·heads, head_dim], so the result is already laid out as [B, Q, heads·head_dim]. It supports
  autograd too, but embedding_bag's backward (sort + scatter) is ~2.5× slower on CPU than grid_sample's.
* ``grid_sample`` (used under autograd): one ``grid_sample`` per level, weighted and summed level by
  level, which skips the [.., L·P] stack and its backward copy.

Measured with :func:`benchmark_core` on 2 CPU threads (best of 30): at the ``cpu`` profile's scale
(320 px, 300 queries: 200 matching + denoising, head_dim 16) all three forwards take ~4 ms and training
(forward + backward) 13 ms (reference 13–14 ms); at 640 px (2 × 500 queries, head_dim 32) the no-grad
forward takes 4.4 ms against the reference's 12 ms, forward + backward 33.6 ms against the reference's
34.2 ms (results/bench/model.csv). A single grid_sample over zero-padded, stacked levels is exact too but
is slower (padded maps are ~2.3× ΣHW at 3 levels).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MSDeformableAttention",
    "benchmark_core",
    "bf16_round",
    "ms_deform_attn_core",
    "ms_deform_attn_core_reference",
]


def _shapes_list(spatial_shapes) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn_core_reference(
    value: Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Per-level ``grid_sample`` loop (RT-DETR's semantics); the ground truth for the fast version.

    Shapes as in :func:`ms_deform_attn_core`.
    """
    shapes = _shapes_list(spatial_shapes)
    bs, _, heads, dim = value.shape
    _, num_q, _, levels, points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(bs * heads, dim, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [B*heads, Q, P, 2]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    attn = attention_weights.transpose(1, 2).reshape(bs * heads, 1, num_q, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * attn).sum(-1)  # [B*heads, D, Q]
    return out.reshape(bs, heads * dim, num_q).transpose(1, 2)


def ms_deform_attn_core(
    value: Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    impl: str = "auto",
) -> Tensor:
    """Bilinear multi-scale deformable sampling, weighted by attention.

    Args:
        value: [B, ΣHW, heads, head_dim], levels concatenated (row-major) in ``spatial_shapes`` order.
        spatial_shapes: (H, W) per level (sequence or [L, 2] tensor).
        sampling_locations: [B, Q, heads, levels, points, 2] normalised (x, y); (0, 0) is the top-left
            corner of the map, (1, 1) the bottom-right one (``align_corners=False``); outside is zero.
        attention_weights: [B, Q, heads, levels, points].
        impl: ``"gather"`` (one ``embedding_bag`` over all levels), ``"grid_sample"`` (one call per
            level, summed level by level) or ``"auto"``: gather when no gradient is needed (eval,
            inference), grid_sample when autograd is recording (its CPU backward kernel beats every
            pure-PyTorch scatter we tried; see :func:`benchmark_core`).

    Returns:
        [B, Q, heads·head_dim]
    """
    if impl == "auto":
        needs_grad = torch.is_grad_enabled() and (
            value.requires_grad or sampling_locations.requires_grad or attention_weights.requires_grad
        )
        # ONNX export: GridSample is a standard operator (opset 16) where embedding_bag is not
        impl = "grid_sample" if needs_grad or torch.onnx.is_in_onnx_export() else "gather"
    if impl == "gather":
        return _core_gather(value, spatial_shapes, sampling_locations, attention_weights)
    if impl == "grid_sample":
        return _core_grid_sample(value, spatial_shapes, sampling_locations, attention_weights)
    raise ValueError(f"impl must be 'auto', 'gather' or 'grid_sample', got {impl!r}")


def _core_grid_sample(
    value: Tensor, spatial_shapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Per-level grid_sample, attention-weighted and summed level by level (no [.., L·P] stack)."""
    shapes = _shapes_list(spatial_shapes)
    bs, _, heads, dim = value.shape
    _, num_q, _, _, points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    out = None
    for lvl, (h, w) in enumerate(shapes):
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(bs * heads, dim, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1).to(v.dtype)  # [B*heads, Q, P, 2]
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        attn = attention_weights[:, :, :, lvl].transpose(1, 2).reshape(bs * heads, 1, num_q, points)
        term = (sampled * attn.to(sampled.dtype)).sum(-1)  # [B*heads, D, Q]
        out = term if out is None else out + term
    return out.view(bs, heads * dim, num_q).transpose(1, 2)


def _core_gather(
    value: Tensor, spatial_shapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """All levels at once: the 2×2 pixel cell of every point, one weighted ``embedding_bag``.

    The cell's top-left pixel c is clamped into the map (c ∈ [0, W-2]) and each of its two columns
    gets the tent weight max(0, 1 - |x - col|): inside the map that is the bilinear weight, and a
    column outside the map never gets a weight, so zero padding needs neither masks nor padded copies.
    """
    shapes = _shapes_list(spatial_shapes)
    bs, len_v, heads, dim = value.shape
    _, num_q, _, levels, points, _ = sampling_locations.shape
    if len(shapes) != levels or sum(h * w for h, w in shapes) != len_v:
        raise ValueError(f"spatial_shapes {shapes} do not match value length {len_v} / {levels} levels")
    if min(min(h, w) for h, w in shapes) < 2:  # a 2x2 cell does not fit
        return _core_grid_sample(value, shapes, sampling_locations, attention_weights)
    dev = value.device
    # pixel arithmetic in at least fp32 (fp16 cannot resolve sub-pixel positions on large maps)
    loc = sampling_locations if sampling_locations.dtype == torch.float64 else sampling_locations.float()
    wh = torch.tensor([(w, h) for h, w in shapes], dtype=loc.dtype, device=dev).view(levels, 1, 2)
    pix = loc * wh - 0.5  # [B, Q, heads, L, P, 2] (x, y) pixel coordinates (align_corners=False)
    cell = torch.minimum(pix.floor().nan_to_num_(0.0).clamp_(min=0), wh - 2)
    d = pix - cell
    w_lo = (1 - d.abs()).clamp_(min=0)  # weight of column / row `cell`
    w_hi = (1 - (d - 1).abs()).clamp_(min=0)  # weight of column / row `cell + 1`
    attn = attention_weights.to(loc.dtype)
    wy_lo, wy_hi = w_lo[..., 1] * attn, w_hi[..., 1] * attn
    wx_lo, wx_hi = w_lo[..., 0], w_hi[..., 0]
    corner_w = torch.stack([wx_lo * wy_lo, wx_hi * wy_lo, wx_lo * wy_hi, wx_hi * wy_hi], -1)  # [.., L, P, 4]

    cell = cell.long()
    width = torch.tensor([w for _, w in shapes], dtype=torch.long, device=dev)
    starts = torch.tensor([0] + [h * w for h, w in shapes[:-1]], dtype=torch.long, device=dev).cumsum(0)
    base = (torch.arange(bs, device=dev) * len_v).view(bs, 1, 1, 1, 1)
    pos = cell[..., 1] * width.view(levels, 1) + cell[..., 0] + starts.view(levels, 1) + base  # in [B·ΣHW]
    # row of the value table [B·ΣHW·heads, D] = pos·heads + head; the 4 corners are fixed steps away
    rows = pos * heads + torch.arange(heads, device=dev).view(1, 1, heads, 1, 1)
    steps = torch.stack([torch.zeros_like(width), torch.ones_like(width), width, width + 1], -1) * heads
    rows = rows.unsqueeze(-1) + steps.view(levels, 1, 4)  # [B, Q, heads, L, P, 4]
    table = value.reshape(bs * len_v * heads, dim)
    out = F.embedding_bag(
        rows.view(bs * num_q * heads, levels * points * 4),
        table,
        mode="sum",
        per_sample_weights=corner_w.view(bs * num_q * heads, -1).to(table.dtype),
    )
    return out.view(bs, num_q, heads * dim)


def bf16_round(x: Tensor) -> Tensor:
    """``x`` rounded to bfloat16 precision, in its own dtype (emulates what bf16 autocast does to it)."""
    return x.to(torch.bfloat16).to(x.dtype)


class MSDeformableAttention(nn.Module):
    """Multi-scale deformable cross-attention around reference boxes (RT-DETR flavour).

    With reference boxes (cx, cy, w, h) the sampling locations are
    ``centre + offset / num_points · wh · 0.5``; with reference points (x, y) they are
    ``point + offset / (W_l, H_l)`` (Deformable DETR). Offsets start on a ring of directions, one per
    head, scaled 1..num_points (Deformable DETR's initialisation); attention starts uniform.

    ``sample_fp32``: attention weights and the bilinear sampling in float32 under autocast (the sampling
    locations follow the reference's dtype: float32 references give float32 locations).
    ``bf16_geometry`` (a diagnostic): sampling locations rounded to bfloat16 precision, as bf16 autocast
    leaves them, while everything is computed in float32.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 3,
        num_points: int = 4,
        sample_fp32: bool = False,
        bf16_geometry: bool = False,
    ):
        super().__init__()
        self.sample_fp32, self.bf16_geometry = sample_fp32, bf16_geometry
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_levels, self.num_points = num_levels, num_points
        self.head_dim = embed_dim // num_heads
        total = num_heads * num_levels * num_points
        self.sampling_offsets = nn.Linear(embed_dim, total * 2)
        self.attention_weights = nn.Linear(embed_dim, total)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values  # unit square ring
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def project_value(self, value: Tensor, value_mask: Tensor | None = None) -> Tensor:
        """[B, ΣHW, C] → [B, ΣHW, heads, head_dim] (the tensor ``ms_deform_attn_core`` samples)."""
        v = self.value_proj(value)
        if value_mask is not None:  # True = keep
            v = v * value_mask.unsqueeze(-1).to(v.dtype)
        return v.view(v.shape[0], v.shape[1], self.num_heads, self.head_dim)

    def forward(
        self,
        query: Tensor,
        reference: Tensor,
        value: Tensor,
        spatial_shapes,
        value_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            query: [B, Q, C]
            reference: [B, Q, 4] cxcywh boxes or [B, Q, 2] points, normalised; may also carry a
                level axis ([B, Q, L, 4|2]).
            value: [B, ΣHW, C] flattened multi-scale memory.
            spatial_shapes: (H, W) per level.
            value_mask: optional [B, ΣHW] bool, True for valid (non-padding) positions.

        Returns:
            output [B, Q, C], sampling_locations [B, Q, heads, L, P, 2], attention_weights
            [B, Q, heads, L, P] (softmax over L·P per head).
        """
        bs, num_q, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        v = self.project_value(value, value_mask)
        offsets = self.sampling_offsets(query).view(bs, num_q, heads, levels, points, 2)
        attn = self.attention_weights(query).view(bs, num_q, heads, levels * points)
        if self.sample_fp32:
            attn, v = attn.float(), v.float()
        attn = attn.softmax(-1).view(bs, num_q, heads, levels, points)
        ref = reference if reference.dim() == 4 else reference.unsqueeze(2)  # [B, Q, 1|L, 2|4]
        ref = ref[:, :, None, :, None, :]  # [B, Q, 1, 1|L, 1, 2|4]
        if reference.shape[-1] == 4:
            locations = ref[..., :2] + offsets / points * ref[..., 2:] * 0.5
        elif reference.shape[-1] == 2:
            shapes = _shapes_list(spatial_shapes)
            normaliser = torch.tensor([(w, h) for h, w in shapes], dtype=query.dtype, device=query.device)
            locations = ref + offsets / normaliser.view(1, 1, 1, levels, 1, 2)
        else:
            raise ValueError(f"reference must end in 2 or 4 values, got {tuple(reference.shape)}")
        if self.bf16_geometry:
            locations = bf16_round(locations)
        out = ms_deform_attn_core(v, spatial_shapes, locations, attn)
        return self.output_proj(out), locations, attn


def benchmark_core(
    batch: int = 4,
    queries: int = 300,
    heads: int = 8,
    head_dim: int = 16,
    spatial_shapes: tuple[tuple[int, int], ...] = ((40, 40), (20, 20), (10, 10)),
    points: int = 4,
    repeats: int = 10,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Best-of-``repeats`` wall times (ms) of each implementation, forward without autograd and
    forward + backward. Defaults: the ``cpu`` profile's decoder (320 px; 200 matching queries plus
    2 × (most objects in an image) denoising queries, 250–370 on SynthSOD batches).
    """
    g = torch.Generator().manual_seed(seed)
    levels, length = len(spatial_shapes), sum(h * w for h, w in spatial_shapes)
    value = torch.randn(batch, length, heads, head_dim, generator=g).requires_grad_()
    loc = (torch.rand(batch, queries, heads, levels, points, 2, generator=g) * 1.2 - 0.1).requires_grad_()
    attn = torch.rand(batch, queries, heads, levels, points, generator=g).softmax(-1).requires_grad_()
    grad = torch.randn(batch, queries, heads * head_dim, generator=g)
    impls = {
        "reference": ms_deform_attn_core_reference,
        "gather": lambda *a: ms_deform_attn_core(*a, impl="gather"),
        "grid_sample": lambda *a: ms_deform_attn_core(*a, impl="grid_sample"),
    }
    times: dict[str, dict[str, list[float]]] = {
        k: {"forward_ms": [], "forward_backward_ms": []} for k in impls
    }
    for _ in range(repeats + 1):  # interleaved, the first round is warm-up
        for name, fn in impls.items():
            with torch.no_grad():
                t0 = time.perf_counter()
                fn(value, spatial_shapes, loc, attn)
                t1 = time.perf_counter()
            fn(value, spatial_shapes, loc, attn).backward(grad)
            t2 = time.perf_counter()
            times[name]["forward_ms"].append((t1 - t0) * 1e3)
            times[name]["forward_backward_ms"].append((t2 - t1) * 1e3)
    return {name: {k: min(v[1:]) for k, v in d.items()} for name, d in times.items()}

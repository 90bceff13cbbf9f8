import pytest
import torch
from torch.testing import assert_close

from sodlib.models.deform_attn import (
    MSDeformableAttention,
    ms_deform_attn_core,
    ms_deform_attn_core_reference,
)

SHAPES = [(6, 5), (3, 3), (2, 2)]


def _inputs(bs=2, num_q=7, heads=2, dim=3, points=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    length = sum(h * w for h, w in SHAPES)
    value = torch.randn(bs, length, heads, dim, generator=g, dtype=dtype)
    # include points outside [0, 1] to exercise zero padding
    loc = torch.rand(bs, num_q, heads, len(SHAPES), points, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    attn = torch.rand(bs, num_q, heads, len(SHAPES), points, generator=g, dtype=dtype)
    return value, loc, attn


@pytest.mark.parametrize("impl", ["auto", "gather", "grid_sample"])
def test_core_matches_per_level_reference(impl):
    value, loc, attn = _inputs()
    out = ms_deform_attn_core(value, SHAPES, loc, attn, impl=impl)
    assert out.shape == (2, 7, 2 * 3)
    assert_close(out, ms_deform_attn_core_reference(value, SHAPES, loc, attn))
    # spatial shapes may also come as a tensor
    assert_close(ms_deform_attn_core(value, torch.tensor(SHAPES), loc, attn, impl=impl), out)


def test_gather_falls_back_on_maps_thinner_than_two_pixels():
    shapes = [(3, 4), (1, 2), (2, 1)]
    g = torch.Generator().manual_seed(2)
    value = torch.randn(1, 12 + 2 + 2, 2, 3, generator=g, dtype=torch.float64)
    loc = torch.rand(1, 5, 2, 3, 2, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    attn = torch.rand(1, 5, 2, 3, 2, generator=g, dtype=torch.float64)
    assert_close(
        ms_deform_attn_core(value, shapes, loc, attn, impl="gather"),
        ms_deform_attn_core_reference(value, shapes, loc, attn),
    )


def test_core_hand_computed_bilinear_on_2x2_map():
    value = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 4, 1, 1)  # row-major 2x2 map
    points = torch.tensor(
        [
            [0.5, 0.5],  # centre of the map: mean of the 4 pixels
            [0.25, 0.25],  # centre of the top-left pixel
            [0.25, 0.5],  # between the left pixels
            [0.0, 0.0],  # the corner: 1/4 of pixel (0,0), the rest is zero padding
            [1.6, 0.5],
        ]
    )  # outside (x_pix = 2.7): zero
    expected = torch.tensor([2.5, 1.0, 2.0, 0.25, 0.0])
    loc = points.reshape(1, 5, 1, 1, 1, 2)
    attn = torch.ones(1, 5, 1, 1, 1)
    for impl in ("gather", "grid_sample"):
        out = ms_deform_attn_core(value, [(2, 2)], loc, attn, impl=impl)
        assert_close(out.reshape(5), expected)
    # two points weighted 0.25 / 0.75
    loc2 = torch.tensor([[0.25, 0.25], [0.75, 0.75]]).reshape(1, 1, 1, 1, 2, 2)
    attn2 = torch.tensor([0.25, 0.75]).reshape(1, 1, 1, 1, 2)
    assert_close(ms_deform_attn_core(value, [(2, 2)], loc2, attn2).reshape(()), torch.tensor(0.25 + 3.0))


@pytest.mark.parametrize("impl", ["gather", "grid_sample"])
def test_core_gradients_finite_and_match_reference(impl):
    value, loc, attn = _inputs(seed=1)
    grad_out = torch.randn(2, 7, 6, dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ref = torch.autograd.grad(
        ms_deform_attn_core_reference(*inputs[:1], SHAPES, *inputs[1:]), inputs, grad_out
    )
    got = torch.autograd.grad(
        ms_deform_attn_core(inputs[0], SHAPES, *inputs[1:], impl=impl), inputs, grad_out
    )
    for g_ref, g in zip(ref, got):
        assert torch.isfinite(g).all()
        assert_close(g, g_ref)


def test_auto_uses_the_autograd_friendly_path_only_when_needed():
    value, loc, attn = _inputs(dtype=torch.float32)
    with torch.no_grad():
        a = ms_deform_attn_core(value, SHAPES, loc, attn)
    b = ms_deform_attn_core(value.requires_grad_(), SHAPES, loc, attn)
    assert b.requires_grad and not a.requires_grad
    assert_close(a, b.detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        ms_deform_attn_core(value, SHAPES, loc, attn, impl="cuda")


def test_module_initial_sampling_ring_and_uniform_attention():
    heads, levels, points = 4, 3, 2
    m = MSDeformableAttention(embed_dim=16, num_heads=heads, num_levels=levels, num_points=points)
    query = torch.zeros(1, 1, 16)  # zero query: offsets = the initial bias
    box = torch.tensor([[[0.5, 0.4, 0.2, 0.1]]])
    value = torch.randn(1, sum(h * w for h, w in SHAPES), 16)
    out, loc, attn = m(query, box, value, SHAPES)
    assert out.shape == (1, 1, 16)
    assert loc.shape == (1, 1, heads, levels, points, 2) and attn.shape == (1, 1, heads, levels, points)
    assert_close(attn, torch.full_like(attn, 1.0 / (levels * points)))
    # head 0 looks along +x; point p (1-based) sits at centre + p / points * w / 2: the last on the box edge
    assert_close(loc[0, 0, 0, :, :, 0], torch.tensor([0.55, 0.6]).expand(levels, points))
    assert_close(loc[0, 0, 0, :, :, 1], torch.full((levels, points), 0.4))
    # 2-d reference points: offsets are in pixels of each level
    out2, loc2, _ = m(query, box[..., :2], value, SHAPES)
    assert_close(loc2[0, 0, 0, 0, :, 0], torch.tensor([0.5 + 1 / 5, 0.5 + 2 / 5]))
    assert out2.shape == (1, 1, 16)

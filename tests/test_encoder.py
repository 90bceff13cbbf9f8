import math

import pytest
import torch
from torch.testing import assert_close

from sodlib.build import build_backbone, build_encoder
from sodlib.config import get_profile
from sodlib.models.encoder import CSPRepLayer, HybridEncoder, sincos_position_embedding_2d


def test_sincos_embedding_is_row_major():
    h, w, dim = 3, 4, 8
    emb = sincos_position_embedding_2d(h, w, dim)
    assert emb.shape == (1, h * w, dim)
    token = 2 * w + 3  # y = 2, x = 3
    omega = torch.tensor([1.0, 1.0 / math.sqrt(10000.0)])  # temperature ** -(k / 2), k = 0, 1
    expected = torch.cat([(3 * omega).sin(), (3 * omega).cos(), (2 * omega).sin(), (2 * omega).cos()])
    torch.testing.assert_close(emb[0, token], expected)


def test_csp_rep_layer_shape():
    layer = CSPRepLayer(16, 8, num_blocks=2, expansion=0.5)
    assert layer(torch.randn(1, 16, 5, 5)).shape == (1, 8, 5, 5)


def test_hybrid_encoder_smoke_shapes():
    cfg = get_profile("smoke").model
    backbone = build_backbone(cfg)
    encoder = build_encoder(cfg, backbone.out_channels)
    assert isinstance(encoder, HybridEncoder) and len(encoder.encoder) == 1
    outs = encoder(backbone(torch.randn(2, 3, 128, 128)))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4)]


def test_hybrid_encoder_odd_sizes():
    enc = HybridEncoder((8, 16, 32), hidden_dim=16, num_heads=2, dim_feedforward=32, csp_blocks=1)
    feats = [torch.randn(1, 8, 9, 7), torch.randn(1, 16, 5, 4), torch.randn(1, 32, 3, 2)]
    assert [tuple(o.shape) for o in enc(feats)] == [(1, 16, 9, 7), (1, 16, 5, 4), (1, 16, 3, 2)]


def test_light_levels_bypass_ccfm():
    enc = HybridEncoder(
        (8, 8, 16, 32), hidden_dim=16, num_heads=2, dim_feedforward=32, csp_blocks=1, light_levels=1
    ).eval()
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, c, s, s, generator=g) for c, s in ((8, 16), (8, 8), (16, 4), (32, 2))]
    with torch.no_grad():
        outs = enc(feats)
        rest = enc._fuse(feats[1:])  # AIFI + CCFM over the three coarser maps, as without the light level
        p2 = enc.light_proj[0](feats[0]) + rest[0].repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert [tuple(o.shape) for o in outs] == [(1, 16, 16, 16), (1, 16, 8, 8), (1, 16, 4, 4), (1, 16, 2, 2)]
    assert_close(outs[0], p2)
    for a, b in zip(outs[1:], rest):
        assert_close(a, b)
    with pytest.raises(ValueError, match="light_levels"):
        HybridEncoder((8, 16), hidden_dim=16, num_heads=2, light_levels=2)

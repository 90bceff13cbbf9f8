import math

import pytest
import torch
from torch.testing import assert_close

from sodlib.inference.heatmaps import (
    attention_density,
    attention_for_objects,
    attention_mass_in_boxes,
    query_per_box,
    splat_attention,
)


def test_splat_puts_a_point_in_its_pixel():
    loc = torch.tensor([[0.30, 0.70]])  # x = 0.3 → column 3 of 10; y = 0.7 → row 14 of 20
    heat = splat_attention(loc, torch.tensor([1.0]), (20, 10))
    assert heat.shape == (20, 10) and heat[14, 3] == 1.0 and heat.sum() == 1.0


def test_splat_sums_weights_and_drops_points_outside():
    loc = torch.tensor([[[0.05, 0.05], [0.06, 0.04], [1.2, 0.5]], [[0.95, 0.95], [-0.1, 0.5], [0.5, 0.5]]])
    attn = torch.tensor([[0.25, 0.5, 9.0], [0.125, 9.0, 2.0]])
    heat = splat_attention(loc, attn, (10, 10))
    assert_close(heat[0, 0], torch.tensor(0.75))
    assert_close(heat[9, 9], torch.tensor(0.125))
    assert_close(heat[5, 5], torch.tensor(2.0))
    assert_close(heat.sum(), torch.tensor(2.875))  # the two points outside the image are dropped


def test_mass_in_box_all_inside_and_half_outside():
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])  # x, y in [0.4, 0.6]
    inside = torch.tensor([[[0.45, 0.5], [0.55, 0.58], [0.59, 0.41]]])  # the last one near the corner
    assert_close(attention_mass_in_boxes(inside, torch.tensor([[0.2, 0.3, 0.5]]), box), torch.tensor([1.0]))
    half = torch.tensor([[[0.45, 0.5], [0.9, 0.5], [0.5, 0.1], [0.5, 0.5]]])
    attn = torch.tensor([[0.25, 0.3, 0.2, 0.25]])
    assert_close(attention_mass_in_boxes(half, attn, box), torch.tensor([0.5]))


def test_mass_in_box_per_query_with_heads_levels_points():
    loc = torch.full((2, 8, 3, 4, 2), 0.5)  # [N, heads, levels, points, 2], all at the centre
    loc[1, :4] = 0.0  # query 1: half of its heads look at the corner, outside its box
    attn = torch.full((2, 8, 3, 4), 1 / 12)
    boxes = torch.tensor([[0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1]])
    assert_close(attention_mass_in_boxes(loc, attn, boxes), torch.tensor([1.0, 0.5]))
    assert attention_mass_in_boxes(loc, torch.zeros_like(attn), boxes).tolist() == [0.0, 0.0]


def test_query_per_box_prefers_score_times_iou():
    preds = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.21, 0.2], [0.1, 0.1, 0.1, 0.1]])
    scores = torch.tensor([0.2, 0.9, 0.99])
    gts = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]])
    assert query_per_box(preds, scores, gts).tolist() == [1, 2]
    assert query_per_box(preds, scores, gts[:0]).tolist() == []


def test_attention_for_objects_on_a_tiny_detector():
    from sodlib import build_detector
    from sodlib.config import get_profile

    torch.manual_seed(0)
    cfg = get_profile("smoke").model
    model = build_detector(cfg).eval()
    image = torch.rand(3, 64, 64)
    gt = torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.7, 0.6, 0.2, 0.1]])
    r = attention_for_objects(model, image, gt)
    assert r["in_box_share"].shape == (cfg.num_decoder_layers, 2)
    assert ((r["in_box_share"] >= 0) & (r["in_box_share"] <= 1)).all()
    loc, attn = r["sampling_locations"][-1], r["attention_weights"][-1]
    assert loc.shape == (2, cfg.num_heads, cfg.num_levels, cfg.num_points, 2)
    assert_close(r["in_box_share"][-1], attention_mass_in_boxes(loc, attn, gt))
    assert attention_for_objects(model, image, gt[:0])["in_box_share"].shape == (cfg.num_decoder_layers, 0)


def test_density_of_one_point_is_a_kernel_centred_on_it():
    """A point at the centre of pixel (row 30, col 12) of a 50×40 grid, stride 8 → σ = 4 px: the peak is that
    pixel, the profile is symmetric, and 4 px away it has fallen to exp(-1/2) of the peak (hand-computed)."""
    loc = torch.tensor([[[12.5 / 40, 30.5 / 50]]])  # [levels=1, points=1, 2]
    density = attention_density(loc, torch.tensor([[2.0]]), [8], (50, 40))
    assert divmod(int(density.argmax()), 40) == (30, 12)
    assert_close(density.sum(), torch.tensor(2.0))
    row = density[30]
    assert_close(row[12 - 4], row[12 + 4])
    assert_close(row[16] / row[12], torch.tensor(math.exp(-0.5)))
    assert_close(density[:, 12][34] / density[30, 12], torch.tensor(math.exp(-0.5)))


def test_density_conserves_the_mass_of_the_points_inside():
    g = torch.Generator().manual_seed(0)
    loc = torch.rand(8, 3, 4, 2, generator=g) * 1.4 - 0.2  # heads, levels, points; some outside [0, 1]
    attn = torch.rand(8, 3, 4, generator=g)
    density = attention_density(loc, attn, [8, 16, 32], (64, 48))
    inside = ((loc >= 0) & (loc <= 1)).all(-1)
    assert bool((~inside).any()) and bool(inside.any())
    assert_close(density.sum(), (attn * inside).sum())
    assert bool((density >= 0).all())
    # a point on the border keeps all its weight inside (its kernel is renormalised)
    edge = attention_density(torch.tensor([[[0.0, 1.0]]]), torch.tensor([[1.0]]), [32], (20, 20))
    assert_close(edge.sum(), torch.tensor(1.0))


def test_density_kernel_widens_with_the_level_stride():
    loc = torch.full((2, 1, 2), 0.5)  # level 0 and level 1, one point each, at the centre
    fine = attention_density(loc, torch.tensor([[1.0], [0.0]]), [4, 32], (64, 64))
    coarse = attention_density(loc, torch.tensor([[0.0], [1.0]]), [4, 32], (64, 64))
    assert fine.max() > 10 * coarse.max()
    with pytest.raises(ValueError, match="level_strides"):
        attention_density(loc, torch.ones(2, 1), [4], (8, 8))
    with pytest.raises(ValueError, match="must be"):
        attention_density(loc, torch.ones(2, 2), [4, 8], (8, 8))


def _smoke_checkpoint(path, smoke_detector):
    from sodlib.checkpoints import save_checkpoint

    model, cfg = smoke_detector
    return save_checkpoint(path, model=model.state_dict(), config=cfg.to_dict()), model, cfg


def test_object_attention_and_its_density(tmp_path, smoke_detector):
    from sodlib.inference.heatmaps import level_strides, object_attention, object_density

    _, model, cfg = _smoke_checkpoint(tmp_path / "last.pt", smoke_detector)
    assert level_strides(cfg.model) == (8, 16, 32)
    image = (torch.rand(3, 200, 260) * 255).to(torch.uint8)
    found = object_attention(model, image, cfg.data.image_size, objects=2)
    assert len(found) == 2 and found[0]["score"] >= found[1]["score"]
    depth = cfg.model.num_decoder_layers
    assert found[0]["ref_xyxy"].shape == (depth, 4) and found[0]["window"] == (0, 0, 260, 200)
    density = object_density(found[0], depth - 1, level_strides(cfg.model), cfg.data.image_size, (200, 260))
    loc = found[0]["sampling_locations"][depth - 1]
    inside = ((loc >= 0) & (loc <= 1)).all(-1)
    expected = (found[0]["attention_weights"][depth - 1] * inside).sum() / loc.shape[0]  # share of the query
    assert_close(density.sum(), expected)
    # a box picks the query that covers it, in the window that holds it (sliced)
    sliced = object_attention(model, image, cfg.data.image_size, box_xywh=(150, 100, 40, 30), slice_size=128)
    assert len(sliced) == 1
    x0, y0, x1, y1 = sliced[0]["window"]
    assert x0 <= 170 <= x1 and y0 <= 115 <= y1 and (x1 - x0, y1 - y0) == (128, 128)


@pytest.mark.slow
def test_heatmap_command_writes_one_figure_per_image_and_refuses_bad_input(tmp_path, smoke_detector):
    from PIL import Image

    from sodlib.cli import main

    ckpt, _, _ = _smoke_checkpoint(tmp_path / "last.pt", smoke_detector)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray((torch.rand(96, 128, 3) * 255).to(torch.uint8).numpy()).save(
            tmp_path / folder / "x.png"
        )
    images = [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png")]
    out = tmp_path / "figs"
    assert main(["heatmap", *images, "--checkpoint", str(ckpt), "--out", str(out), "--objects", "2"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["x_2_heatmap.png", "x_heatmap.png"]
    assert (
        main(
            [
                "heatmap",
                images[0],
                "--checkpoint",
                str(ckpt),
                "--out",
                str(out / "one"),
                "--box",
                "10,10,20,16",
                "--layer",
                "2",
            ]
        )
        == 0
    )
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    bad = {
        "undecodable": [str(broken), "--checkpoint", str(ckpt)],
        "box outside": [images[0], "--checkpoint", str(ckpt), "--box", "100,80,40,40"],
        "layer beyond depth": [images[0], "--checkpoint", str(ckpt), "--layer", "3"],
        "layer superscript": [images[0], "--checkpoint", str(ckpt), "--layer", "²"],
        "not a checkpoint": [images[0], "--checkpoint", str(junk)],
    }
    for case, args in bad.items():
        target = tmp_path / case.replace(" ", "_")
        assert main(["heatmap", *args, "--out", str(target)]) == 2, case
        assert not target.exists() or not any(target.iterdir()), case
    from sodlib.inference.heatmaps import heatmap_files

    with pytest.raises(
        ValueError, match=r"--layer must be 'all' or 1\.\.\d+ \(the decoder's depth\), got '²'"
    ):
        heatmap_files(str(ckpt), [images[0]], str(tmp_path / "sup"), layer="²")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch.testing import assert_close

from sodlib.io import save_figure
from sodlib.losses.formulas import spr_attention_loss, spr_offset_loss
from sodlib.studies import viz

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, min_bytes=2000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > min_bytes


def test_save_figure_writes_png_atomically(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    out = save_figure(fig, tmp_path / "deep" / "line.png")
    _assert_png(out, 500)
    assert [p.name for p in out.parent.iterdir()] == ["line.png"]  # no temp file left behind
    assert not plt.fignum_exists(fig.number)  # closed


def test_learning_curve_is_drawn_against_iterations_so_a_retrained_run_draws_the_same_figure(tmp_path):
    def run(name, seconds):
        d = tmp_path / name
        d.mkdir()
        d.joinpath("log.csv").write_text(
            "iteration,loss,train_seconds\n" + "".join(f"{i},{10 - i},{seconds * i}\n" for i in range(1, 9))
        )
        d.joinpath("eval.csv").write_text(
            f"iteration,train_seconds,AP,AP50\n4,{4 * seconds},0.2,0.4\n8,{8 * seconds},0.3,0.6\n"
        )
        return d

    first = viz.plot_learning_curve({"base": run("a", 1.0)}, tmp_path / "a.png").read_bytes()
    slower = viz.plot_learning_curve({"base": run("b", 1.7)}, tmp_path / "b.png").read_bytes()
    assert first == slower  # only the wall time differs
    d = run("c", 1.0)
    d.joinpath("log.csv").write_text(d.joinpath("log.csv").read_text().replace("\n8,2,", "\n8,5,"))
    assert viz.plot_learning_curve({"base": d}, tmp_path / "c.png").read_bytes() != first  # a loss moved


def test_plot_lines_draws_the_given_values(tmp_path):
    x = np.linspace(0, 1, 11)
    fig = viz.plot_lines(
        {"square": (x, x**2), "id": (x, x)},
        "x",
        "y",
        "t",
        points={"pts": ([0.5], [0.2])},
        hlines={"half": 0.5},
        legend_loc="outside",
    )
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), x**2)
    np.testing.assert_allclose(ax.lines[1].get_xdata(), x)
    assert ax.lines[2].get_ydata()[0] == 0.5  # the dashed reference line
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["square", "id", "pts", "half"]
    _assert_png(save_figure(fig, tmp_path / "lines.png"))


def test_plot_lines_into_given_axes():
    fig, axes = plt.subplots(1, 2)
    assert viz.plot_lines({"a": ([0, 1], [1, 0])}, "x", "y", ax=axes[1]) is fig
    assert len(axes[1].lines) == 1 and len(axes[0].lines) == 0
    plt.close(fig)


def test_plot_contour_panels_one_panel_per_entry(tmp_path):
    x, y = np.linspace(0, 1, 30), np.linspace(0, 1, 20)
    z = np.add.outer(y, x) / 2  # [len(y), len(x)]
    z_nan = np.where(z > 0.8, np.nan, z)
    fig = viz.plot_contour_panels(
        x, y, {"a": z, "b with NaN": z_nan}, "x", "y", suptitle="s", nan_label="gone"
    )
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:2] == ["a", "b with NaN"] and len(fig.axes) == 3  # two panels + colour bar
    assert "hatched: gone" in fig._suptitle.get_text()
    _assert_png(save_figure(fig, tmp_path / "contours.png"))


def test_plot_box_pairs_draws_boxes_and_intersection(tmp_path):
    gt = [10.0, 10.0, 22.0, 22.0]
    fig = viz.plot_box_pairs(gt, {"shifted": [14.0, 10.0, 26.0, 22.0], "disjoint": [30.0, 30.0, 34.0, 34.0]})
    shifted, disjoint = fig.axes
    inter = [p for p in shifted.patches if p.get_label() == "intersection"]
    assert (
        len(inter) == 1
        and inter[0].get_width() == pytest.approx(8)
        and inter[0].get_height() == pytest.approx(12)
    )
    assert not [p for p in disjoint.patches if p.get_label() == "intersection"]
    gt_patch = next(p for p in shifted.patches if p.get_label() == "ground truth")
    assert gt_patch.get_xy() == (10.0, 10.0) and gt_patch.get_width() == 12.0
    assert shifted.get_ylim()[0] > shifted.get_ylim()[1]  # y points down, as in images
    _assert_png(save_figure(fig, tmp_path / "pairs.png"))


def test_spr_point_geometry_by_hand():
    box = torch.tensor([0.5, 0.5, 0.2, 0.1])  # cxcywh
    points = torch.tensor(
        [
            [0.55, 0.52],  # inside the box
            [0.62, 0.5],  # Δp/wh = (0.6, 0): between the box and the 1.5× box
            [0.8, 0.3],
        ]
    )  # Δp/wh = (1.5, -2): outside, target (0.75, -0.75)
    geo = viz.spr_point_geometry(points, box, eta=1.5)
    assert geo["inside_box"].tolist() == [True, False, False]
    assert geo["inside_expanded"].tolist() == [True, True, False]
    assert_close(geo["offsets"][2], torch.tensor([1.5, -2.0]))
    assert_close(geo["targets"], torch.tensor([[0.55, 0.52], [0.62, 0.5], [0.65, 0.425]]))


def test_spr_point_geometry_agrees_with_the_losses():
    """Eq. 5 from the geometry's targets equals spr_offset_loss; its inside-box set gives
    spr_attention_loss."""
    gen = torch.Generator().manual_seed(0)
    q, heads, levels, points = 5, 2, 3, 4
    boxes = torch.cat(
        [torch.rand(q, 2, generator=gen) * 0.6 + 0.2, torch.rand(q, 2, generator=gen) * 0.2 + 0.02], -1
    )
    loc = boxes[:, None, None, None, :2] + torch.randn(q, heads, levels, points, 2, generator=gen) * 0.1
    attn = torch.rand(q, heads, levels, points, generator=gen).softmax(-1)
    eta = 1.3
    geo = viz.spr_point_geometry(loc, boxes, eta)  # batched over the queries
    wh = boxes[:, None, None, None, 2:]
    per_query = ((loc - geo["targets"]) / wh).abs().sum(-1).pow(2).sum((1, 2, 3))  # Eq. 5 per query
    mask = torch.ones(1, q, dtype=torch.bool)
    assert_close(spr_offset_loss(loc[None], boxes[None], eta, mask), per_query.mean())
    for i in range(q):  # one query at a time, unbatched geometry
        one = viz.spr_point_geometry(loc[i], boxes[i], eta)
        assert torch.equal(one["inside_box"], geo["inside_box"][i])
        inside = one["inside_box"]
        best_inside = attn[i].masked_fill(~inside, -1).amax(-1, keepdim=True)
        hinge = ((attn[i] - best_inside).clamp(min=0) * (~inside & inside.any(-1, keepdim=True))).sum()
        only_i = torch.zeros(1, q, dtype=torch.bool)
        only_i[0, i] = True
        assert_close(spr_attention_loss(loc[None], attn[None], boxes[None], only_i), hinge)
    assert (~geo["inside_expanded"]).any() and geo["inside_box"].any()  # the example exercises both cases


def test_plot_spr_geometry_panels_and_arrows(tmp_path):
    image = np.random.default_rng(0).random((64, 64, 3))
    box = torch.tensor([0.5, 0.5, 0.2, 0.2])
    loc = box[:2] + torch.tensor(
        [[[[0.0, 0.0], [0.05, 0.0], [0.3, 0.0]]]]
    )  # [heads 1, levels 1, points 3, 2]
    attn = torch.tensor([[[0.5, 0.3, 0.2]]])
    panel = {
        "ref_box_cxcywh": box,
        "eta": 1.5,
        "sampling_locations": loc,
        "attention_weights": attn,
        "gt_box_cxcywh": torch.tensor([0.52, 0.5, 0.2, 0.25]),
        "title": "q0",
    }
    fig = viz.plot_spr_geometry(image, [[panel, {**panel, "eta": 1.0, "title": "q0 l1"}]], suptitle="test")
    ax0, ax1 = fig.axes[:2]
    assert ax0.get_title() == "q0" and ax1.get_title() == "q0 l1"
    arrows = [a for a in ax0.texts if a.arrow_patch is not None]
    assert len(arrows) == 1  # only the point at Δp/wh = 1.5 lies outside the 1.5× box
    assert arrows[0].xy == pytest.approx((0.65 * 64, 0.5 * 64))  # Eq. 5 target, in pixels
    assert len([a for a in ax1.texts if a.arrow_patch is not None]) == 1  # η = 1: Δp/wh = 0.25 is inside
    x0, x1 = ax0.get_xlim()
    y0, y1 = ax0.get_ylim()
    assert x1 - x0 == pytest.approx(y0 - y1)  # square window
    _assert_png(save_figure(fig, tmp_path / "spr.png"))


def test_plot_predictions_grid_draws_gt_and_kept_predictions(tmp_path):
    image = np.zeros((32, 32, 3))
    gt = [np.array([[2.0, 2.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])]
    preds = {
        "a": [
            {
                "boxes_xyxy": np.array([[2.0, 2.0, 9.0, 9.0], [0.0, 0.0, 5.0, 5.0]]),
                "scores": np.array([0.9, 0.1]),
            }
        ],
        "b": [{"boxes_xyxy": np.zeros((0, 4)), "scores": np.zeros(0)}],
    }
    fig = viz.plot_predictions_grid([image], gt, preds, score_threshold=0.5)
    ax_a, ax_b = fig.axes
    assert len(ax_a.patches) == 3 and len(ax_b.patches) == 2  # 2 GT + 1 prediction above 0.5; 2 GT only
    assert ax_a.get_title() == "a: 1 predictions ≥ 0.5, 2 objects"
    assert ax_a.patches[2].get_xy() == (2.0, 2.0) and ax_a.patches[2].get_width() == 7.0
    _assert_png(save_figure(fig, tmp_path / "preds.png"))


def test_plot_heatmap_grid_crops_around_the_box(tmp_path):
    heat = np.zeros((64, 64))
    heat[20, 30] = 1.0
    panel = {
        "image_hwc": np.ones((64, 64, 3)) * 0.5,
        "heat": heat,
        "box_xyxy": (28.0, 18.0, 32.0, 22.0),
        "title": "t",
    }
    fig = viz.plot_heatmap_grid(
        [[panel, {**panel, "box_xyxy": None, "boxes_xyxy": [[1, 1, 5, 5], [6, 6, 9, 9]]}], [panel]],
        margin=1.0,
    )
    axes = fig.axes
    assert axes[0].get_xlim() == (18.0, 42.0) and axes[0].get_ylim() == (
        32.0,
        8.0,
    )  # 12 px half-window (min 24)
    assert axes[1].get_xlim() == (0.0, 64.0) and len(axes[1].patches) == 2  # no box: the whole image
    assert not axes[3].axison  # empty cell of the short row
    _assert_png(save_figure(fig, tmp_path / "heat.png"))
    dilated = viz.plot_heatmap_grid([[panel]], dilate_px=1).axes[0].images[1].get_array()
    assert dilated[19:22, 29:32].min() == 1.0 and dilated.sum() == 9.0  # the point grown to 3 x 3 pixels


def test_notebook_image_embeds_small_pngs_and_previews_large_ones(tmp_path):
    import numpy as np
    from PIL import Image as PILImage

    from sodlib.studies.viz import notebook_image

    small = tmp_path / "small.png"
    PILImage.fromarray(np.zeros((20, 30, 3), np.uint8)).save(small)
    shown = notebook_image(small)
    assert shown.format == "png" and shown.data == small.read_bytes()
    large = tmp_path / "large.png"
    noise = np.random.default_rng(0).integers(0, 255, (1800, 900, 3), dtype=np.uint8)
    PILImage.fromarray(noise).save(large)
    shown = notebook_image(large, max_side=600)
    assert shown.format == "jpeg" and len(shown.data) < large.stat().st_size
    import io

    assert PILImage.open(io.BytesIO(shown.data)).size == (300, 600)

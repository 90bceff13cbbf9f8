"""The attention explorer: widgets that redraw on every choice, and a static figure for headless runs."""

import pytest
import torch

from sodlib.build import build_detector
from sodlib.config import get_profile
from sodlib.studies.explorer import attention_explorer


@pytest.fixture(scope="module")
def models():
    cfg = get_profile("smoke")
    out = {}
    for seed, label in enumerate(("baseline", "ST+SR+SPR")):
        torch.manual_seed(seed)
        out[label] = (build_detector(cfg.model).eval(), cfg)
    return out


def test_static_figure_for_headless_runs(models):
    import matplotlib.figure

    images = [(torch.rand(3, 100, 140) * 255).to(torch.uint8)]
    fig = attention_explorer(models, images, objects=2, interactive=False)
    assert isinstance(fig, matplotlib.figure.Figure)
    assert len([ax for ax in fig.axes if ax.get_title().startswith("layer")]) == 2  # smoke: 2 decoder layers


def test_widgets_redraw_on_every_choice(models):
    images = [(torch.rand(3, 100, 140) * 255).to(torch.uint8), (torch.rand(3, 90, 90) * 255).to(torch.uint8)]
    ui = attention_explorer(models, images, objects=3)
    (model_box, image_box), (object_box, layer_box) = (row.children for row in ui.children[:2])
    out = ui.children[2]

    def png() -> bytes:
        assert len(out.outputs) == 1
        return out.outputs[0]["data"]["image/png"]

    first = png()
    for box, value in ((model_box, "ST+SR+SPR"), (image_box, 1), (object_box, 3), (layer_box, 2)):
        before = png()
        box.value = value
        assert png() != before, box.description
    assert png() != first
    assert len(ui.figures._cache) == 3  # (baseline, 0), (ST+SR+SPR, 0), (ST+SR+SPR, 1): computed once each
    with pytest.raises(ValueError, match="at least one"):
        attention_explorer(models, [])

"""An interactive attention explorer for JupyterLab (ipywidgets), on the same functions as ``sodlib heatmap``.

``attention_explorer(models, images)`` returns a widget: choose the model, the image, the object (the
detections ranked by score) and the decoder layer (or all); the figure below is
:func:`sodlib.inference.heatmaps.plot_object_attention` of that choice. ``interactive=False`` — what a
headless run (papermill) should ask for — returns the static figure of the first choice instead, so the
executed notebook keeps a picture where a widget would show nothing.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["AttentionFigures", "attention_explorer"]


class AttentionFigures:
    """Cached :func:`~sodlib.inference.heatmaps.object_attention` per (model, image) and the figure of any
    choice."""

    def __init__(
        self, models: Mapping[str, tuple], images: Sequence, objects: int = 5, slice_size: int | None = None
    ):
        from sodlib.inference.predict import read_image_rgb

        if not models or not images:
            raise ValueError("the explorer needs at least one model and one image")
        self.models = dict(models)
        self.images = [read_image_rgb(im) if isinstance(im, (str, Path)) else im for im in images]
        self.names = [
            Path(im).name if isinstance(im, (str, Path)) else f"image {i}" for i, im in enumerate(images)
        ]
        self.objects, self.slice_size = objects, slice_size
        self._cache: dict[tuple[str, int], list] = {}

    def found(self, model: str, image: int) -> list[dict]:
        from sodlib.inference.heatmaps import object_attention

        key = (model, image)
        if key not in self._cache:
            detector, cfg = self.models[model]
            self._cache[key] = object_attention(
                detector, self.images[image], cfg.data.image_size, self.objects, slice_size=self.slice_size
            )
        return self._cache[key]

    def figure(self, model: str, image: int, obj: int, layer: int | str = "all"):
        from sodlib.inference.heatmaps import figure_rows, plot_object_attention

        _, cfg = self.models[model]
        found = self.found(model, image)
        if not 0 <= obj < len(found):
            raise ValueError(f"object {obj} out of range: {len(found)} detections on {self.names[image]}")
        o, img = found[obj], self.images[image]
        layers = list(range(cfg.model.num_decoder_layers)) if layer == "all" else [int(layer)]
        rows = figure_rows(
            [o],
            cfg.model,
            cfg.data.image_size,
            tuple(img.shape[1:]),
            layers,
            [f"object {obj + 1}, class {o['label']}, score {o['score']:.2f}"],
        )
        return plot_object_attention(
            img.permute(1, 2, 0).numpy(), rows, layers, title=f"{model} · {self.names[image]}"
        )


def attention_explorer(
    models: Mapping[str, tuple],
    images: Sequence,
    objects: int = 5,
    interactive: bool = True,
    slice_size: int | None = None,
):
    """``models``: label → (detector, RunConfig) (e.g. :func:`sodlib.inference.predict.load_model` results);
    ``images``: paths or uint8 [3, H, W] tensors. Returns the widget, or with ``interactive=False`` the Figure
    of the first model, image and object, all layers."""
    figures = AttentionFigures(models, images=images, objects=objects, slice_size=slice_size)
    first = next(iter(figures.models))
    if not interactive:
        return figures.figure(first, 0, 0)
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import Image

    depth = max(cfg.model.num_decoder_layers for _, cfg in figures.models.values())
    model_box = widgets.Dropdown(options=list(figures.models), description="model")
    image_box = widgets.Dropdown(options=[(n, i) for i, n in enumerate(figures.names)], description="image")
    object_box = widgets.BoundedIntText(value=1, min=1, max=objects, description="object")
    layer_box = widgets.Dropdown(options=["all", *range(1, depth + 1)], description="layer")
    out = widgets.Output()

    def redraw(*_):
        layer = layer_box.value if layer_box.value == "all" else int(layer_box.value) - 1
        fig = figures.figure(model_box.value, image_box.value, object_box.value - 1, layer)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        out.outputs = ()
        out.append_display_data(Image(data=buf.getvalue(), format="png"))

    for box in (model_box, image_box, object_box, layer_box):
        box.observe(redraw, names="value")
    redraw()
    ui = widgets.VBox([widgets.HBox([model_box, image_box]), widgets.HBox([object_box, layer_box]), out])
    ui.figures = figures  # the cache, for callers that want the numbers behind a picture
    return ui

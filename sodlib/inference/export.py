"""ONNX export of a trained detector, checked against PyTorch with onnxruntime.

``export_onnx(model, out, image_size)`` writes a graph with input ``images`` [N, 3, S, S] (dynamic batch, the
spatial size fixed at export: anchors and position embeddings are constants of the graph, as in RT-DETR's
exporter with ``eval_spatial_size``) and outputs ``pred_logits`` [N, Q, K] and ``pred_boxes`` [N, Q, 4]
(normalised cxcywh), the detector's eval outputs. ``postprocess=True`` appends RT-DETR's post-processor
instead: a second input ``orig_target_sizes`` [N, 2] holding each image's (width, height) in pixels, and
outputs ``labels`` [N, T], ``boxes`` [N, T, 4] (xyxy pixels) and ``scores`` [N, T] of the top-T
(query, class) pairs by sigmoid score.

Choices: the TorchScript-based exporter (``dynamo=False``; the torch.export-based one needs onnxscript and
did not yet give a dynamic batch for this graph), opset 17; deformable attention samples with ``grid_sample``
during export (GridSample is a standard operator; the ``embedding_bag`` kernel sodlib uses for CPU
inference is not). The file is written next to ``out`` and renamed into place, so a failed export leaves
nothing behind.

Equal outputs are equal up to the order of near-tied queries: the top-K query selection may order two
proposals whose scores differ by float rounding either way in onnxruntime and in PyTorch
(:func:`match_queries` compares outputs as sets of queries).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from sodlib.inference.predict import load_model
from sodlib.official import load_rtdetr, rtdetr_model_config

__all__ = [
    "ExportedDetector",
    "check_onnx",
    "export_checkpoint",
    "export_onnx",
    "graph_signature",
    "match_queries",
]


class ExportedDetector(nn.Module):
    """The detector's eval forward as plain tensors (and optionally RT-DETR's post-processing)."""

    def __init__(self, model: nn.Module, postprocess: bool = False, num_top: int = 300):
        super().__init__()
        self.model, self.postprocess, self.num_top = model, postprocess, num_top

    def forward(self, images: Tensor, orig_target_sizes: Tensor | None = None):
        out = self.model(images)
        logits, boxes = out["pred_logits"], out["pred_boxes"]
        if not self.postprocess:
            return logits, boxes
        num_classes = logits.shape[-1]
        scores = logits.sigmoid().flatten(1)
        scores, index = scores.topk(min(self.num_top, scores.shape[1]), dim=1)
        labels = index % num_classes
        query = index // num_classes
        xyxy = box_convert(boxes, "cxcywh", "xyxy") * orig_target_sizes.to(boxes.dtype).repeat(
            1, 2
        ).unsqueeze(1)
        picked = xyxy.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
        return labels, picked, scores


MAX_IMAGE_SIZE = 4096  # the largest square input an export traces (a 100000-px one would not fit in memory)


def export_onnx(
    model: nn.Module,
    out: str | os.PathLike,
    image_size: int,
    postprocess: bool = False,
    num_top: int = 300,
    opset: int = 17,
) -> Path:
    """Export ``model`` (a sodlib detector) to ``out``; returns the path. See the module docstring."""
    import warnings

    out = Path(out)
    if image_size < 32 or image_size % 32 or image_size > MAX_IMAGE_SIZE:
        raise ValueError(
            f"--image-size must be a multiple of 32 (the coarsest stride) from 32 to {MAX_IMAGE_SIZE}, "
            f"got {image_size}"
        )
    images = torch.rand(1, 3, image_size, image_size)
    if postprocess:  # every requested detection must exist: at most one per (query, class) pair
        with torch.no_grad():
            pairs = model.eval()(images)["pred_logits"][0].numel()
        if not 1 <= num_top <= pairs:
            raise ValueError(
                f"--num-top must be from 1 to {pairs} (this model's query x class pairs), got {num_top}"
            )
    wrapper = ExportedDetector(model.eval(), postprocess, num_top).eval()
    args: tuple = (images,)
    inputs, outputs = ["images"], ["pred_logits", "pred_boxes"]
    axes = {"images": {0: "N"}, "pred_logits": {0: "N"}, "pred_boxes": {0: "N"}}
    if postprocess:
        args = (images, torch.tensor([[image_size, image_size]]))
        inputs, outputs = ["images", "orig_target_sizes"], ["labels", "boxes", "scores"]
        axes = {name: {0: "N"} for name in inputs + outputs}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on shapes it records as constants
            torch.onnx.export(
                wrapper,
                args,
                tmp,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    image_size: int | None = None,
    postprocess: bool = False,
    num_top: int = 300,
    rtdetr_depth: int | None = None,
    num_classes: int = 80,
) -> Path:
    """``sodlib export``: a checkpoint's detector → ONNX. ``out`` must not exist (nothing the user owns is
    overwritten).

    A sodlib checkpoint carries its config (EMA weights when present; ``image_size`` defaults to the run's).
    With ``rtdetr_depth`` the checkpoint is a released RT-DETR-R``depth`` one (RT-DETR's or transformers'
    layout, ``num_classes`` classes), read with :func:`sodlib.official.load_rtdetr`; ``image_size`` defaults
    to 640, RT-DETR's evaluation size.
    """

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out (an export never overwrites a file)")
    if rtdetr_depth is not None:
        model = load_rtdetr(checkpoint, rtdetr_model_config(rtdetr_depth, num_classes=num_classes))
        return export_onnx(model, out, image_size or 640, postprocess, num_top)
    try:
        model, cfg = load_model(checkpoint)
    except ValueError as exc:
        raise ValueError(f"{exc}; a released RT-DETR one needs --rtdetr DEPTH") from exc
    return export_onnx(model, out, image_size or cfg.data.image_size, postprocess, num_top)


def match_queries(
    a_logits: np.ndarray, a_boxes: np.ndarray, b_logits: np.ndarray, b_boxes: np.ndarray
) -> float:
    """Largest difference between two detectors' per-query outputs after pairing the queries of each image
    one to one (Hungarian assignment on the L∞ distance of logits and boxes): 0 for equal sets of queries
    in any order."""
    from scipy.optimize import linear_sum_assignment

    worst = 0.0
    for la, ba, lb, bb in zip(a_logits, a_boxes, b_logits, b_boxes):
        fa, fb = np.concatenate([la, ba], 1), np.concatenate([lb, bb], 1)
        cost = np.abs(fa[:, None, :] - fb[None, :, :]).max(-1)
        rows, cols = linear_sum_assignment(cost)
        worst = max(worst, float(cost[rows, cols].max()))
    return worst


def check_onnx(path: str | os.PathLike, model: nn.Module, images: Tensor) -> float:
    """Run the exported graph in onnxruntime (CPU) on ``images`` and return :func:`match_queries` against
    the PyTorch model's eval outputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, boxes = session.run(["pred_logits", "pred_boxes"], {"images": images.numpy()})
    with torch.no_grad():
        ref = model.eval()(images)
    return match_queries(logits, boxes, ref["pred_logits"].numpy(), ref["pred_boxes"].numpy())


def graph_signature(path: str | os.PathLike) -> tuple[dict[str, int], int]:
    """Operator counts and the number of parameter values (initializer elements) of an ONNX file."""
    import onnx

    graph = onnx.load(str(path)).graph
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    params = sum(int(np.prod(init.dims)) if init.dims else 1 for init in graph.initializer)
    return ops, params

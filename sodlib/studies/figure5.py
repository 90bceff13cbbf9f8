"""Paper A's Figure 5 from trained runs: where the baseline's and the full method's (ST+SR+SPR) decoder
queries look on small objects, and how much of their attention falls inside the object (notebook 05).

The runs are :func:`~sodlib.studies.tables.comparison_config`'s: for ``cpu`` the ``ablation`` profile
(RT-DETR's plain top-K query selection, three decoder layers, fp32 geometry: the paper's setting at CPU size)
on the schedule of MRQM's tables (``MRQM_ITERS`` iterations), so the baseline runs are the ones MRQM's
Table 3 already holds. The full method is paper A's Table 3 row "ST+SR+SPR" with Table 6's tuned α/γ
(``tables.FULL``). Its α/γ differ from the baseline's (0.5/1.5 against RT-DETR's 0.75/2), so a third model
measures the retune alone: the baseline at the full method's α/γ (:data:`RETUNE`). Of the three comparisons
(:data:`COMPARISONS`) the full method against the retuned baseline is what the methods add at the same α/γ.
``smoke`` (tests) and ``paper`` (a GPU) use their own profile.

The runs are read on one kind of machine (:func:`figure5_folders`): the kind on which most of them exist,
trained there or retrained whole (:func:`sodlib.studies.runner.on_one_kind`).

The in-box attention share of a run (per decoder layer and ground-truth object, see
:func:`sodlib.inference.heatmaps.in_box_share`) is stored beside its metrics as ``attention_in_box.json``, so
a fresh clone reads the seeds it does not draw instead of retraining them for their weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor
from torchvision.ops import box_convert

from sodlib.config import RunConfig
from sodlib.data.datasets import build_dataset
from sodlib.inference.heatmaps import (
    attention_mass_in_boxes,
    figure_rows,
    in_box_share,
    object_attention,
    splat_attention,
)
from sodlib.inference.predict import load_model
from sodlib.io import atomic_write_json
from sodlib.models.detector import eval_mode
from sodlib.studies.stats import holm, paired_difference, pairs_frame
from sodlib.studies.tables import FULL, ST_TUNED, comparison_config
from sodlib.training.engine import train
from sodlib.training.runs import read_metrics, run_dir

__all__ = [
    "COMPARISONS",
    "MODELS",
    "RETUNE",
    "SHARE_FILE",
    "figure5_configs",
    "figure5_folders",
    "in_box_differences",
    "in_box_summary",
    "in_box_verdict",
    "object_rows",
    "plot_in_box_share",
    "run_in_box_share",
    "top_query_panels",
]

MODELS = ("baseline", "ST+SR+SPR")  # the two models drawn in the heatmaps
RETUNE = "baseline, α 0.5 γ 1.5"  # the baseline at the full method's focal-loss α/γ: the retune alone
ROWS = {"baseline": (), RETUNE: ST_TUNED, "ST+SR+SPR": FULL}
COMPARISONS = (("ST+SR+SPR", "baseline"), (RETUNE, "baseline"), ("ST+SR+SPR", RETUNE))
SHARE_FILE = "attention_in_box.json"


def figure5_configs(profile: str, seeds: int, device: str = "") -> dict[str, list[RunConfig]]:
    """``{"baseline": [seed 0, 1, ...], RETUNE: [...], "ST+SR+SPR": [...]}``
    (:func:`~sodlib.studies.tables.comparison_config`): paired seeds, the same data order in every row."""
    if seeds < 1:
        raise ValueError(f"SEEDS must be at least 1, got {seeds}")
    return {
        label: [comparison_config(profile, *sets, seed=s, device=device) for s in range(seeds)]
        for label, sets in ROWS.items()
    }


def figure5_folders(
    configs: Mapping[str, Sequence[RunConfig]], results_dir: str | Path
) -> dict[str, list[Path]]:
    """The run folder of each of ``configs`` (:func:`figure5_configs`), the finished runs read on one kind of
    machine (:func:`sodlib.studies.runner.on_one_kind`); a run not trained yet keeps its own folder."""
    from sodlib.studies.runner import on_one_kind
    from sodlib.training.runs import finished, read_metrics

    flat = [cfg for cfgs in configs.values() for cfg in cfgs]
    metrics = [read_metrics(d) if finished(d := run_dir(cfg, results_dir)) else None for cfg in flat]
    folders, _ = on_one_kind(flat, metrics, results_dir)
    folders = [f or run_dir(cfg, results_dir) for f, cfg in zip(folders, flat)]
    out, i = {}, 0
    for label, cfgs in configs.items():
        out[label], i = folders[i : i + len(cfgs)], i + len(cfgs)
    return out


def run_in_box_share(
    cfg: RunConfig,
    results_dir: str | Path,
    num_images: int,
    data_root: str | None = None,
    folder: str | Path | None = None,
) -> Tensor:
    """In-box attention share [decoder layers, objects] of the run of ``cfg`` (in ``folder``, default its run
    folder under ``results_dir``) over the first ``num_images`` validation images: read from the run's
    ``attention_in_box.json`` when it was measured on the same images, else measured from the checkpoint (the
    run is trained first when its weights are missing) and stored, both in
    :func:`~sodlib.studies.runner.weights_folder` (another kind's whole retrain without weights is never
    written to)."""
    from sodlib.studies.runner import weights_folder

    d = Path(folder) if folder is not None else run_dir(cfg, results_dir)
    here = weights_folder(d, results_dir)
    key = {"split": cfg.data.val_split, "images": int(num_images), "data": data_root or ""}
    for stored_path in dict.fromkeys((d / SHARE_FILE, here / SHARE_FILE)):
        if not stored_path.exists():
            continue
        try:
            stored = json.loads(stored_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{stored_path}: not JSON ({err.msg}, line {err.lineno}); delete it to measure again"
            ) from None
        if {k: stored.get(k) for k in key} == key:
            return torch.tensor(stored["share"], dtype=torch.float32)
    train(cfg, here, data_root=data_root, progress=False, need_checkpoint=True)
    model, _ = load_model(here / "checkpoints" / "last.pt", device=cfg.train.device)
    val = build_dataset(cfg.data, cfg.data.val_split, train=False, data_root=data_root)
    share = in_box_share(model, val, num_images, device=cfg.train.device)
    atomic_write_json(
        here / SHARE_FILE, {**key, "share": [[round(float(v), 6) for v in layer] for layer in share]}
    )
    return share


def in_box_summary(shares: Mapping[str, Sequence[Tensor]]) -> pd.DataFrame:
    """One row per model and decoder layer from ``shares[model][seed]`` ([layers, objects] each): ``seeds``,
    ``objects`` (per seed), ``mean`` and ``std`` over seeds of each seed's mean share over objects, and for
    every model after the first its paired difference from the first (same seeds): ``d_vs_<first>``,
    ``ci95_low``, ``ci95_high``, ``p`` (NaN with one seed)."""
    labels = list(shares)
    per_seed = {m: torch.stack([s.mean(1) for s in shares[m]]) for m in labels}  # [seeds, layers]
    ref = labels[0]
    rows = []
    for m in labels:
        values = per_seed[m]
        for layer in range(values.shape[1]):
            row = {
                "model": m,
                "layer": layer + 1,
                "seeds": values.shape[0],
                "objects": shares[m][0].shape[1],
                "mean": float(values[:, layer].mean()),
                "std": float(values[:, layer].std()) if values.shape[0] > 1 else float("nan"),
            }
            if m != ref:
                diff = paired_difference(values[:, layer].tolist(), per_seed[ref][:, layer].tolist())
                row |= {
                    f"d_vs_{ref}": diff["diff"],
                    "ci95_low": diff["ci_low"],
                    "ci95_high": diff["ci_high"],
                    "p": diff["p"],
                }
            rows.append(row)
    return pd.DataFrame(rows)


def in_box_differences(
    shares: Mapping[str, Sequence[Tensor]], pairs: Sequence[tuple[str, str]] = COMPARISONS
) -> pd.DataFrame:
    """One row per comparison ``(model, vs)`` of ``pairs`` whose two models ``shares`` holds, and decoder
    layer: the paired difference over the seeds both have (each seed's mean share over objects), ``d``,
    ``ci95_low``, ``ci95_high``, ``p`` (NaN with one seed) and ``p_holm`` (Holm over the comparisons of
    the same layer)."""
    rows = []
    for model, vs in pairs:
        if model not in shares or vs not in shares:
            continue
        n = min(len(shares[model]), len(shares[vs]))
        a, b = (torch.stack([s.mean(1) for s in shares[m][:n]]) for m in (model, vs))  # [seeds, layers]
        for layer in range(a.shape[1]):
            d = paired_difference(a[:, layer].tolist(), b[:, layer].tolist())
            rows.append(
                {"model": model, "vs": vs, "layer": layer + 1, "seeds": n, "d": d["diff"],
                 "ci95_low": d["ci_low"], "ci95_high": d["ci_high"], "p": d["p"]}
            )  # fmt: skip
    out = pd.DataFrame(rows, columns=["model", "vs", "layer", "seeds", "d", "ci95_low", "ci95_high", "p"])
    out["p_holm"] = out.groupby("layer")["p"].transform(lambda p: holm(p.tolist()))
    return out


def in_box_verdict(differences: pd.DataFrame, alpha: float = 0.05) -> str:
    """One sentence over :func:`in_box_differences` at the last decoder layer: each comparison's difference
    in the in-box share with its 95% interval and Holm-corrected p, and how many are resolved at ``alpha``."""
    if differences.empty:
        return "In-box share: no comparison has both models measured."
    last = differences[differences["layer"] == differences["layer"].max()]
    parts = []
    for r in last.itertuples():
        if math.isfinite(r.ci95_low):
            ci = f"[{r.ci95_low:+.3f}, {r.ci95_high:+.3f}], p_holm {r.p_holm:.3f}"
        else:
            ci = "(one seed)"
        parts.append(f"{r.model} − {r.vs} {r.d:+.3f} {ci} over {r.seeds} seeds")
    resolved = int((last["p_holm"] < alpha).sum())
    return (
        f"In-box attention share at the last decoder layer (layer {int(last['layer'].iloc[0])}): "
        + "; ".join(parts)
        + f". {resolved} of {len(last)} resolved after Holm's correction over the layer's comparisons "
        f"(level {alpha})."
    )


def ap_differences(
    folders: Mapping[str, Sequence[Path]],
    pairs: Sequence[tuple[str, str]] = COMPARISONS,
    metrics: Sequence[str] = ("AP", "APS"),
) -> pd.DataFrame:
    """The detection metrics (×100) of the runs in ``folders`` (:func:`figure5_folders`, one kind of machine),
    compared as the in-box shares are: per ``(model, vs)`` of ``pairs`` and metric, the paired difference over
    the seeds both have (:func:`~sodlib.studies.stats.pairs_frame`), with ``p_holm`` over each metric's
    comparisons. Runs without metrics are left out."""
    runs = pd.DataFrame(
        [{"model": model, "seed": seed, **m} for model, runs in folders.items()
         for seed, folder in enumerate(runs) if (m := read_metrics(folder))]
    )  # fmt: skip
    out = pairs_frame(runs, pairs, key="model", metrics=metrics)
    out["p_holm"] = out.groupby("metric")["p"].transform(lambda p: holm(p.tolist()))
    return out


def ap_verdict(differences: pd.DataFrame, metric: str = "AP") -> str:
    """One sentence over :func:`ap_differences` for ``metric``: each comparison with its interval and
    Holm-corrected p."""
    parts = []
    for r in differences[differences["metric"] == metric].itertuples():
        if r.pairs > 1:
            parts.append(f"{r.model} − {r.vs} {r.diff:+.2f} [{r.ci95_low:+.2f}, {r.ci95_high:+.2f}], "
                         f"p_holm {r.p_holm:.3f} over {r.pairs} seeds")  # fmt: skip
        else:
            parts.append(f"{r.model} − {r.vs}: {r.pairs} seed(s), no interval")
    return f"{metric} ×100 of the same runs: " + "; ".join(parts) + "."


def plot_in_box_share(summary: pd.DataFrame, title: str = ""):
    """Mean in-box share per decoder layer, one line per model, error bars ± std over seeds."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.0), layout="constrained")
    models = summary.groupby("model", sort=False)
    for k, (model, part) in enumerate(models):
        ax.errorbar(
            part["layer"] + 0.04 * (k - (len(models) - 1) / 2),
            part["mean"],
            yerr=part["std"].fillna(0),
            marker="o",
            capsize=3,
            label=f"{model} ({int(part['seeds'].iloc[0])} seeds)",
        )
    ax.set(
        xlabel="decoder layer",
        ylabel="attention share inside the GT box",
        xticks=sorted(summary["layer"].unique()),
        ylim=(0, None),
    )
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def object_rows(models: Mapping[str, tuple], image_chw: Tensor, gt_cxcywh: Tensor, tag: str) -> list[dict]:
    """Rows of :func:`~sodlib.inference.heatmaps.plot_object_attention` for one ground-truth object seen by
    each model: the query that covers it best (score × IoU), its attention density per layer, its reference
    and predicted boxes, the GT box (``gt_xyxy``), the image, and per layer the share of its attention in the
    box.

    ``image_chw`` float [3, H, W] in [0, 1]; ``gt_cxcywh`` [4] normalised; ``tag`` starts each row's label."""
    h, w = image_chw.shape[-2:]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    gt_xyxy = box_convert(gt_cxcywh.float()[None], "cxcywh", "xyxy")[0] * scale
    x0, y0, x1, y1 = gt_xyxy.tolist()
    image_uint8 = (image_chw * 255).round().to(torch.uint8)
    rows = []
    for label, (model, cfg) in models.items():
        found = object_attention(model, image_uint8, cfg.data.image_size, box_xywh=(x0, y0, x1 - x0, y1 - y0))
        layers = list(range(cfg.model.num_decoder_layers))
        o = found[0]
        share = attention_mass_in_boxes(
            o["sampling_locations"], o["attention_weights"], gt_cxcywh.float()[None].expand(len(layers), 4)
        )
        row = figure_rows(
            found,
            cfg.model,
            cfg.data.image_size,
            (h, w),
            layers,
            [f"{label} · {tag}\nscore {o['score']:.2f}"],
        )[0]
        rows.append(
            row
            | {
                "gt_xyxy": gt_xyxy.numpy(),
                "image_hwc": image_chw.permute(1, 2, 0).numpy(),
                "notes": [f"{float(s):.0%} in GT box" for s in share],
            }
        )
    return rows


def top_query_panels(
    models: Mapping[str, tuple], dataset, num_images: int, top_queries: int
) -> list[list[dict]]:
    """Panels of :func:`sodlib.studies.viz.plot_heatmap_grid` for whole images (no GT to follow, e.g. another
    data set): one row per image and model, one panel per decoder layer, the summed attention of the
    ``top_queries`` highest-scoring queries splatted at their sampling points, the GT boxes drawn thin."""
    panels = []
    for j in range(min(num_images, len(dataset))):
        image, target = dataset[j]
        size_hw = tuple(image.shape[-2:])
        boxes = box_convert(target["boxes"], "cxcywh", "xyxy") * torch.tensor(size_hw[::-1] * 2)
        for label, (model, cfg) in models.items():
            with torch.no_grad(), eval_mode(model):
                out = model(image[None].to(cfg.train.device), return_sampling=True)
            top = (
                out["pred_logits"][0]
                .sigmoid()
                .amax(-1)
                .topk(min(top_queries, out["pred_logits"].shape[1]))
                .indices
            )
            panels.append(
                [
                    {
                        "image_hwc": image.permute(1, 2, 0).numpy(),
                        "box_xyxy": None,
                        "boxes_xyxy": boxes,
                        "heat": splat_attention(
                            layer["sampling_locations"][0, top].float().cpu(),
                            layer["attention_weights"][0, top].float().cpu(),
                            size_hw,
                        ).numpy(),
                        "title": f"{label}, {Path(dataset.image_path(j)).stem[:15]}, layer {k + 1}",
                    }
                    for k, layer in enumerate(out["layers"])
                ]
            )
    return panels

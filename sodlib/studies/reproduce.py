"""Headless reproduction of everything under ``results/``.

``sodlib reproduce`` (and ``make reproduce``) runs the steps in order. Step ``00_data`` generates
SynthSOD for the profile, plots its statistics and writes an evaluation sanity table (known
detections through every protocol and both evaluation backends); ``00_baseline`` trains (or reuses)
the profile's baseline. Every numbered notebook ``notebooks/NN_name.ipynb`` follows as a step named
``NN_name``, executed with papermill into ``results/notebooks/`` (see :mod:`sodlib.studies.notebooks`).
A failing step raises :class:`ReproductionError`, one line naming the step (and notebook cell).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sodlib.config import get_profile
from sodlib.data import shared_data_dir
from sodlib.io import SOURCE_ROOT, write_table

log = logging.getLogger(__name__)
NOTEBOOKS_DIR = SOURCE_ROOT / "notebooks"


class ReproductionError(RuntimeError):
    """A reproduction step failed; the message is one line naming the step and the cause."""


def perturbed_detections(gt: dict, kind: str, seed: int = 0) -> list[dict]:
    """Detections derived from ground truth, for sanity checks of the evaluators.

    ``perfect``: every box, score 1; ``jittered``: centres moved by N(0, (0.1·size)²), sizes scaled by
    exp(N(0, 0.1²)), scores U(0.5, 1); ``half_missed``: every second box dropped; ``random``: as many
    boxes per image, of the same sizes, at uniformly random places with random scores.
    """
    rng = np.random.default_rng(seed)
    anns = [a for a in gt["annotations"] if not a.get("iscrowd") and not a.get("ignore")]
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    if kind == "half_missed":
        anns = anns[::2]
    out = []
    for a in anns:
        x, y, w, h = a["bbox"]
        score = 1.0
        if kind == "jittered":
            x, y = x + rng.normal(0, 0.1 * w), y + rng.normal(0, 0.1 * h)
            w, h = w * np.exp(rng.normal(0, 0.1)), h * np.exp(rng.normal(0, 0.1))
            score = rng.uniform(0.5, 1.0)
        elif kind == "random":
            iw, ih = sizes[a["image_id"]]
            x, y = rng.uniform(0, max(1.0, iw - w)), rng.uniform(0, max(1.0, ih - h))
            score = rng.uniform(0.0, 1.0)
        elif kind not in ("perfect", "half_missed"):
            raise ValueError(f"unknown detection kind {kind!r}")
        out.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": [float(x), float(y), float(w), float(h)],
                "score": float(score),
            }
        )
    return out


def step_data(profile: str, results_dir: Path) -> dict:
    from sodlib.data import datastats, synth
    from sodlib.data.datasets import synthsod_root
    from sodlib.data.formats import load_coco
    from sodlib.evaluation.protocols import evaluate

    cfg = get_profile(profile).data
    root = synthsod_root(cfg)
    jsons = [
        synth.ensure_split(root, "train", cfg.synth_train_images, cfg.image_size, cfg.synth_seed),
        synth.ensure_split(root, "val", cfg.synth_val_images, cfg.image_size, cfg.synth_seed),
    ]
    summary = datastats.plot_stats(jsons, results_dir / "figures" / "synthsod_stats.png")
    print(datastats.format_stats(summary))
    stats = pd.DataFrame([{"metric": k, "value": v} for k, v in summary.items() if not isinstance(v, dict)])
    write_table(stats, results_dir / "tables" / "synthsod_stats")

    sets = [("SynthSOD val", load_coco(jsons[1]), ("coco", "sodad"))]
    visdrone = shared_data_dir() / "visdrone_val_annotations"
    if visdrone.is_dir():
        from sodlib.data.formats import visdrone_to_coco

        sets.append(
            (
                "VisDrone val (548 real annotation files)",
                visdrone_to_coco(visdrone, annotations_only=True),
                ("visdrone",),
            )
        )
    else:
        log.warning("%s absent: the VisDrone rows of the sanity table are skipped", visdrone)
    rows = []
    for name, gt, protocols in sets:
        for kind in ("perfect", "jittered", "half_missed", "random"):
            dets = perturbed_detections(gt, kind, seed=0)
            for protocol in protocols:
                # the VisDrone toolkit's own AP computation has one implementation, not two backends
                for backend in ("toolkit",) if protocol == "visdrone" else ("pycocotools", "faster"):
                    m = evaluate(
                        gt, dets, protocol=protocol, backend="auto" if backend == "toolkit" else backend
                    )
                    rows.append(
                        {
                            "data": name,
                            "detections": kind,
                            "protocol": protocol,
                            "backend": backend,
                            "AP": m["AP"],
                            "AP50": m["AP50"],
                            "AP75": m["AP75"],
                        }
                    )
    write_table(pd.DataFrame(rows), results_dir / "tables" / "eval_sanity")
    return summary


BASELINE_METRICS = ("AP", "AP50", "AP75", "APS", "APM", "APL")

BASELINE_KEYS = (*BASELINE_METRICS, "train_seconds", "iterations")

POST_NMS_IOU = 0.6  # diagnostic: the baseline's checkpoint re-evaluated with a per-class NMS (not end-to-end)


def step_baseline(profile: str, results_dir: Path) -> dict:
    """Train (or reuse) the profile's RT-DETR baseline; write results/baseline/metrics.json and its curve.

    Besides the end-to-end metrics, ``post_nms`` holds the same checkpoint evaluated with a per-class NMS
    at IoU ``POST_NMS_IOU`` (``model.post_nms``): how much of the gap to a perfect ranking is duplicates.
    It is stored beside the run (``metrics_post_nms.json``) so that a fresh clone reuses it.
    """
    import dataclasses
    import json

    from sodlib.data.datasets import build_dataset
    from sodlib.inference.predict import evaluate_model, load_model
    from sodlib.io import atomic_write_json
    from sodlib.studies.viz import plot_learning_curve
    from sodlib.training.engine import train
    from sodlib.training.runs import config_hash, run_dir

    cfg = get_profile(profile)
    out = run_dir(cfg, results_dir)
    post_path = out / "metrics_post_nms.json"
    metrics = train(cfg, out, protocol="coco", need_checkpoint=not post_path.exists())
    if not post_path.exists():
        model, _ = load_model(out / "checkpoints" / "last.pt", device=cfg.train.device)
        model.config = dataclasses.replace(model.config, post_nms=POST_NMS_IOU)
        scores, _ = evaluate_model(
            model,
            build_dataset(cfg.data, cfg.data.val_split, train=False),
            protocol="coco",
            device=cfg.train.device,
        )
        atomic_write_json(post_path, {"post_nms": POST_NMS_IOU, **{k: scores[k] for k in BASELINE_METRICS}})
    summary = {k: metrics[k] for k in BASELINE_KEYS}
    summary.update(
        profile=profile,
        config_hash=config_hash(cfg),
        run_dir=str(out.relative_to(results_dir)),
        with_post_nms=json.loads(post_path.read_text()),
        provenance=json.loads((out / "provenance.json").read_text()),
    )
    atomic_write_json(results_dir / "baseline" / "metrics.json", summary)
    plot_learning_curve(
        {f"RT-DETR {profile} baseline": out},
        results_dir / "figures" / f"baseline_{profile}_curve.png",
        title=f"RT-DETR baseline, {profile} profile, SynthSOD val (coco protocol)",
    )
    print(json.dumps({k: summary[k] for k in (*BASELINE_KEYS, "with_post_nms")}, indent=1))
    return summary


def step_budget_trend(profile: str, results_dir: Path, train: bool = False) -> pd.DataFrame:
    """Table 3's baseline and ST+SR+SPR at several budgets, paired seeds (:mod:`sodlib.studies.budget_trend`),
    each pair read on one kind of machine (:func:`sodlib.studies.budget_trend.on_the_methods_kind`):
    results/tables/budget_trend, from the run cache; ``train`` trains the runs it lacks (hours on a CPU). The
    ``smoke`` profile trains its own short budgets (tests)."""
    from sodlib.config import get_profile
    from sodlib.studies import budget_trend as bt
    from sodlib.studies.runner import train_configs
    from sodlib.studies.tables import comparison_profile

    prof = comparison_profile(profile)
    budgets, seeds = bt.BUDGETS, bt.SEEDS
    if prof == "smoke":
        n = get_profile("smoke").train.max_iters
        budgets, seeds, train = (n, 2 * n), 2, True
    plan = bt.trend_configs(prof, budgets, seeds)
    cfgs = [c for *_, c in plan]
    metrics = train_configs(
        cfgs, results_dir, labels=[f"{r} {n} it s{s}" for r, n, s, _ in plan], train=train
    )
    metrics = bt.on_the_methods_kind(plan, metrics, results_dir)
    stem = "budget_trend" if prof == "ablation" else f"budget_trend_{prof}"
    mechanisms = bt.mechanism_table(plan, bt.trend_folders(plan, results_dir))
    frame, verdict = bt.write_trend(
        [(r, n, s, m) for (r, n, s, _), m in zip(plan, metrics)], results_dir / "tables", stem, mechanisms
    )
    print(frame.to_string(index=False), verdict, sep="\n")
    return frame


def _steps(
    profile: str, results_dir: Path, train_missing: bool, notebooks: Sequence[Path], run_notebook
) -> list[tuple[str, object, bool]]:
    """(name, function, part of the default run) of every step. 00_sr_grad (six full-schedule runs, ~24 min on
    2 cores with their evaluations) is opt-in: notebook 04's Table 3 measures the same choice at the ablation
    profile over 5 seeds; 00_budget (nine more runs, eight of the baseline's length and one twice as long,
    ~35 min) is opt-in too: it backs the baseline's write-up. Each of ``notebooks`` follows as a step,
    ``run_notebook(path)``."""
    from sodlib.studies import experiments

    steps = [
        ("00_data", lambda: step_data(profile, results_dir), True),
        ("00_baseline", lambda: step_baseline(profile, results_dir), True),
        ("00_sr_grad", lambda: experiments.step_sr_grad(profile, results_dir), False),
        ("00_budget", lambda: experiments.step_budget(profile, results_dir), False),
        ("00_plateau", lambda: experiments.step_plateau(results_dir), False),
        ("00_trend", lambda: step_budget_trend(profile, results_dir, train_missing), True),
        ("00_geometry", lambda: experiments.step_geometry(results_dir), False),
    ]
    return steps + [(nb.stem, lambda nb=nb: run_notebook(nb), True) for nb in notebooks]


def main(
    profile: str = "cpu",
    only: str | None = None,
    seeds: int | None = None,
    results_dir: str | Path = "results",
    data: str = "",
    device: str = "",
    notebooks_dir: str | Path | None = None,
    progress: bool = True,
    train_missing: bool = False,
    tables: str = "",
    rows: str = "",
) -> int:
    """Run the steps whose name starts with ``only`` (when None: every default step) for ``profile``.

    ``seeds``, ``data`` and ``device`` reach the notebooks as ``SEEDS`` (None: the notebook's default),
    ``DATA`` and ``DEVICE`` ("": the profile's); ``train_missing`` as ``TRAIN_MISSING`` (notebook 04 trains
    the ablation runs the cache lacks; in a fresh ``--out`` folder that retrains every run), ``tables`` and
    ``rows`` (:func:`sodlib.studies.tables.select_tables`) limit that training. Raises
    :class:`ReproductionError` at the first failure and ``ValueError``, before any step, when ``only`` matches
    no step or a table or row is unknown.
    """
    from sodlib.studies import notebooks
    from sodlib.studies import tables as table_specs

    if tables or rows:  # names checked before anything runs
        table_specs.select_tables(table_specs.ABLATION_TABLES, tables, rows)
    results_dir = Path(results_dir)
    nb_dir = Path(notebooks_dir) if notebooks_dir is not None else NOTEBOOKS_DIR
    params = notebooks.notebook_parameters(profile, results_dir, seeds=seeds, data=data, device=device,
                                           train_missing=train_missing, tables=tables, rows=rows)  # fmt: skip

    def run_notebook(nb: Path):
        return notebooks.run_notebook(nb, results_dir / "notebooks" / nb.name, params, progress=progress)

    if not nb_dir.is_dir():
        log.warning("%s absent (sodlib installed without its repository): notebook steps skipped", nb_dir)
    found = notebooks.discover(nb_dir) if nb_dir.is_dir() else []
    steps = _steps(profile, results_dir, train_missing, found, run_notebook)
    selected = [(name, fn) for name, fn, default in steps if (name.startswith(only) if only else default)]
    if not selected:
        raise ValueError(f"--only {only!r} matches no step; steps: {', '.join(n for n, _, _ in steps)}")
    t_all = time.perf_counter()
    for name, fn in selected:
        _run_step(name, fn, profile)
    total = time.perf_counter() - t_all
    print(f"[reproduce] {len(selected)} step(s) done in {total:.1f} s; results in {results_dir}")
    return 0


def _run_step(name: str, fn, profile: str) -> None:
    """Run one step, timing it; any failure becomes a one-line :class:`ReproductionError` naming the step."""
    from sodlib.studies.notebooks import NotebookError

    t0 = time.perf_counter()
    print(f"[reproduce] {name} ({profile}) ...", flush=True)
    try:
        fn()
    except NotebookError as exc:
        raise ReproductionError(f"reproduction step {name} failed: {exc}") from exc
    except Exception as exc:
        raise ReproductionError(f"reproduction step {name} failed: {type(exc).__name__}: {exc}") from exc
    print(f"[reproduce] {name} done in {time.perf_counter() - t0:.1f} s", flush=True)

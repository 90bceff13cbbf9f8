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


SR_GRAD_VARIANTS = {
    "baseline": (),
    "ST+SR+SPR, sr_grad=difficulty": (
        "loss.st=true",
        "loss.sr=true",
        "loss.spr=true",
        "loss.sr_grad=difficulty",
    ),
    "ST+SR+SPR, sr_grad=end_to_end": (
        "loss.st=true",
        "loss.sr=true",
        "loss.spr=true",
        "loss.sr_grad=end_to_end",
    ),
}


def step_sr_grad(profile: str, results_dir: Path, seeds: int = 2) -> pd.DataFrame:
    """The measurement behind the default of ``loss.sr_grad`` : both SR training modes of the
    full method against the baseline, ``seeds`` seeds each, cached runs under results/runs/."""
    from sodlib.config import override
    from sodlib.training.engine import train
    from sodlib.training.runs import run_dir

    rows = []
    for label, sets in SR_GRAD_VARIANTS.items():
        for seed in range(seeds):
            cfg = override(get_profile(profile), *sets, f"train.seed={seed}")
            m = train(cfg, run_dir(cfg, results_dir), protocol="coco")
            rows.append(
                {"variant": label, "seed": seed, **{k: m[k] for k in ("AP", "AP50", "AP75", "APS", "APM")}}
            )
    runs = pd.DataFrame(rows)
    summary = runs.groupby("variant", sort=False)[["AP", "AP50", "APS"]].agg(["mean", "std"])
    summary.columns = [f"{a}_{b}" for a, b in summary.columns]
    table = summary.reset_index()
    write_table(table, results_dir / "tables" / "sr_grad")
    write_table(runs, results_dir / "tables" / "sr_grad_runs")
    print(table.to_string(index=False))
    return table


# The cpu profile's target (AP50 >= 0.80 in <= 180 s) at a fixed budget: each variant's iterations are the profile's
# scaled by baseline step time / variant step time (interleaved medians of real `cpu` steps, 2 threads,
# baseline 314 ms: 1 decoder layer 0.77x, ResNet-18 1.86x, 384 px 1.17x, stride-4 level 1.36x, encoder
# one-to-many 1.16x; 3 decoder layers: the previous profile's own 440 iterations, 171 s), so every row
# trains for about as long as the baseline (the table's train_seconds says how close, up to the
# machine's ±10% run-to-run speed). The "stride-4 ..., same iterations" row keeps the profile's iterations: what the
# stride-4 level is worth per step. "Cheaper step" drops three costs (no denoising queries, RT-DETR-R18's
# CSP expansion 0.5 in CCFM, channels-last convolutions: 0.70x the baseline's step, 232 vs 331 ms in one
# interleaved measurement) and spends the time on iterations; "twice the iterations" is the baseline
# trained 2x as long (~390 s): how far more steps alone would carry it.
P2_LEVEL = ("model.p2_values=true", "model.num_levels=4")
CHEAP_STEP = ("model.num_denoising=0", "model.expansion=0.5", "train.channels_last=true")
BUDGET_VARIANTS = {  # label: (overrides, fraction of the profile's iterations)
    "baseline": ((), 1.0),
    "3 decoder layers": (("model.num_decoder_layers=3", "loss.eta_per_layer=[1.5, 1.2, 1.0]"), 440 / 520),
    "1 decoder layer": (("model.num_decoder_layers=1", "loss.eta_per_layer=[1.0]"), 680 / 520),
    "ResNet-18 backbone": (("model.backbone=resnet18", "model.freeze_norm=false"), 280 / 520),
    "working size 384": (("data.image_size=384",), 445 / 520),
    "stride-4 value level": (P2_LEVEL, 385 / 520),
    "encoder one-to-many k=4": (("loss.enc_o2m=4",), 450 / 520),
    "stride-4 value level, same iterations": (P2_LEVEL, 1.0),
    "cheaper step (no denoising, CSP expansion 0.5, channels-last)": (CHEAP_STEP, 740 / 520),
    "baseline, twice the iterations": ((), 2.0),
}


def step_budget(profile: str, results_dir: Path) -> pd.DataFrame:
    """The baseline's alternatives at (about) the same training time: results/tables/baseline_budget."""
    from sodlib.config import override
    from sodlib.training.engine import train
    from sodlib.training.runs import run_dir

    base = get_profile(profile)
    rows = []
    for label, (sets, fraction) in BUDGET_VARIANTS.items():
        iters = max(1, round(base.train.max_iters * fraction))
        cfg = override(base, *sets, f"train.max_iters={iters}")
        m = train(cfg, run_dir(cfg, results_dir), protocol="coco")
        rows.append(
            {
                "variant": label,
                "iterations": m["iterations"],
                "train_seconds": round(m["train_seconds"], 1),
                **{k: m[k] for k in ("AP", "AP50", "AP75", "APS", "APM")},
            }
        )
    table = pd.DataFrame(rows)
    write_table(table, results_dir / "tables" / "baseline_budget")
    print(table.to_string(index=False))
    return table


PLATEAU_ITERS = (1000, 2000, 4000)  # full cosine schedules of N and 2N iterations


def plateau_frame(runs: list[tuple[int, int, dict, str]]) -> pd.DataFrame:
    """One line per (iterations, seed) run with ``gain_2x``: the AP points the same seed gains with a full
    schedule twice as long (NaN where that run is missing). ``runs``: (iterations, seed, metrics, run name)."""
    df = pd.DataFrame(
        [
            {
                "iterations": n,
                "seed": s,
                **{k: round(100 * m[k], 2) for k in ("AP", "AP50", "APS")},
                "train_seconds": round(m["train_seconds"]),
                "run": name,
            }
            for n, s, m, name in runs
        ]
    )
    ap = df.set_index(["iterations", "seed"])["AP"]
    df["gain_2x"] = [
        round(ap.get((n * 2, s), float("nan")) - a, 2)
        for n, s, a in zip(df["iterations"], df["seed"], df["AP"])
    ]
    return df


def plateau_iterations(df: pd.DataFrame, max_gain: float = 1.0) -> int | None:
    """The shortest schedule N whose every seed gains less than ``max_gain`` AP points at 2N (None if none)."""
    for n, g in df.groupby("iterations"):
        if g["gain_2x"].notna().all() and (g["gain_2x"] < max_gain).all():
            return int(n)
    return None


def step_plateau(results_dir: Path, seeds: int = 2, train: bool = True) -> pd.DataFrame:
    """The ``ablation`` profile's baseline at full schedules of 1000, 2000 and 4000 iterations, ``seeds``
    seeds each (one thread per run, two at a time): results/tables/ablation_plateau. ``train=False`` tables
    the runs already in the cache only."""
    from sodlib.studies.ablations import ablation_config, train_configs
    from sodlib.training.runs import run_dir

    plan = [
        (n, s, ablation_config("ablation", f"train.max_iters={n}", seed=s))
        for n in PLATEAU_ITERS
        for s in range(seeds)
    ]
    metrics = train_configs(
        [c for _, _, c in plan], results_dir, labels=[f"{n} it s{s}" for n, s, _ in plan], train=train
    )
    df = plateau_frame([(n, s, m, run_dir(c, results_dir).name) for (n, s, c), m in zip(plan, metrics) if m])
    write_table(df, results_dir / "tables" / "ablation_plateau")
    print(df.to_string(index=False))
    print(f"plateau (2N gains < 1 AP point on every seed): N = {plateau_iterations(df)}")
    return df


def step_budget_trend(profile: str, results_dir: Path, train: bool = False) -> pd.DataFrame:
    """Table 3's baseline and ST+SR+SPR at several budgets, paired seeds (:mod:`sodlib.studies.budget_trend`):
    results/tables/budget_trend, from the run cache; ``train`` trains the runs it lacks (hours on a CPU). The
    ``smoke`` profile trains its own short budgets (tests)."""
    from sodlib.config import get_profile
    from sodlib.studies import budget_trend as bt
    from sodlib.studies.ablations import comparison_profile, train_configs

    prof = comparison_profile(profile)
    budgets, seeds = bt.BUDGETS, bt.SEEDS
    if prof == "smoke":
        n = get_profile("smoke").train.max_iters
        budgets, seeds, train = (n, 2 * n), 2, True
    plan = bt.trend_configs(prof, budgets, seeds)
    metrics = train_configs(
        [c for *_, c in plan], results_dir, labels=[f"{r} {n} it s{s}" for r, n, s, _ in plan], train=train
    )
    stem = "budget_trend" if prof == "ablation" else f"budget_trend_{prof}"
    frame, verdict = bt.write_trend(
        [(r, n, s, m) for (r, n, s, _), m in zip(plan, metrics)], results_dir / "tables", stem
    )
    print(frame.to_string(index=False), verdict, sep="\n")
    return frame


GEOMETRY_VARIANTS = {  # profile: {label: overrides}; the first is the reference
    "ablation": {"float32 geometry": (), "bf16-rounded geometry": ("model.bf16_geometry=true",)},
    "cpu": {
        "bf16 geometry (autocast)": ("train.amp=true",),
        "float32 geometry": ("train.amp=true", "model.fp32_geometry=true"),
    },
}


def step_geometry(
    results_dir: Path, profile: str = "ablation", iters: int = 1000, seeds: int = 2
) -> pd.DataFrame:
    """What float32 geometry does at equal iterations: paired seeds of the baseline with boxes,
    references and sampling locations in float32 against bfloat16 precision: results/tables/geometry_<profile>."""
    from sodlib.studies.ablations import ablation_config, train_configs
    from sodlib.studies.stats import paired_difference

    variants = GEOMETRY_VARIANTS[profile]
    plan = [
        (label, s, ablation_config(profile, *sets, f"train.max_iters={iters}", seed=s))
        for label, sets in variants.items()
        for s in range(seeds)
    ]
    metrics = train_configs(
        [c for _, _, c in plan], results_dir, labels=[f"{lbl} s{s}" for lbl, s, _ in plan]
    )
    runs = pd.DataFrame(
        [
            {"variant": lbl, "seed": s, **{k: 100 * m[k] for k in ("AP", "AP50", "APS")}}
            for (lbl, s, _), m in zip(plan, metrics)
        ]
    )
    ref, *others = variants
    rows = []
    for label in others:
        for k in ("AP", "AP50", "APS"):
            d = paired_difference(
                runs[runs.variant == label][k].to_numpy(), runs[runs.variant == ref][k].to_numpy()
            )
            rows.append(
                {
                    "variant": label,
                    "vs": ref,
                    "metric": k,
                    "pairs": d["n"],
                    "diff": d["diff"],
                    "ci95_low": d["ci_low"],
                    "ci95_high": d["ci_high"],
                    "p": d["p"],
                }
            )
    table = pd.DataFrame(rows)
    write_table(runs, results_dir / "tables" / f"geometry_{profile}_runs", float_format="%.2f")
    write_table(table, results_dir / "tables" / f"geometry_{profile}", float_format="%.3f")
    print(runs.to_string(index=False), table.to_string(index=False), sep="\n")
    return table


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
    the ablation runs the cache lacks; in a fresh ``--out`` folder that retrains every run), ``tables`` and ``rows``
    (:func:`sodlib.studies.ablations.select_tables`) limit that training. Raises :class:`ReproductionError` at the
    first failure and ``ValueError``, before any step, when ``only`` matches no step or a table or row is unknown.
    """
    from sodlib.studies import ablations, notebooks

    if tables or rows:
        ablations.select_tables(ablations.ABLATION_TABLES, tables, rows)  # names checked before anything runs
    results_dir = Path(results_dir)
    # (name, function, part of the default run); 00_sr_grad (six full-schedule runs, ~24 min on 2 cores with
    # their evaluations) is opt-in: notebook 04's Table 3 re-measures the same choice at the ablation
    # schedule over 3 seeds; 00_budget (nine more runs, eight of the baseline's length and one twice as
    # long, ~35 min) is opt-in too: it backs the baseline's write-up.
    steps = [
        ("00_data", lambda: step_data(profile, results_dir), True),
        ("00_baseline", lambda: step_baseline(profile, results_dir), True),
        ("00_sr_grad", lambda: step_sr_grad(profile, results_dir), False),
        ("00_budget", lambda: step_budget(profile, results_dir), False),
        ("00_plateau", lambda: step_plateau(results_dir), False),
        ("00_trend", lambda: step_budget_trend(profile, results_dir, train_missing), True),
        ("00_geometry", lambda: step_geometry(results_dir), False),
    ]
    nb_dir = Path(notebooks_dir) if notebooks_dir is not None else NOTEBOOKS_DIR
    if nb_dir.is_dir():
        params = notebooks.notebook_parameters(
            profile,
            results_dir,
            seeds=seeds,
            data=data,
            device=device,
            train_missing=train_missing,
            tables=tables,
            rows=rows,
        )
        for nb in notebooks.discover(nb_dir):
            steps.append(
                (
                    nb.stem,
                    lambda nb=nb: notebooks.run_notebook(
                        nb, results_dir / "notebooks" / nb.name, params, progress=progress
                    ),
                    True,
                )
            )
    else:
        log.warning("%s absent (sodlib installed without its repository): notebook steps skipped", nb_dir)
    selected = [(name, fn) for name, fn, default in steps if (name.startswith(only) if only else default)]
    if not selected:
        raise ValueError(f"--only {only!r} matches no step; steps: {', '.join(n for n, _, _ in steps)}")
    t_all = time.perf_counter()
    for name, fn in selected:
        t0 = time.perf_counter()
        print(f"[reproduce] {name} ({profile}) ...", flush=True)
        try:
            fn()
        except notebooks.NotebookError as exc:
            raise ReproductionError(f"reproduction step {name} failed: {exc}") from exc
        except Exception as exc:
            raise ReproductionError(f"reproduction step {name} failed: {type(exc).__name__}: {exc}") from exc
        print(f"[reproduce] {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    print(
        f"[reproduce] {len(selected)} step(s) done in {time.perf_counter() - t_all:.1f} s; results in {results_dir}"
    )
    return 0

"""The runner: trains the configurations the run cache lacks, several at once on a CPU, and reads back their
metrics.

:func:`train_configs` trains every configuration not yet finished under ``results/runs/`` (each CPU run
single-threaded; two 1-thread runs on 2 cores do more work than one 2-thread run) and returns every run's
stored metrics; :func:`run_tables` does so for whole tables (:mod:`sodlib.studies.tables`), seed-major, so
that a partial batch already pairs every row; :func:`trained_models` loads detectors, retraining those cached
without weights; :func:`visdrone_run` is the detector the SAHI benchmark and notebook 05 use.
An interrupted batch resumes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Hashable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import pandas as pd

from sodlib.config import RunConfig
from sodlib.hardware import machine_slug
from sodlib.studies.drift import UNRECORDED, machine_folder, run_kind
from sodlib.studies.tables import METRICS, Table, ablation_config
from sodlib.training.runs import finished, load_finished_run, read_metrics, run_dir


def _estimated_cost(cfg: RunConfig) -> float:
    """Relative cost of a run, to start the longest first (BiFPN+SAE steps cost ~5× at the cpu profile)."""
    return (5.0 if cfg.model.encoder == "bifpn_sae" else 1.0) * (cfg.train.max_iters or 1)


def _train_worker(
    cfg_dict: dict, out_dir: str, data_root: str | None, protocol: str, need_checkpoint: bool = False
) -> tuple[dict, float]:
    from sodlib.training.engine import train

    t0 = time.perf_counter()
    metrics = train(
        RunConfig.from_dict(cfg_dict),
        out_dir,
        data_root=data_root,
        progress=False,
        protocol=protocol,
        need_checkpoint=need_checkpoint,
    )
    return metrics, time.perf_counter() - t0


SHORT_RUN_ITERS = 20  # runs this short (the smoke profile) train in-process: a spawned worker costs more


def default_workers(cfgs: Sequence[RunConfig]) -> int:
    """CPU runs: as many at once as ``cpu_count // train.threads``; GPU runs and very short runs (at most
    ``SHORT_RUN_ITERS`` iterations, where starting a worker process costs more than it saves): one at a
    time."""
    if not cfgs or any(not c.train.device.startswith("cpu") for c in cfgs):
        return 1
    if all(0 < c.train.max_iters <= SHORT_RUN_ITERS for c in cfgs):
        return 1
    threads = max(c.train.threads or (os.cpu_count() or 1) for c in cfgs)
    return max(1, (os.cpu_count() or 1) // threads)


def train_configs(
    cfgs: Sequence[RunConfig],
    results_dir: str | os.PathLike,
    data_root: str | None = None,
    protocol: str = "coco",
    workers: int | None = None,
    labels: Sequence[str] | None = None,
    verbose: bool = True,
    train: bool = True,
) -> list[dict]:
    """Train every configuration not yet finished under ``results_dir/runs/``; return all their metrics
    (``train=False``: train nothing, and a run missing from the cache gives None).

    Duplicates train once. ``workers`` > 1 runs that many trainings in parallel processes (spawned, so a
    notebook kernel's thread pools are not inherited); the data is prepared once beforehand. A failing
    run raises a RuntimeError naming its run folder and label.
    """
    if not train:
        return [load_finished_run(c, results_dir) for c in cfgs]
    labels = list(labels) if labels is not None else [c.name for c in cfgs]
    if len(labels) != len(cfgs):
        raise ValueError(f"{len(labels)} labels for {len(cfgs)} configs")
    dirs = [run_dir(c, results_dir) for c in cfgs]
    todo: dict[Path, tuple[RunConfig, str]] = {}
    for cfg, d, label in zip(cfgs, dirs, labels):
        if not finished(d) and d not in todo:
            todo[d] = (cfg, label)
    workers = default_workers(list(cfgs)) if workers is None else workers
    if todo:
        _prepare_data([c for c, _ in todo.values()], data_root)
        order = sorted(todo, key=lambda d: -_estimated_cost(todo[d][0]))
        if verbose:
            print(
                f"training {len(order)} run(s) ({len(set(dirs)) - len(order)} of {len(set(dirs))} distinct "
                f"runs cached), {workers} at a time",
                flush=True,
            )
        t_all = time.perf_counter()
        jobs = [(d, (todo[d][0].to_dict(), str(d), data_root, protocol)) for d in order]
        for i, (d, result, exc) in enumerate(_run_jobs(jobs, workers), 1):
            if exc is not None:
                raise RuntimeError(f"run {d} ({todo[d][1]}) failed: {type(exc).__name__}: {exc}") from exc
            metrics, secs = result
            if verbose:
                print(
                    f"[{i}/{len(order)}] {todo[d][1]} ({d.name}): AP {metrics['AP']:.3f} "
                    f"AP50 {metrics['AP50']:.3f} in {secs:.0f} s",
                    flush=True,
                )
        if verbose:
            print(f"trained {len(order)} run(s) in {time.perf_counter() - t_all:.0f} s", flush=True)
    return [load_finished_run(c, results_dir) for c in cfgs]


def _run_jobs(jobs: list[tuple[Path, tuple]], workers: int):
    """Yield ``(run folder, result, exception)`` as the jobs finish: in this process when ``workers`` <= 1,
    else in a pool of spawned processes. Leaving the loop early (an error) cancels the jobs not started."""
    if workers <= 1:
        for d, args in jobs:
            try:
                result = _train_worker(*args)
            except Exception as exc:  # noqa: BLE001 - reported with the run's name by the caller
                yield d, None, exc
            else:
                yield d, result, None
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(_train_worker, *args): d for d, args in jobs}
        for fut in as_completed(futures):
            exc = fut.exception()
            yield futures[fut], None if exc else fut.result(), exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _prepare_data(cfgs: Sequence[RunConfig], data_root: str | None) -> None:
    """Generate (or check) each distinct dataset once, before parallel workers would race to."""
    from sodlib.data.datasets import build_dataset

    seen = set()
    for cfg in cfgs:
        key = (cfg.data, data_root)
        if key not in seen:
            seen.add(key)
            build_dataset(cfg.data, cfg.data.train_split, train=True, data_root=data_root)
            build_dataset(cfg.data, cfg.data.val_split, train=False, data_root=data_root)


def run_tables(
    tables: Sequence[Table],
    profile: str,
    results_dir: str | os.PathLike,
    seeds: int | None = None,
    data_root: str | None = None,
    device: str = "",
    workers: int | None = None,
    train: bool = True,
) -> dict[str, pd.DataFrame]:
    """Train (or reuse) every run of ``tables`` in one batch (shared configurations once, the parallel
    workers kept busy across tables, seed 0 of every row first, then seed 1, ... so that a partial batch
    already pairs every row); per table, one row per (row, seed) with its metrics and run folder.

    ``train=False`` trains nothing: runs missing from the cache get NaN metrics and an empty ``run``.
    """
    entries = {t.name: t.configs(profile, seeds, device) for t in tables}
    flat = [(t, e) for t in tables for e in entries[t.name]]
    cfgs = [c for _, (_, _, c) in flat]
    if train:
        order = sorted(range(len(flat)), key=lambda i: flat[i][1][1])  # stable: seed-major
        trained = train_configs(
            [cfgs[i] for i in order],
            results_dir,
            data_root,
            workers=workers,
            labels=[f"{flat[i][0].name} {flat[i][1][0].label} s{flat[i][1][1]}" for i in order],
        )
        metrics = [None] * len(flat)
        for i, m in zip(order, trained):
            metrics[i] = m
    else:
        metrics = [load_finished_run(c, results_dir) for c in cfgs]
    out, i = {}, 0
    for t in tables:
        n = len(entries[t.name])
        out[t.name] = runs_frame(t, entries[t.name], metrics[i : i + n], results_dir)
        i += n
    return out


def on_kind(folder: Path, kind: str | None, results_dir: str | os.PathLike) -> Path:
    """The run of ``folder`` as trained on ``kind``: ``folder`` itself when that kind trained it, else its
    whole retrain on ``kind`` (``results/machines/<kind>/runs/<run>``, from
    :func:`sodlib.studies.drift.retrain_whole`) when one is finished, else ``folder``."""
    if kind is None or run_kind(folder) == kind:
        return Path(folder)
    copy = machine_folder(Path(results_dir), kind) / "runs" / Path(folder).name
    return copy if finished(copy) else Path(folder)


def run_folder(results_dir: str | os.PathLike, run: str) -> Path:
    """The folder of a runs frame's ``run``: ``results/runs/<run>``, or ``results/<run>`` for a retrain on
    another kind (``machines/<kind>/runs/<run>``)."""
    return Path(results_dir) / (run if "/" in run else f"runs/{run}")


def run_name(folder: str | os.PathLike, results_dir: str | os.PathLike) -> str:
    """The name a table gives the run in ``folder``, the inverse of :func:`run_folder`: ``<run>`` for
    ``results/runs/<run>``, else its path under ``results_dir`` (``machines/<kind>/runs/<run>``)."""
    folder, results = Path(folder).resolve(), Path(results_dir).resolve()
    if not folder.is_relative_to(results):
        return folder.name
    return folder.relative_to(results).as_posix().removeprefix("runs/")


def main_kind(folders: Sequence[Path], results_dir: str | os.PathLike | None = None) -> str | None:
    """The kind of machine the runs of ``folders`` are read on: the one that trained most of them (the first
    of those tied); None without any. With ``results_dir``, a run also counts for each kind that holds a
    finished whole retrain of it (``results/machines/<kind>/runs/<run>``): the kind on which most of the runs
    exist, ties going to a recorded kind before :data:`~sodlib.studies.drift.UNRECORDED` (only runs of a known
    kind can be matched by a reproduction on it), then to the kind that trained most of them."""
    trained = Counter(run_kind(f) for f in folders)
    if not trained:
        return None
    available = Counter(trained)
    if results_dir is not None:
        for f in folders:
            for copy in Path(results_dir).glob(f"machines/*/runs/{Path(f).name}"):
                if finished(copy) and (kind := run_kind(copy)) != run_kind(f):
                    available[kind] += 1
    order = {kind: i for i, (kind, _) in enumerate(trained.most_common())}
    return min(
        available, key=lambda k: (-available[k], k == UNRECORDED, -trained[k], order.get(k, len(order)))
    )


def on_one_kind(
    cfgs: Sequence[RunConfig],
    metrics: Sequence[dict | None],
    results_dir: str | os.PathLike,
    groups: Sequence[Hashable] | None = None,
) -> tuple[list[Path | None], list[dict | None]]:
    """The run folder and metrics of each finished run of ``cfgs`` (None where ``metrics`` has none), every
    run read on one kind of machine (:func:`main_kind`: the kind on which most of them exist, trained there or
    retrained whole, :func:`on_kind`), so that paired seeds differ by the method and not by the machine.

    ``groups`` (one label per run, e.g. its seed) names the runs that are paired with each other: a group
    whose runs do not all exist on that kind is read on its own :func:`main_kind`, so that each pair still
    lies on one kind (say seeds 0-2 trained on one kind and seeds 3-4 on another)."""
    folders = [run_dir(cfg, results_dir) if m else None for cfg, m in zip(cfgs, metrics)]
    kinds = [main_kind([f for f in folders if f is not None], results_dir)] * len(folders)
    for group in dict.fromkeys(groups or ()):
        members = [i for i, g in enumerate(groups) if g == group and folders[i] is not None]
        if any(run_kind(on_kind(folders[i], kinds[i], results_dir)) != kinds[i] for i in members):
            own = main_kind([folders[i] for i in members], results_dir)
            for i in members:
                kinds[i] = own
    out_folders, out_metrics = [], []
    for folder, m, kind in zip(folders, metrics, kinds):
        if folder is not None and (same := on_kind(folder, kind, results_dir)) != folder:
            folder, m = same, read_metrics(same)
        out_folders.append(folder)
        out_metrics.append(m)
    return out_folders, out_metrics


def runs_frame(table: Table, entries, metrics: Sequence[dict], results_dir) -> pd.DataFrame:
    """One line per (row, seed) of ``table``: its metrics, run folder, the kind of machine that trained it and
    code version, every run read on one kind of machine where it can be, and each seed's runs on one kind
    (:func:`on_one_kind` grouped by seed)."""
    cfgs, seeds = [cfg for *_, cfg in entries], [seed for _, seed, _ in entries]
    folders, metrics = on_one_kind(cfgs, metrics, results_dir, groups=seeds)
    rows = []
    for (row, seed, _), m, folder in zip(entries, metrics, folders):
        m = m or {}  # a run not trained (yet)
        rows.append(
            {
                "table": table.name,
                "row": row.label,
                "seed": seed,
                **{k: _nan_if_missing(m.get(k)) for k in METRICS},
                "iterations": m.get("iterations"),
                "train_seconds": m.get("train_seconds"),
                "run": run_name(folder, results_dir) if m else "",
                "kind": run_kind(folder) if m else "",
                "code": _code_version(folder) if m else "",
            }
        )
    return pd.DataFrame(rows)


def _code_version(folder: Path) -> str:
    """The git commit (12 characters, ``-dirty`` kept) that trained the run in ``folder``, from its
    provenance."""
    path = folder / "provenance.json"
    if not path.exists():
        return ""
    sha = json.loads(path.read_text()).get("git_sha") or ""
    return sha[:12] + ("-dirty" if sha.endswith("-dirty") else "")


def _nan_if_missing(v) -> float:
    """COCOeval reports -1 for an area range without objects: shown as NaN."""
    return float("nan") if v is None or v < 0 else float(v)


def weights_folder(folder: str | os.PathLike, results_dir: str | os.PathLike) -> Path:
    """Where the weights of run ``folder`` are read, or trained when missing: ``folder`` itself, except for a
    whole retrain on another kind of machine (``machines/<kind>/runs/<run>``) that lacks its weights, which
    holds that kind's run and is never overwritten by this one: then this kind's retrain of the same run
    (``machines/<this kind>/runs/<run>``)."""
    folder = Path(folder)
    kinds = folder.parent.parent
    if (
        (folder / "checkpoints" / "last.pt").exists()
        or folder.parent.name != "runs"
        or kinds.parent.name != "machines"
        or kinds.name == machine_slug()
    ):
        return folder
    return machine_folder(Path(results_dir)) / "runs" / folder.name


def trained_models(
    configs: dict[str, RunConfig],
    results_dir: str | os.PathLike,
    data_root: str | None = None,
    workers: int | None = None,
    folders: dict[str, str | os.PathLike] | None = None,
) -> dict:
    """label → (detector, RunConfig) from each config's run folder (``folders[label]`` where given, e.g. a
    whole retrain on one kind of machine from :func:`on_one_kind`). Runs cached without their weights (a fresh
    clone keeps only the metrics) are trained again first, ``workers`` at a time (default
    :func:`default_workers`: two single-thread runs side by side on 2 cores), in :func:`weights_folder`: a
    retrain on another kind of machine gets its weights from this kind's retrain beside it, and says so."""
    from sodlib.inference.predict import load_model

    folders = folders or {}
    dirs = {label: Path(folders.get(label) or run_dir(cfg, results_dir)) for label, cfg in configs.items()}
    for label, d in dirs.items():
        if (here := weights_folder(d, results_dir)) != d:
            print(f"{label}: {d} was trained on another kind of machine; its weights come from {here}")
            dirs[label] = here
    missing = {
        dirs[label]: cfg
        for label, cfg in configs.items()
        if not (dirs[label] / "checkpoints" / "last.pt").exists()
    }
    if missing:
        _prepare_data(list(missing.values()), data_root)
        jobs = [(d, (cfg.to_dict(), str(d), data_root, "coco", True)) for d, cfg in missing.items()]
        workers = default_workers(list(missing.values())) if workers is None else workers
        for d, _, exc in _run_jobs(jobs, min(workers, len(jobs))):
            if exc is not None:
                raise RuntimeError(f"run {d} failed: {type(exc).__name__}: {exc}") from exc
    return {
        label: load_model(dirs[label] / "checkpoints" / "last.pt", device=cfg.train.device)
        for label, cfg in configs.items()
    }


VISDRONE_ITERS = 2000  # 40 passes over the 200 patches of visdrone_mini


def visdrone_run(results_dir: str | Path = "results", patch: int = 320, verbose: bool = True):
    """Train (or reuse from the run cache) the ``ablation``-profile detector on visdrone_mini cut into
    ``patch``-px patches (:func:`sodlib.data.realdata.visdrone_patches`: its eight images are both train and
    test, so the model has seen what it is scored on), for :data:`VISDRONE_ITERS` iterations; return
    ``(config, run folder, patch folder)``. The checkpoint (``run/checkpoints/last.pt``, not committed) is
    retrained when absent."""
    from sodlib.data.realdata import visdrone_patches
    from sodlib.training.engine import train

    root = visdrone_patches(patch=patch)
    cfg = ablation_config(
        "ablation",
        "data.dataset=coco",
        f"data.root={root.name}",
        "data.val_split=test",
        "data.num_classes=10",
        "model.num_classes=10",
        f"data.image_size={patch}",
        f"train.max_iters={VISDRONE_ITERS}",
    )
    train_configs(
        [cfg], results_dir, data_root=str(root), labels=["visdrone_mini"], workers=1, verbose=verbose
    )
    d = run_dir(cfg, results_dir)
    train(cfg, d, data_root=str(root), progress=False, need_checkpoint=True)
    return cfg, d, root

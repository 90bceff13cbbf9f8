"""Run bookkeeping: atomic writes, config hashing, a results directory per run with provenance.

Every file sodlib writes goes through :func:`atomic_write_bytes` (temp file in the same folder,
fsync, ``os.replace``), so an interrupted process never leaves a half-written artefact behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from sodlib.config import RunConfig
from sodlib.hardware import cpu_features, machine_kind
from sodlib.io import SOURCE_ROOT, atomic_write_json, json_default

log = logging.getLogger(__name__)


def _non_default(obj) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = _non_default(value)
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if value != default:
            out[f.name] = value
    return out


def config_hash(config: dict | Any, length: int = 12) -> str:
    """Stable short hash of a config (a dict, or a dataclass config with ``to_dict``).

    For dataclass configs only the fields that differ from their dataclass defaults enter the
    hash, so adding a new option (with a default that keeps old behaviour) leaves the hashes of
    existing runs, and their cached results, valid. Changing a default changes what a run means:
    do that deliberately and rerun.
    """
    if hasattr(
        config, "canonical"
    ):  # a RunConfig: options that cannot act do not count (RunConfig.canonical)
        config = config.canonical()
    d = (
        _non_default(config)
        if dataclasses.is_dataclass(config)
        else (config.to_dict() if hasattr(config, "to_dict") else config)
    )
    blob = json.dumps(d, sort_keys=True, default=json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


# ---------------------------------------------------------------- provenance and run folders

_PACKAGES = (
    "torch",
    "torchvision",
    "numpy",
    "scipy",
    "pandas",
    "pycocotools",
    "faster-coco-eval",
    "matplotlib",
    "papermill",
)


def git_sha(repo: str | os.PathLike | None = None) -> str:
    """The current commit (with ``-dirty`` when tracked files outside ``results/`` have changes: results being
    written, e.g. another run's log, do not change what the code computes), or ``unknown`` outside git."""
    import subprocess

    cwd = Path(repo) if repo else SOURCE_ROOT
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def package_versions(packages: tuple[str, ...] = _PACKAGES) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


_CODE_SHA: str | None = None


def code_sha() -> str:
    """:func:`git_sha` when this process first asked (the engine asks as each training starts): the code it
    loaded, even when commits land while it trains; later calls return the same value."""
    global _CODE_SHA
    if _CODE_SHA is None:
        _CODE_SHA = git_sha()
    return _CODE_SHA


def provenance(seed: int | None = None, wall_seconds: float | None = None, device: str | None = None) -> dict:
    """Everything needed to say where a number came from. ``git_sha`` is the code this process loaded
    (:func:`code_sha`); when the tree has moved on since, ``git_sha_at_end`` says where it stood at the
    end."""
    import datetime
    import platform

    end = git_sha()
    info = {
        "git_sha": code_sha(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_features(),
        "machine_kind": machine_kind(),
        "packages": package_versions(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if end != info["git_sha"]:
        info["git_sha_at_end"] = end
    if seed is not None:
        info["seed"] = seed
    if wall_seconds is not None:
        info["wall_seconds"] = round(float(wall_seconds), 3)
    if device is not None:
        info["device"] = device
    return info


def default_results_dir() -> Path:
    """``$SODLIB_RESULTS`` or the repository's ``results/`` (next to the installed package)."""
    env = os.environ.get("SODLIB_RESULTS")
    return Path(env) if env else SOURCE_ROOT / "results"


def run_dir(config, results_dir: str | os.PathLike | None = None) -> Path:
    """``results/runs/<config hash>/``: the one place a configuration's outcome lives."""
    root = Path(results_dir) if results_dir else default_results_dir()
    return root / "runs" / config_hash(config)


def rehash_runs(results_dir=None, config_cls=None) -> dict[str, str]:
    """Move every ``runs/<hash>/`` whose stored config now hashes differently (after a default
    changed) to its new name. Returns {old: new}.

    A default change can shift names along a chain (the runs that had the old default move to a new name,
    the runs that asked for the new value explicitly move into the name they leave), so folders move in an
    order in which each target is free first; a target held by a folder that does not move, or a cycle,
    raises FileExistsError before anything moves."""
    if config_cls is None:
        config_cls = RunConfig
    root = Path(results_dir) if results_dir else default_results_dir()
    wanted = {}
    for d in sorted((root / "runs").glob("*/")):
        cfg_path = d / "config.json"
        if not cfg_path.exists():
            continue
        new = config_hash(config_cls.from_dict(json.loads(cfg_path.read_text())))
        if new != d.name:
            wanted[d.name] = new
    if len(set(wanted.values())) < len(wanted):
        raise FileExistsError(
            f"two runs in {root / 'runs'} would take the same name: {sorted(wanted.items())}"
        )
    order, pending = [], dict(wanted)
    while pending:
        free = [
            old
            for old, new in pending.items()
            if new not in pending and (new in order or not (root / "runs" / new).exists())
        ]
        if not free:
            raise FileExistsError(f"cannot rename runs in {root / 'runs'}: targets held or cyclic: {pending}")
        for old in sorted(free):
            order.append(old)
            del pending[old]
    for old in order:  # every target is free when its turn comes
        os.replace(root / "runs" / old, root / "runs" / wanted[old])
    return {old: wanted[old] for old in order}


def read_metrics(d: str | os.PathLike) -> dict | None:
    """The metrics of the finished run in folder ``d``, or None when it has none or they are unreadable.

    A corrupt ``metrics.json`` (not JSON, or not an object with numeric ``AP``) is reported by path in a
    warning and moved aside to ``metrics.json.corrupt`` (kept, never deleted), so the run trains again.
    """
    path = Path(d) / "metrics.json"
    if not path.exists():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        problem = str(err)
    else:
        numeric_ap = isinstance(metrics, dict) and isinstance(metrics.get("AP"), (int, float))
        problem = "" if numeric_ap else "no numeric 'AP'"
    if problem:
        log.warning(
            "%s is corrupt (%s); moved to %s, the run will be trained again",
            path,
            problem,
            path.with_name("metrics.json.corrupt"),
        )
        os.replace(path, path.with_name("metrics.json.corrupt"))
        return None
    return metrics


def finished(d: str | os.PathLike) -> bool:
    """Whether folder ``d`` holds a finished run with readable metrics (see :func:`read_metrics`)."""
    return read_metrics(d) is not None


def load_finished_run(config, results_dir=None) -> dict | None:
    """The stored metrics of a finished run with this exact config, or None."""
    return read_metrics(run_dir(config, results_dir))


def save_run(
    config,
    metrics: dict,
    results_dir=None,
    seed: int | None = None,
    wall_seconds: float | None = None,
    device: str | None = None,
) -> Path:
    """Store a finished run under ``results/runs/<config hash>/`` (see :func:`write_run`)."""
    return write_run(run_dir(config, results_dir), config, metrics, seed, wall_seconds, device)


def write_run(
    d: str | os.PathLike,
    config,
    metrics: dict,
    seed: int | None = None,
    wall_seconds: float | None = None,
    device: str | None = None,
) -> Path:
    """Write config.json, provenance.json and (last, marking the run finished) metrics.json into ``d``."""
    d = Path(d)
    cfg = config.to_dict() if hasattr(config, "to_dict") else config
    atomic_write_json(d / "config.json", cfg)
    atomic_write_json(d / "provenance.json", provenance(seed, wall_seconds, device))
    atomic_write_json(d / "metrics.json", metrics)
    return d


def main(argv=None) -> int:
    """``python -m sodlib.training.runs --rehash [--results DIR]``: :func:`rehash_runs`, printing each
    move."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m sodlib.training.runs",
        description="Move every run folder whose stored config now hashes to another "
        "name (after a default changed) to that name.",
    )
    parser.add_argument("--rehash", action="store_true", required=True, help="move the folders")
    parser.add_argument(
        "--results", default=None, help="results folder (default: $SODLIB_RESULTS or results/)"
    )
    args = parser.parse_args(argv)
    try:
        moved = rehash_runs(args.results)
    except FileExistsError as err:
        print(f"error: {err}")
        return 1
    for old, new in moved.items():
        print(f"{old} -> {new}")
    print(f"{len(moved)} run folder(s) moved")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def seed_spread(runs_dir: Path, run: str) -> tuple[float, int]:
    """Standard deviation of AP over the finished runs under ``runs_dir`` whose config is ``run``'s but for
    ``train.seed``, and how many there are."""
    import statistics

    from sodlib.config import override

    def key(folder: Path) -> str:  # the run's name with seed 0: equal for every seed of one configuration
        return config_hash(
            override(RunConfig.from_dict(json.loads((folder / "config.json").read_text())), "train.seed=0")
        )

    try:
        mine = key(runs_dir / run)
    except (OSError, ValueError):
        return float("nan"), 0
    aps = []
    for folder in runs_dir.iterdir():
        try:
            if (folder / "metrics.json").exists() and key(folder) == mine:
                aps.append(float(json.loads((folder / "metrics.json").read_text())["AP"]))
        except (OSError, ValueError, KeyError):
            continue
    return (statistics.stdev(aps) if len(aps) > 1 else float("nan")), len(aps)

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
import tempfile
from pathlib import Path
from typing import Any

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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parents created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artefacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


def config_hash(config: dict | Any, length: int = 12) -> str:
    """Stable short hash of a config (a dict, or a dataclass config with ``to_dict``).

    For dataclass configs only the fields that differ from their dataclass defaults enter the
    hash, so adding a new option (with a default that keeps old behaviour) leaves the hashes of
    existing runs, and their cached results, valid. Changing a default changes what a run means:
    do that deliberately and rerun.
    """
    d = _non_default(config) if dataclasses.is_dataclass(config) else (
        config.to_dict() if hasattr(config, "to_dict") else config)
    blob = json.dumps(d, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


# ---------------------------------------------------------------- provenance and run folders

_PACKAGES = ("torch", "torchvision", "numpy", "scipy", "pandas", "pycocotools", "faster-coco-eval",
             "matplotlib", "papermill")


def git_sha(repo: str | os.PathLike | None = None) -> str:
    """The current commit (with ``-dirty`` when the tree has changes), or ``unknown`` outside git."""
    import subprocess

    cwd = Path(repo) if repo else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
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


def provenance(seed: int | None = None, wall_seconds: float | None = None, device: str | None = None) -> dict:
    """Everything needed to say where a number came from."""
    import datetime
    import platform

    info = {
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": package_versions(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
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
    return Path(env) if env else Path(__file__).resolve().parent.parent / "results"


def run_dir(config, results_dir: str | os.PathLike | None = None) -> Path:
    """``results/runs/<config hash>/``: the one place a configuration's outcome lives."""
    root = Path(results_dir) if results_dir else default_results_dir()
    return root / "runs" / config_hash(config)


def rehash_runs(results_dir=None, config_cls=None) -> dict[str, str]:
    """Move every ``runs/<hash>/`` whose stored config now hashes differently (after a default
    changed) to its new name. Returns {old: new}. Refuses to overwrite an existing folder."""
    if config_cls is None:
        from sodlib.config import RunConfig as config_cls
    root = Path(results_dir) if results_dir else default_results_dir()
    moved = {}
    for d in sorted((root / "runs").glob("*/")):
        cfg_path = d / "config.json"
        if not cfg_path.exists():
            continue
        new = config_hash(config_cls.from_dict(json.loads(cfg_path.read_text())))
        if new != d.name:
            target = d.parent / new
            if target.exists():
                raise FileExistsError(f"cannot move {d} to {target}: it exists")
            os.replace(d, target)
            moved[d.name] = new
    return moved


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
        log.warning("%s is corrupt (%s); moved to %s, the run will be trained again", path, problem,
                    path.with_name("metrics.json.corrupt"))
        os.replace(path, path.with_name("metrics.json.corrupt"))
        return None
    return metrics


def finished(d: str | os.PathLike) -> bool:
    """Whether folder ``d`` holds a finished run with readable metrics (see :func:`read_metrics`)."""
    return read_metrics(d) is not None


def load_finished_run(config, results_dir=None) -> dict | None:
    """The stored metrics of a finished run with this exact config, or None."""
    return read_metrics(run_dir(config, results_dir))


def save_run(config, metrics: dict, results_dir=None, seed: int | None = None,
             wall_seconds: float | None = None, device: str | None = None) -> Path:
    """Store a finished run under ``results/runs/<config hash>/`` (see :func:`write_run`)."""
    return write_run(run_dir(config, results_dir), config, metrics, seed, wall_seconds, device)


def write_run(d: str | os.PathLike, config, metrics: dict, seed: int | None = None,
              wall_seconds: float | None = None, device: str | None = None) -> Path:
    """Write config.json, provenance.json and (last, marking the run finished) metrics.json into ``d``."""
    d = Path(d)
    cfg = config.to_dict() if hasattr(config, "to_dict") else config
    atomic_write_json(d / "config.json", cfg)
    atomic_write_json(d / "provenance.json", provenance(seed, wall_seconds, device))
    atomic_write_json(d / "metrics.json", metrics)
    return d


OUTPUT_MARK = ".sodlib-output"  # in every --out folder sodlib creates or adopts


def claim_output_dir(path: str | os.PathLike) -> Path:
    """An ``--out`` folder sodlib may write into: created (and marked) when absent, adopted when empty, reused
    when marked as sodlib's; a file, or a folder holding someone else's files, is refused with a ValueError
    before any work — nothing the user owns is overwritten."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a folder; nothing was written")
    if path.is_dir() and not (path / OUTPUT_MARK).exists() and any(path.iterdir()):
        raise ValueError(f"--out {path} exists and holds files sodlib did not write; choose a new or empty folder")
    path.mkdir(parents=True, exist_ok=True)
    (path / OUTPUT_MARK).touch()
    return path


def read_json(path: str | os.PathLike, what: str = "json") -> Any:
    """A json file's content; a missing file or invalid json raises an error naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text (UTF-8) file") from e

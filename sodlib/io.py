"""Files sodlib writes and reads: every write is atomic, every read error names the file.

:func:`atomic_write_bytes` (temp file in the same folder, fsync, ``os.replace``) is how every artefact is
written, so an interrupted process never leaves a half-written file behind; figures (:func:`save_figure`) and
tables (:func:`write_table`) go through it too. :func:`claim_output_dir` guards ``--out`` folders: nothing the
user owns is overwritten; :func:`file_lock` keeps two processes from writing one thing at once. Foundation
layer: imports nothing from sodlib.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

# The source checkout sodlib runs from: results/ and notebooks/ are in it, the shared sample data beside it.
# Every default path derived from the package's location is derived from this one constant.
SOURCE_ROOT = Path(__file__).resolve().parents[1]


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
    return atomic_write_text(
        path, json.dumps(obj, indent=indent, sort_keys=False, default=json_default) + "\n"
    )


def json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


OUTPUT_MARK = ".sodlib-output"  # in every --out folder sodlib creates or adopts


class LockedError(RuntimeError):
    """Another process holds the lock."""


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, wait: bool = True, what: str = ""):
    """Hold an exclusive lock on the file ``path`` (created, with the holder's process id in it) for the
    ``with`` block. ``wait=False``: raise :class:`LockedError` naming ``what`` and the holder when another
    process has it. POSIX ``flock``; where it does not exist (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise LockedError(
                f"{what or path} is in use by {holder} (lock {path}); wait for it to end"
            ) from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()}")
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def claim_output_dir(path: str | os.PathLike, name: str = "--out", resumable: tuple[str, ...] = ()) -> Path:
    """An ``--out`` folder sodlib may write into: created (and marked) when absent, adopted when empty, reused
    when marked as sodlib's; a file, or a folder holding someone else's files, is refused with a ValueError
    before any work — nothing the user owns is overwritten. ``name`` says which folder in the message; a
    folder holding one of the ``resumable`` entries (a run's ``config.json`` or ``checkpoints/``) is sodlib's
    work to resume, taken as it is."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {path} is a file, not a folder; nothing was written")
    if path.is_dir() and any((path / entry).exists() for entry in resumable):
        return path
    if path.is_dir() and not (path / OUTPUT_MARK).exists() and any(path.iterdir()):
        raise ValueError(
            f"{name} {path} exists and holds files sodlib did not write; choose a new or empty folder"
            f"{' with --out' if name != '--out' else ''}"
        )
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


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (parents created), close it, return the path."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_table(df: pd.DataFrame, stem: Path, float_format: str = "%.4f") -> None:
    """A table as ``stem.csv`` and ``stem.md`` (both atomic)."""
    atomic_write_text(stem.with_suffix(".csv"), df.to_csv(index=False, float_format=float_format))
    atomic_write_text(stem.with_suffix(".md"), df.to_markdown(index=False, floatfmt=float_format[1:]) + "\n")

"""Does a regenerated ``results/`` match the committed one? File by file, against a git revision.

After ``make reproduce`` (in a fresh clone, or after a refactoring) ``sodlib compare`` lists every file under
``results/`` that git sees as changed, new or deleted, and says what kind of change it is:

- ``identical`` — same bytes (a changed file is never this, but it reads well in a full listing);
- ``same numbers`` — a run's log or metrics, or a table of runs, whose only differences are in wall-clock
  columns and keys (:data:`TIMING`), in the column naming the commit that trained each run
  (:data:`PROVENANCE`), or columns added (a run retrained by code that logs more terms): every value the
  committed file holds — losses, learning rate, metrics — comes back to the same digits;
- ``same pixels`` — a PNG whose bytes differ (encoder metadata) but whose decoded pixels are equal;
- ``same config`` — a run's ``config.json`` written by newer code (new options at their defaults): both
  versions hash to the same run (:func:`sodlib.training.runs.config_hash`);
- ``provenance`` — ``provenance.json`` (commit, machine, date): it always changes when a run is retrained;
- ``re-executed`` — an executed notebook; the tables and figures it writes are compared on their own, its
  outputs (which print wall times) are summarised by how many code cells print something else;
- ``as its .csv`` — a Markdown table whose ``.csv`` sibling is compared (and is not ``differs``);
- ``new`` — a file the committed tree lacks (e.g. a retrained run's ``mechanisms.json``);
- ``machine`` — a run's log or metrics that differ while its provenance says it was retrained on another kind
  of machine than the committed run (:func:`sodlib.hardware.machine_kind`): float32 training is
  bit-reproducible on one kind only (``sodlib.studies.drift``). The detail gives the size: the AP before and
  after, and the spread of AP over the seeds of the same configuration. Where the committed run names no kind
  of machine the file stays ``differs`` with the same detail;
- ``differs`` / ``deleted`` — a number, figure or file that did not come back: the reproduction failed.

The exit status is 1 when any file ``differs`` or is ``deleted``, else 0. When runs were retrained on
another kind of machine, the summary also counts them: the figures and tables drawn from those runs move with
them, and compare cannot tell such a move from a regression, so each ``differs`` is read against those runs.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

from sodlib.training.runs import seed_spread

# wall-clock columns of run logs and run tables, and keys of metrics.json: they change with the machine's load
TIMING = ("train_seconds", "images_per_s", "wall_seconds")
PROVENANCE = (
    "code",
)  # the tables' column of the commits that trained their runs: a retrained run has a new one
FAIL = ("differs", "deleted")


def _git(repo: Path, *args: str) -> bytes:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True).stdout
    except subprocess.CalledProcessError as exc:
        raise ValueError(f"git {' '.join(args)} failed in {repo}: {exc.stderr.decode().strip()}") from None


def _checkout(results_dir: str | Path) -> tuple[Path, str]:
    """The git checkout holding ``results_dir``, and the folder's path inside it."""
    results_dir = Path(results_dir).resolve()
    if not results_dir.is_dir():
        raise FileNotFoundError(f"{results_dir}: no such results folder")
    repo = Path(_git(results_dir, "rev-parse", "--show-toplevel").decode().strip()).resolve()
    return repo, results_dir.relative_to(repo).as_posix()


def _commit(repo: Path, rev: str) -> str:
    """The commit ``rev`` names, as a full hash: whatever the user typed reaches git as a revision, never as
    an option (``--rev=--output=FILE`` must not become ``git diff --output=FILE``)."""
    if not rev or rev.startswith("-"):
        raise ValueError(f"--rev {rev!r}: not a revision (a revision never starts with '-')")
    try:
        out = _git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    except ValueError:
        raise ValueError(f"--rev {rev!r}: no such commit in {repo}") from None
    return out.decode().strip()


def _changed_files(repo: Path, rel: str, rev: str) -> list[tuple[str, str]]:
    """``(status, path relative to the repository)`` for every file under ``rel`` that differs from ``rev``:
    ``M`` modified, ``A`` new (untracked and not ignored, or added since ``rev``), ``D`` deleted.
    Sorted by path."""
    out = {}
    for line in _git(repo, "diff", "--name-status", "--no-renames", rev, "--", rel).decode().splitlines():
        status, path = line.split("\t", 1)
        out[path] = status[0] if status[0] in "MDA" else "M"  # A: added since rev (e.g. staged)
    for path in _git(repo, "ls-files", "--others", "--exclude-standard", "--", rel).decode().splitlines():
        out[path] = "A"
    return [(out[p], p) for p in sorted(out)]


def _compare_csv(old: bytes, new: bytes) -> tuple[str, str]:
    a, b = (
        pd.read_csv(io.BytesIO(old), dtype=str, keep_default_na=False),
        pd.read_csv(io.BytesIO(new), dtype=str, keep_default_na=False),
    )
    missing = [c for c in a.columns if c not in b.columns]
    if missing:
        return "differs", f"column(s) {', '.join(missing)} gone"
    added = [c for c in b.columns if c not in a.columns]  # e.g. a log written by code that logs more terms
    b = b[list(a.columns)]
    if a.shape != b.shape:
        return "differs", f"{len(a)} rows -> {len(b)}"
    timing = [c for c in a.columns if c in TIMING + PROVENANCE]
    cells = a.drop(columns=timing) != b.drop(columns=timing)
    if cells.values.any():
        row, col = np.argwhere(cells.values)[0]
        name = cells.columns[col]
        return "differs", (
            f"{int(cells.values.sum())} cell(s), first: row {row} {name} "
            f"{a[name].iloc[row]} -> {b[name].iloc[row]}"
        )
    moved = [c for c in timing if (a[c] != b[c]).any()]
    detail = [f"only {', '.join(moved)} changed"] if moved else []
    detail += [f"new column(s) {', '.join(added)}"] if added else []
    return "same numbers", "; ".join(detail)


def _compare_json(old: bytes, new: bytes) -> tuple[str, str]:
    a, b = json.loads(old), json.loads(new)
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        changed = [k for k in keys if a.get(k, KeyError) != b.get(k, KeyError)]
        rest = [k for k in changed if k not in TIMING]
        if not rest:
            return "same numbers", f"only {', '.join(changed)} changed"
        k = rest[0]
        return "differs", f"{len(rest)} key(s), first: {k} {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}"
    return ("identical", "") if a == b else ("differs", "content")


def _compare_config(old: bytes, new: bytes) -> tuple[str, str]:
    from sodlib.config import RunConfig
    from sodlib.training.runs import config_hash

    try:
        h_old, h_new = (config_hash(RunConfig.from_dict(json.loads(x))) for x in (old, new))
    except (ValueError, TypeError) as exc:
        return "differs", f"unreadable config: {exc}"
    return (
        ("same config", f"both hash to {h_new}")
        if h_old == h_new
        else ("differs", f"hash {h_old} -> {h_new}")
    )


def _compare_png(old: bytes, new: bytes) -> tuple[str, str]:
    import matplotlib.image as mpimg

    a, b = mpimg.imread(io.BytesIO(old), format="png"), mpimg.imread(io.BytesIO(new), format="png")
    if a.shape != b.shape:
        return "differs", f"size {a.shape[1]}x{a.shape[0]} -> {b.shape[1]}x{b.shape[0]}"
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if not diff.any():
        return "same pixels", "metadata only"
    return "differs", f"{(diff.max(axis=-1) > 0).mean():.2%} of pixels, max difference {diff.max():.3f}"


def _notebook_outputs(data: bytes) -> list[str]:
    cells = json.loads(data)["cells"]
    return [
        json.dumps(
            [
                {k: v for k, v in o.items() if k not in ("execution_count", "metadata")}
                for o in c.get("outputs", [])
            ],
            sort_keys=True,
        )
        for c in cells
        if c["cell_type"] == "code"
    ]


def _compare_notebook(old: bytes, new: bytes) -> tuple[str, str]:
    a, b = _notebook_outputs(old), _notebook_outputs(new)
    if len(a) != len(b):
        return "re-executed", f"{len(a)} code cells -> {len(b)}"
    n = sum(x != y for x, y in zip(a, b))
    return "re-executed", f"{n} of {len(a)} code cells print something else"


def compare_bytes(path: str, old: bytes, new: bytes) -> tuple[str, str]:
    """``(verdict, detail)`` for one file that exists in both trees; ``path`` picks the comparison."""
    if old == new:
        return "identical", ""
    name = Path(path).name
    if name == "provenance.json":
        return "provenance", "commit, machine or date"
    if name == "config.json" and "/runs/" in f"/{path}":
        return _compare_config(old, new)
    suffix = Path(path).suffix
    try:
        if suffix == ".csv":
            return _compare_csv(old, new)
        if suffix == ".json":
            return _compare_json(old, new)
        if suffix == ".png":
            return _compare_png(old, new)
        if suffix == ".ipynb":
            return _compare_notebook(old, new)
    except (ValueError, KeyError, pd.errors.ParserError, json.JSONDecodeError) as exc:
        return "differs", f"unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return "differs", f"{len(old)} -> {len(new)} bytes"


RUN_NUMBERS = (
    "log.csv",
    "eval.csv",
    "metrics.json",
    "mechanisms.json",
)  # what a retrained run's machine moves


def _short_kind(kind: str | None) -> str:
    return " ".join(kind.split()[:3]) if kind else "a kind not recorded"


def _machine_verdicts(repo: Path, rev: str, rows: dict[str, tuple[str, str]]) -> None:
    """Relabel the differing numbers of each run retrained on another kind of machine
    (see the module docstring)."""
    for prov_path, (verdict, _) in list(rows.items()):
        if verdict != "provenance" or Path(prov_path).parent.parent.name != "runs":
            continue
        folder = Path(prov_path).parent
        old, new = (
            json.loads(x).get("machine_kind")
            for x in (_git(repo, "show", f"{rev}:{prov_path}"), (repo / prov_path).read_bytes())
        )
        if new is None or old == new:
            continue
        try:
            ap_old = json.loads(_git(repo, "show", f"{rev}:{folder / 'metrics.json'}"))["AP"]
            ap_new = json.loads((repo / folder / "metrics.json").read_text())["AP"]
            std, n = seed_spread(repo / folder.parent, folder.name)
            size = (
                f"AP {ap_old:.4f} -> {ap_new:.4f} ({ap_new - ap_old:+.4f}; "
                f"seed std of this config {std:.4f} over {n})"
            )
        except (ValueError, KeyError, OSError):
            size = "no metrics to compare"
        note = f"retrained on {_short_kind(new)}, committed on {_short_kind(old)}: {size}"
        for name in RUN_NUMBERS:
            key = (folder / name).as_posix()
            if rows.get(key, ("",))[0] == "differs":
                rows[key] = ("machine" if old else "differs", f"{note}; {rows[key][1]}")


def compare(results_dir: str | Path = "results", rev: str = "HEAD") -> pd.DataFrame:
    """One row per changed file under ``results_dir``: ``path``, ``verdict`` (see the module docstring) and
    ``detail``."""
    repo, rel = _checkout(results_dir)
    rev = _commit(repo, rev)
    rows = {}
    for status, path in _changed_files(repo, rel, rev):
        if status == "D":
            rows[path] = ("deleted", f"in {rev}, not here")
        elif status == "A":
            rows[path] = ("new", "")
        else:
            rows[path] = compare_bytes(path, _git(repo, "show", f"{rev}:{path}"), (repo / path).read_bytes())
    _machine_verdicts(repo, rev, rows)
    for path, (verdict, _) in rows.items():  # a Markdown table follows the .csv it was written from
        sibling = rows.get(str(Path(path).with_suffix(".csv")))
        if Path(path).suffix == ".md" and verdict == "differs" and sibling and sibling[0] not in FAIL:
            rows[path] = ("as its .csv", sibling[0])
    return pd.DataFrame([(p, v, d) for p, (v, d) in rows.items()], columns=["path", "verdict", "detail"])


def report(table: pd.DataFrame) -> int:
    """Print the table and a one-line summary; 1 when any file differs or was deleted."""
    with pd.option_context("display.max_rows", None, "display.max_colwidth", 120, "display.width", 200):
        print(table.to_string(index=False) if len(table) else "no file under results/ changed")
    counts = table["verdict"].value_counts()
    print("; ".join(f"{n} {v}" for v, n in counts.items()) or "identical")
    details = zip(table["path"], table["detail"])
    moved = {str(Path(p).parent) for p, d in details if d.startswith("retrained on")}
    if moved:
        print(
            f"{len(moved)} run(s) retrained on another kind of machine: the figures and tables drawn "
            "from them move with them, so read each `differs` against those runs"
        )
    return int(bool(table["verdict"].isin(FAIL).any()))

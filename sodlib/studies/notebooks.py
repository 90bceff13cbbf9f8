"""Headless notebook execution: discover ``notebooks/NN_name.ipynb``, run them with papermill.

Every notebook takes the same parameters (``PROFILE``, ``SEEDS``, ``DATA``, ``DEVICE``, ``OUT_DIR``)
in one cell tagged ``parameters``. :func:`run_notebook` executes a notebook into
``<results>/notebooks/NN_name.ipynb`` atomically (temporary file, then ``os.replace``); when a cell
raises, :class:`NotebookError` names the notebook and the cell (``notebooks/01_x.ipynb cell 7: ValueError:
...``, cells counted from 1 over all cells of the source notebook, markdown included) and the executed
copy up to the failure is kept as ``NN_name.failed.ipynb`` next to where the good copy would go.

:func:`strip_outputs` / :func:`unstripped_cells` are the "committed without outputs" rule: the first
cleans a notebook in place, the second is what the tests check.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import nbformat

NOTEBOOK_NAME = re.compile(r"^\d{2}_[A-Za-z0-9_]+\.ipynb$")
PARAMETER_NAMES = ("PROFILE", "SEEDS", "DATA", "DEVICE", "OUT_DIR")


class NotebookError(RuntimeError):
    """A notebook failed; ``str()`` is one line naming the notebook (and the cell when known)."""

    def __init__(
        self, notebook: str, message: str, cell: int | None = None, executed_copy: Path | None = None
    ):
        self.notebook, self.cell, self.executed_copy = notebook, cell, executed_copy
        where = f"{notebook} cell {cell}" if cell is not None else notebook
        copy = f" (executed copy up to the failure: {executed_copy})" if executed_copy else ""
        super().__init__(f"{where}: {message}{copy}")


def discover(notebooks_dir: str | os.PathLike) -> list[Path]:
    """``NN_name.ipynb`` files of ``notebooks_dir`` in name (= number) order; other files are ignored."""
    d = Path(notebooks_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"notebooks folder not found: {d}")
    return sorted(p for p in d.iterdir() if p.is_file() and NOTEBOOK_NAME.match(p.name))


def notebook_parameters(
    profile: str,
    out_dir: str | os.PathLike,
    seeds: int | None = None,
    data: str = "",
    device: str = "",
    train_missing: bool = False,
    tables: str = "",
    rows: str = "",
) -> dict:
    """The parameters every notebook takes; ``seeds=None`` leaves the notebook's own default.
    ``train_missing`` adds ``TRAIN_MISSING=True`` (notebook 04: train the ablation runs the cache lacks),
    ``tables`` and ``rows`` ``TRAIN_TABLES`` / ``TRAIN_ROWS`` (which of them)."""
    params = {"PROFILE": profile, "DATA": data, "DEVICE": device, "OUT_DIR": str(Path(out_dir).resolve())}
    if seeds is not None:
        params["SEEDS"] = int(seeds)
    if train_missing:
        params["TRAIN_MISSING"] = True
    if tables:
        params["TRAIN_TABLES"] = tables
    if rows:
        params["TRAIN_ROWS"] = rows
    return params


def _display_path(path: Path) -> str:
    """``notebooks/01_x.ipynb`` style: the folder name and the file name."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _source_cell_number(executed: Path, cell_index: int) -> int:
    """1-based number, in the source notebook, of cell ``cell_index`` of the executed notebook.

    papermill inserts an ``injected-parameters`` cell after the ``parameters`` cell (cells after it move
    down by one) and, in the copy it writes on failure, error banner cells (dropped here first).
    """
    try:
        cells = nbformat.read(executed, as_version=4).cells
    except Exception:  # noqa: BLE001 - an unreadable copy only costs the shift correction
        return cell_index + 1
    tags = [c.get("metadata", {}).get("tags", []) for c in cells]
    tags = [t for t in tags if "papermill-error-cell-tag" not in t]
    shift = sum(1 for t in tags[:cell_index] if "injected-parameters" in t)
    return cell_index - shift + 1


def run_notebook(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    parameters: Mapping,
    cwd: str | os.PathLike | None = None,
    progress: bool = True,
    kernel_name: str | None = None,
) -> Path:
    """Execute ``src`` with papermill into ``dst`` (atomic) and return ``dst``.

    The kernel runs in ``cwd`` (default: the notebook's folder, as in Jupyter). On a failing cell raises
    :class:`NotebookError` naming the source notebook and cell; the partial executed copy is kept as
    ``dst`` with the suffix ``.failed.ipynb`` (the previous good ``dst``, if any, is left untouched).
    """
    import papermill
    from papermill.exceptions import PapermillException, PapermillExecutionError

    src, dst = Path(src), Path(dst)
    name = _display_path(src)
    n_params = len(parameters_cells(nbformat.read(src, as_version=4)))
    if n_params != 1:
        raise NotebookError(name, f"expected exactly one cell tagged 'parameters', found {n_params}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.stem}.", suffix=".ipynb", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp)
    failed = dst.with_suffix(".failed.ipynb")
    try:
        papermill.execute_notebook(
            str(src),
            str(tmp),
            parameters=dict(parameters),
            cwd=str(cwd or src.parent),
            progress_bar=progress,
            kernel_name=kernel_name,
        )
    except PapermillExecutionError as exc:
        cell = _source_cell_number(tmp, exc.cell_index)
        os.replace(tmp, failed)
        raise NotebookError(
            name, message=_one_line(f"{exc.ename}: {exc.evalue}"), cell=cell, executed_copy=failed
        ) from exc
    except PapermillException as exc:
        tmp.unlink(missing_ok=True)
        raise NotebookError(name, _one_line(f"{type(exc).__name__}: {exc}")) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(tmp, 0o644)
    os.replace(tmp, dst)
    failed.unlink(missing_ok=True)
    return dst


# ---------------------------------------------------------------- committed-notebook hygiene


def parameters_cells(nb) -> list:
    """The cells tagged ``parameters``."""
    return [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]


def unstripped_cells(nb) -> list[int]:
    """1-based numbers of the code cells that carry outputs or an execution count."""
    return [
        i + 1
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)
    ]


def strip_outputs(path: str | os.PathLike) -> bool:
    """Remove outputs, execution counts, papermill's injected-parameters cells and papermill/execution
    metadata from a notebook file in place. Returns whether the file changed. Written atomically.
    """
    from sodlib.io import atomic_write_text

    path = Path(path)
    before = path.read_text(encoding="utf-8")
    nb = nbformat.reads(before, as_version=4)
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        for key in ("execution", "papermill", "collapsed", "scrolled"):
            cell.metadata.pop(key, None)
    nb.metadata.pop("papermill", None)
    after = nbformat.writes(nb)
    after += "" if after.endswith("\n") else "\n"  # as nbformat.write
    if after != before:
        atomic_write_text(path, after)
    return after != before


if __name__ == "__main__":  # python -m sodlib.studies.notebooks notebooks/*.ipynb: strip outputs in place
    import sys

    for arg in sys.argv[1:]:
        print(f"{'stripped' if strip_outputs(arg) else 'clean   '} {arg}")

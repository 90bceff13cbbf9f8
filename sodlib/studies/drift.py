"""Guard against stale runs: the first logged losses of each code path, recorded with the committed runs.

The run cache is keyed on the config alone, so a code change that moves the numbers of a path (a loss,
the decoder, MRQM's head) would leave committed runs that the code no longer reproduces. For each path
(:data:`PATHS`) a tiny deterministic run (the ``smoke`` model at the ``ablation`` profile's settings:
three decoder layers, plain top-K, float32, one thread) logs its losses for :data:`ITERATIONS` steps;
``results/drift.json`` holds the values recorded at the code version that made the committed runs.
``tests/test_drift.py`` recomputes them and fails when any differs beyond :data:`RTOL`: regenerate the
affected runs, then record again with ``python -m sodlib.studies.drift --record``.
"""

from __future__ import annotations

import argparse
import csv
import math
import tempfile
from pathlib import Path

from sodlib.config import RunConfig, get_profile, override
from sodlib.io import atomic_write_json
from sodlib.training.runs import default_results_dir, git_sha

ITERATIONS = 12
RTOL = 1e-3  # relative; float32 kernels differ in their last bits between CPU types
PATHS = {
    "baseline": (),
    "st_sr_spr": ("loss.st=true", "loss.sr=true", "loss.spr=true"),
    "mrqm": ("model.encoder=bifpn_sae", "model.num_levels=4", "model.iah=true"),
}
# the ablation profile's code paths at smoke size
_GUARD = ("model.num_decoder_layers=3", "loss.eta_per_layer=[1.5,1.2,1.0]", "model.fp32_geometry=true",
          "train.amp=false", "train.threads=1", "train.epochs=10", f"train.max_iters={ITERATIONS}", "train.log_every=1",
          "train.checkpoint_every=1000", "train.eval_every=0")


def guard_config(path: str) -> RunConfig:
    """The tiny run that stands for code path ``path`` (a key of :data:`PATHS`)."""
    if path not in PATHS:
        raise ValueError(f"unknown code path {path!r}; choose one of {sorted(PATHS)}")
    return override(get_profile("smoke"), *_GUARD, *PATHS[path], f"name=drift_{path}")


def first_losses(path: str, data_root: str | None = None) -> list[list[float]]:
    """``[iteration, total loss, every weighted term summed over layers...]`` for each logged iteration
    (columns in :func:`loss_columns` order) of the guard run of ``path``."""
    from sodlib.training.engine import train

    with tempfile.TemporaryDirectory(prefix="sodlib-drift-") as tmp:
        train(guard_config(path), tmp, data_root=data_root, progress=False)
        with open(Path(tmp) / "log.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    columns = loss_columns(rows[0])
    return [[float(r[c]) for c in columns] for r in rows]


def loss_columns(row: dict) -> list[str]:
    return ["iteration", "loss", *sorted(k for k in row if k.endswith("_all"))]


def record(results_dir: Path | None = None) -> Path:
    """Write ``drift.json``: every path's first losses and the code version (git sha) that gave them."""
    results_dir = Path(results_dir or default_results_dir())
    doc = {"iterations": ITERATIONS, "rtol": RTOL, "code": git_sha(),
           "paths": {p: first_losses(p) for p in PATHS}}
    return atomic_write_json(results_dir / "drift.json", doc)


def mismatches(recorded: list[list[float]], current: list[list[float]], rtol: float = RTOL) -> list[str]:
    """Human-readable differences between two loss logs (empty when they agree within ``rtol``)."""
    if len(recorded) != len(current):
        return [f"{len(current)} logged iterations, recorded {len(recorded)}"]
    out = []
    for rec, cur in zip(recorded, current):
        if len(rec) != len(cur):
            out.append(f"iteration {cur[0]:g}: {len(cur)} columns, recorded {len(rec)}")
            continue
        for i, (a, b) in enumerate(zip(rec, cur)):
            if not math.isclose(a, b, rel_tol=rtol, abs_tol=1e-9):
                out.append(f"iteration {cur[0]:g}, column {i}: {b:.6g} vs recorded {a:.6g}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sodlib.studies.drift", description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="write results/drift.json from the current code")
    args = parser.parse_args(argv)
    if args.record:
        print(record())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

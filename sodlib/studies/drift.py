"""Guards against stale runs, per kind of machine: a code change that moves a path's numbers must not go
unseen.

The run cache is keyed on the config alone, so a code change that moves the numbers of a path (a loss, the
decoder, MRQM's head) would leave committed runs that the code no longer reproduces. Two guards retrain a few
iterations and compare the logged losses:

- **code paths** (:data:`PATHS`): a tiny deterministic run (the ``smoke`` model at the ``ablation`` profile's
  settings: three decoder layers, plain top-K, float32, one thread) for :data:`ITERATIONS` steps;
  ``results/drift.json`` holds its losses;
- **committed runs** (:data:`COMMITTED_RUNS`): for each code path of the tables, one committed run retrained
  :data:`COMMITTED_ITERATIONS` steps and compared with its own ``log.csv``; ``results/drift_committed.json``
  holds what other kinds of machine retrain it to.

Float32 training is bit-reproducible on one kind of machine (:func:`sodlib.hardware.machine_kind`), not across
kinds: ATen's vectorised kernels, oneDNN's convolutions and MKL's GEMM each pick code by the CPU's vendor and
vector width, so the first forward pass already differs in its last bits, and AdamW turns last-bit noise in
gradients that are nearly zero (a bias feeding a training-mode BatchNorm) into steps of the learning rate's
size; within ten steps the logged losses part in their fourth digit. Hence, per kind of machine:

- a kind recorded (the run's own, or one in the record): every logged value must come back exactly;
- any other kind: iteration 1 (the same weights, rounding only) must agree within :data:`FIRST_STEP_RTOL`, and
  the size of the later differences is reported (:func:`check`), not failed.

After regenerating the affected runs, record with ``python -m sodlib.studies.drift --record`` (this kind of
machine; other kinds' records are kept), and on a new kind of machine with ``--record`` too.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

from sodlib.config import RunConfig, get_profile, override
from sodlib.hardware import cpu_features, machine_kind, machine_slug
from sodlib.io import atomic_write_json
from sodlib.training.runs import default_results_dir, git_sha, seed_spread

ITERATIONS = 12
COMMITTED_ITERATIONS = 10  # the ablation profile logs iterations 1 and 10
FIRST_STEP_RTOL = 1e-5  # iteration 1 on another kind of machine: the same weights, rounding only
UNRECORDED = "unrecorded"  # the kind of machine of a record made before kinds were named
PATHS = {
    "baseline": (),
    "st_sr_spr": ("loss.st=true", "loss.sr=true", "loss.spr=true"),
    "mrqm": ("model.encoder=bifpn_sae", "model.num_levels=4", "model.iah=true"),
}
# one committed run of each code path of the tables (results/runs/<hash>)
COMMITTED_RUNS = {
    "baseline": "199b3ece2e01",  # ablation profile, seed 0: Table 3's and MRQM Table 3's baseline
    "baseline_2000": "609493605420",  # the budget trend's baseline at 2000 iterations, seed 0
    "baseline_4000": "5da49683a496",  # and at 4000 iterations
    "sr": "7ddf100c8a1e",  # Table 3 SR, seed 0
    "spr": "f434af81f156",  # Table 3 SPR, seed 0
    "st_sr": "fd50f616f966",  # Table 3 ST+SR, seed 0
    "st_sr_spr": "8decc3f6697e",  # ST+SR+SPR at alpha/gamma 0.5/1.5, seed 0 (Figure 5)
    "st_sr_spr_end_to_end": "7e9a6bc3225a",  # Table 3 ST+SR+SPR with sr_grad=end_to_end, seed 0
    "qfl": "085ff0b40116",  # Table 8 QFL (GFL), seed 0
    "qfl_st_sr": "0a44b4ca6863",  # Table 8 QFL +ST+SR, seed 0 (ST's and SR's QFL branches)
    "tal": "4bd8e1a77f4c",  # Table 8 TAL (TOOD), seed 0
    "tal_st": "174699ea40ec",  # Table 8 TAL +ST, seed 0 (ST's TAL branch)
    "iah": "ed21417e38b9",  # MRQM Table 3 +IAH, seed 0
    "bifpn_sae": "06c33282a432",  # MRQM Table 3 +BiFPN/SAE, seed 1
    "mrqm": "547ef3f70090",  # MRQM Table 3 +BiFPN/SAE +IAH, seed 0
    "mrqm_st_sr_spr": "7129b7c09e81",  # MRQM + ST+SR+SPR, seed 1
}
# the ablation profile's code paths at smoke size
_GUARD = (
    "model.num_decoder_layers=3",
    "loss.eta_per_layer=[1.5,1.2,1.0]",
    "model.fp32_geometry=true",
    "train.amp=false",
    "train.threads=1",
    "train.epochs=10",
    f"train.max_iters={ITERATIONS}",
    "train.log_every=1",
    "train.checkpoint_every=1000",
    "train.eval_every=0",
)


def guard_config(path: str) -> RunConfig:
    """The tiny run that stands for code path ``path`` (a key of :data:`PATHS`)."""
    if path not in PATHS:
        raise ValueError(f"unknown code path {path!r}; choose one of {sorted(PATHS)}")
    return override(get_profile("smoke"), *_GUARD, *PATHS[path], f"name=drift_{path}")


def loss_columns(row: dict) -> list[str]:
    """The columns a code-path record holds: iteration, total loss, every weighted term summed over layers."""
    return ["iteration", "loss", *sorted(k for k in row if k.endswith("_all"))]


def log_columns(row: dict) -> list[str]:
    """The columns a committed run's guard compares: iteration, total loss and every logged loss term (a log
    written by older code has fewer terms; the retrained one is read in the committed log's columns)."""
    return ["iteration", "loss", *sorted(k for k in row if k.startswith("loss_"))]


def _log_rows(log_csv: Path, iterations: int | None = None, columns=loss_columns) -> list[list[float]]:
    """The rows of a ``log.csv`` (up to ``iterations``) in ``columns``: a list of names, or a function of the
    first row that gives them."""
    with open(log_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if iterations is None or int(r["iteration"]) <= iterations]
    if not rows:
        raise ValueError(f"{log_csv}: no logged iteration")
    names = columns(rows[0]) if callable(columns) else columns
    missing = [c for c in names if c not in rows[0]]
    if missing:
        raise ValueError(f"{log_csv}: no column {', '.join(missing)}")
    return [[float(r[c]) for c in names] for r in rows]


def _retrain(
    cfg: RunConfig, iterations: int, data_root: str | None = None, columns=loss_columns
) -> list[list[float]]:
    from sodlib.training.engine import train

    with tempfile.TemporaryDirectory(prefix="sodlib-drift-") as tmp:
        train(cfg, tmp, data_root=data_root, progress=False, stop_after=iterations)
        return _log_rows(Path(tmp) / "log.csv", columns=columns)


def first_losses(path: str, data_root: str | None = None) -> list[list[float]]:
    """The logged losses (:func:`loss_columns`) of each iteration of the guard run of code path ``path``."""
    return _retrain(guard_config(path), ITERATIONS, data_root)


def committed_run(path: str, results_dir: Path | None = None) -> Path:
    """The committed run folder that stands for table code path ``path`` (a key of :data:`COMMITTED_RUNS`)."""
    if path not in COMMITTED_RUNS:
        raise ValueError(f"unknown code path {path!r}; choose one of {sorted(COMMITTED_RUNS)}")
    return Path(results_dir or default_results_dir()) / "runs" / COMMITTED_RUNS[path]


def _committed_columns(folder: Path) -> list[str]:
    with open(folder / "log.csv", newline="") as f:
        return log_columns(next(csv.DictReader(f)))


def run_kind(folder: Path) -> str:
    """The kind of machine that trained the run in ``folder`` (its provenance's ``machine_kind``), or
    :data:`UNRECORDED`."""
    path = Path(folder) / "provenance.json"
    kind = json.loads(path.read_text()).get("machine_kind") if path.exists() else None
    return kind or UNRECORDED


def committed_losses(path: str, results_dir: Path | None = None) -> tuple[list[list[float]], str]:
    """The committed run of ``path``: its logged losses (:func:`log_columns`) up to
    :data:`COMMITTED_ITERATIONS` and the kind of machine that trained it (:data:`UNRECORDED` when its
    provenance names none)."""
    folder = committed_run(path, results_dir)
    return _log_rows(folder / "log.csv", COMMITTED_ITERATIONS, log_columns), run_kind(folder)


def retrain_committed(
    path: str, results_dir: Path | None = None, data_root: str | None = None
) -> list[list[float]]:
    """The committed run of ``path`` retrained :data:`COMMITTED_ITERATIONS` steps with the code here, in the
    committed log's columns."""
    folder = committed_run(path, results_dir)
    cfg = RunConfig.from_dict(json.loads((folder / "config.json").read_text()))
    return _retrain(cfg, COMMITTED_ITERATIONS, data_root, _committed_columns(folder))


def mismatches(recorded: list[list[float]], current: list[list[float]], rtol: float = 0.0) -> list[str]:
    """Human-readable differences between two loss logs (empty when they agree within ``rtol``; 0: exactly,
    to the logged digits)."""
    if len(recorded) != len(current):
        return [f"{len(current)} logged iterations, recorded {len(recorded)}"]
    out = []
    for rec, cur in zip(recorded, current):
        if len(rec) != len(cur):
            out.append(f"iteration {cur[0]:g}: {len(cur)} columns, recorded {len(rec)}")
            continue
        for i, (a, b) in enumerate(zip(rec, cur)):
            if not math.isclose(a, b, rel_tol=rtol, abs_tol=rtol * abs(rec[1])):
                out.append(f"iteration {cur[0]:g}, column {i}: {b:.6g} vs recorded {a:.6g}")
    return out


def largest_difference(recorded: list[list[float]], current: list[list[float]]) -> tuple[float, float]:
    """``(iteration, relative difference)`` of the total loss where the two logs differ most."""
    pairs = [(c[0], abs(c[1] - r[1]) / max(abs(r[1]), 1e-12)) for r, c in zip(recorded, current)]
    return max(pairs, key=lambda p: p[1], default=(0.0, 0.0))


def check(
    reference: list[list[float]],
    reference_kind: str,
    recorded: dict[str, list[list[float]]],
    current: list[list[float]],
    kind: str,
) -> tuple[list[str], str]:
    """``(problems, note)`` for losses ``current`` retrained on machine kind ``kind``.

    ``reference`` is what machine kind ``reference_kind`` logged (the committed run's log, or a record);
    ``recorded`` maps other kinds to what they retrain to. On a kind that is ``reference_kind`` or in
    ``recorded`` every value must come back exactly. On any other kind iteration 1 must agree with the
    reference within :data:`FIRST_STEP_RTOL`, and the note states the size of the later differences."""
    if kind == reference_kind:
        return mismatches(reference, current), ""
    it, size = largest_difference(reference, current)
    away = (
        f"retrained on {kind}, the reference on {reference_kind}: the total loss differs by {size:.1e} "
        f"(relative) at iteration {it:g}"
    )
    if kind in recorded:
        return mismatches(recorded[kind], current), away
    problems = mismatches(reference[:1], current[:1], FIRST_STEP_RTOL)
    return (
        problems,
        f"kind of machine not recorded; {away} (record it with `python -m sodlib.studies.drift --record`)",
    )


def _merge_record(path: Path, key: str, values: dict, extra: dict, keep: bool = False) -> dict:
    """This machine kind's ``values`` under ``machines`` of the JSON record at ``path``, other kinds kept (and
    with ``keep`` this kind's other entries too)."""
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.update(extra)
    mine = doc.setdefault("machines", {}).get(machine_kind(), {})
    merged = {**mine.get(key, {}), **values} if keep else values
    doc["machines"][machine_kind()] = {"cpu": cpu_features(), "code": git_sha(), key: merged}
    return doc


def record(results_dir: Path | None = None, committed: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Record, for this kind of machine, every code path's first losses (``drift.json``) and what every
    committed run retrains to where this kind did not train it (``drift_committed.json``). ``committed`` names
    the committed paths to record (the others' records for this kind are kept); None: all of them."""
    results_dir = Path(results_dir or default_results_dir())
    for p in committed or ():
        committed_run(p, results_dir)  # an unknown path is named before anything trains
    paths = results_dir / "drift.json"
    doc = _merge_record(paths, "paths", {p: first_losses(p) for p in PATHS}, {"iterations": ITERATIONS})
    atomic_write_json(paths, doc)
    runs = {}
    for p in COMMITTED_RUNS if committed is None else committed:
        _, kind = committed_losses(p, results_dir)
        if kind != machine_kind():
            runs[p] = retrain_committed(p, results_dir)
    path = results_dir / "drift_committed.json"
    doc = _merge_record(
        path,
        "runs",
        runs,
        {"iterations": COMMITTED_ITERATIONS, "run_of": COMMITTED_RUNS},
        keep=committed is not None,
    )
    return paths, atomic_write_json(path, doc)


def recorded_by_kind(record_path: Path, key: str, name: str) -> dict[str, list[list[float]]]:
    """``{machine kind: losses}`` of ``name`` under ``key`` in a record (an absent file records nothing)."""
    if not record_path.exists():
        return {}
    machines = json.loads(record_path.read_text()).get("machines", {})
    return {kind: m[key][name] for kind, m in machines.items() if name in m.get(key, {})}


def machine_folder(results_dir: Path | None = None, kind: str | None = None) -> Path:
    """``results/machines/<kind>/``: committed runs retrained whole on another kind of machine."""
    return Path(results_dir or default_results_dir()) / "machines" / machine_slug(kind)


def retrain_whole(run: str, results_dir: Path | None = None, data_root: str | None = None) -> Path:
    """Retrain committed run ``run`` (a folder name under ``results/runs``) to its end on this kind of
    machine, into ``results/machines/<kind>/runs/<run>/``: how far a whole run moves with the machine."""
    from sodlib.training.engine import train

    results_dir = Path(results_dir or default_results_dir())
    source = results_dir / "runs" / run
    if not (source / "config.json").exists():
        raise ValueError(f"{source}: no committed run there (config.json missing)")
    cfg = RunConfig.from_dict(json.loads((source / "config.json").read_text()))
    out = machine_folder(results_dir) / "runs" / run
    train(cfg, out, data_root=data_root, progress=False)
    return out


def machine_table(results_dir: Path | None = None):
    """One line per run retrained whole on another kind of machine (``results/machines/*/runs/*``): the kinds,
    AP committed and retrained, their difference and the committed seed spread of the same configuration."""
    import pandas as pd

    results_dir = Path(results_dir or default_results_dir())
    rows = []
    for folder in sorted(results_dir.glob("machines/*/runs/*")):
        committed = results_dir / "runs" / folder.name
        if not (folder / "metrics.json").exists() or not (committed / "metrics.json").exists():
            continue
        kinds = [run_kind(f) for f in (committed, folder)]
        ap = [json.loads((f / "metrics.json").read_text())["AP"] for f in (committed, folder)]
        std, n = seed_spread(results_dir / "runs", folder.name)
        rows.append(
            {
                "run": folder.name,
                "committed_on": kinds[0],
                "retrained_on": kinds[1],
                "AP_committed": ap[0],
                "AP_retrained": ap[1],
                "dAP": ap[1] - ap[0],
                "seed_std_AP": std,
                "seeds": n,
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "run",
            "committed_on",
            "retrained_on",
            "AP_committed",
            "AP_retrained",
            "dAP",
            "seed_std_AP",
            "seeds",
        ],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sodlib.studies.drift", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--record",
        action="store_true",
        help="record this kind of machine's losses in results/drift.json and drift_committed.json",
    )
    parser.add_argument(
        "--paths", default="", help="with --record: only these committed-run paths, comma-separated"
    )
    parser.add_argument(
        "--retrain",
        metavar="RUN",
        default="",
        help="retrain committed run RUN whole into results/machines/<this kind>/runs/RUN",
    )
    parser.add_argument(
        "--machine-table",
        action="store_true",
        help="write results/tables/machine_retrain.{csv,md} from results/machines/",
    )
    args = parser.parse_args(argv)
    if args.retrain:
        print(retrain_whole(args.retrain))
    if args.machine_table:
        from sodlib.io import write_table

        stem = default_results_dir() / "tables" / "machine_retrain"
        write_table(machine_table(), stem, float_format="%.4f")
        print(stem.with_suffix(".csv"))
    if args.record:
        for p in record(committed=[x for x in args.paths.split(",") if x] or None):
            print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

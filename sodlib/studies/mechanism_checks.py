"""Is each of paper A's mechanisms acting on a table's runs? Each judged by what it is meant to change, with
intervals.

For every row that switches a mechanism on (its config's ``loss.spr``, ``loss.sr``, ``loss.st``), over the
row's seeds, from the runs' ``mechanisms.json`` (:mod:`sodlib.training.mechanisms`):

- **SPR** pulls its positives' sampling points into the η-expanded box: the share of points outside it at the
  last decoder layer, minus the baseline's share at the same seed (the ablation profile's baseline run). It
  acts when the 95% interval of that paired difference lies below 0. Its loss share stays small while the
  points move, so it is not the test.
- **SR** gives hard positives more weight: the Spearman correlation of its factor with the difficulty 1 − IoU.
  It acts when the interval of the mean over seeds lies above 0.
- **ST** replaces the IoU target by c (Eq. 14): the mean over SODA-D's size buckets of (t − IoU) per seed. It
  acts when the interval excludes 0.

With one seed there is no interval: ``acts`` is ``one seed``; a run without ``mechanisms.json`` is left out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sodlib.studies.stats import paired_difference

__all__ = [
    "COLUMNS",
    "mechanism_checks",
    "mechanism_verdict",
    "mechanisms_long",
    "read_mechanisms",
    "table_checks",
]

COLUMNS = ("table", "row", "mechanism", "measure", "seeds", "mean", "ci95_low", "ci95_high", "acts")
ST_BUCKETS = ("st_gap_eS", "st_gap_rS", "st_gap_gS", "st_gap_N")


def read_mechanisms(folder: str | Path) -> dict[str, float] | None:
    """A run folder's ``mechanisms.json`` (None when it has none)."""
    path = Path(folder) / "mechanisms.json"
    return json.loads(path.read_text()) if path.exists() else None


def _last_outside_share(m: Mapping[str, float]) -> float:
    layers = sorted(int(k.rsplit("_l", 1)[1]) for k in m if k.startswith("spr_outside_share_l"))
    return float(m[f"spr_outside_share_l{layers[-1]}"]) if layers else math.nan


def _st_gap(m: Mapping[str, float]) -> float:
    gaps = [m[k] for k in ST_BUCKETS if k in m and math.isfinite(m[k])]
    return float(np.mean(gaps)) if gaps else math.nan


def _judge(values: Sequence[float], acts_when: str) -> dict:
    """Mean and t-interval of ``values`` against 0; ``acts_when`` ``below`` / ``above`` / ``nonzero``."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return {"seeds": 0, "mean": math.nan, "ci95_low": math.nan, "ci95_high": math.nan, "acts": "not run"}
    d = paired_difference(values, [0.0] * len(values))
    out = {"seeds": d["n"], "mean": d["diff"], "ci95_low": d["ci_low"], "ci95_high": d["ci_high"]}
    if d["n"] < 2:
        return {**out, "acts": "one seed"}
    lo, hi = d["ci_low"], d["ci_high"]
    acts = {"below": hi < 0, "above": lo > 0, "nonzero": lo > 0 or hi < 0}[acts_when]
    return {**out, "acts": "yes" if acts else "no"}


def mechanism_checks(
    table: str,
    rows: Sequence[tuple[str, Mapping[str, bool], Mapping[int, Mapping[str, float]]]],
    baseline: Mapping[int, Mapping[str, float]],
) -> pd.DataFrame:
    """One line per (row, mechanism it switches on) of table ``table`` (see the module docstring).

    ``rows``: ``(label, switches, {seed: mechanisms})`` with ``switches`` the row's
    ``{"spr": bool, "sr": bool, "st": bool}``; ``baseline``: ``{seed: mechanisms}`` of the baseline runs SPR
    is paired with."""
    out = []
    for label, switches, by_seed in rows:
        seeds = sorted(by_seed)
        if switches.get("spr"):
            diffs = [
                _last_outside_share(by_seed[s]) - _last_outside_share(baseline[s])
                for s in seeds
                if s in baseline
            ]
            out.append(
                {
                    "row": label,
                    "mechanism": "SPR",
                    "measure": "last-layer outside share - baseline's",
                    **_judge(diffs, "below"),
                }
            )
        if switches.get("sr"):
            out.append(
                {
                    "row": label,
                    "mechanism": "SR",
                    "measure": "sr_difficulty_spearman",
                    **_judge([by_seed[s].get("sr_difficulty_spearman", math.nan) for s in seeds], "above"),
                }
            )
        if switches.get("st"):
            out.append(
                {
                    "row": label,
                    "mechanism": "ST",
                    "measure": "mean st_gap over size buckets",
                    **_judge([_st_gap(by_seed[s]) for s in seeds], "nonzero"),
                }
            )
    frame = pd.DataFrame(out, columns=[c for c in COLUMNS if c != "table"])
    frame.insert(0, "table", table)
    return frame


def mechanism_verdict(checks: pd.DataFrame) -> str:
    """One sentence over a table's mechanism checks: each with its mean, interval and whether it acted; the
    rows not trained yet named once."""
    if checks.empty:
        return "Mechanisms: no row of this table switches one on."
    parts, waiting = [], []
    for r in checks.itertuples():
        if r.acts == "not run":
            waiting += [r.row] if r.row not in waiting else []
            continue
        interval = f"[{r.ci95_low:+.3f}, {r.ci95_high:+.3f}]" if np.isfinite(r.ci95_low) else "(one seed)"
        word = {"yes": "acts", "no": "did NOT act", "one seed": "not judged"}[r.acts]
        parts.append(f"{r.mechanism} on {r.row}: {r.measure} {r.mean:+.3f} {interval}, {word}")
    if waiting:
        parts.append(f"not run yet: {', '.join(waiting)}")
    return "Mechanisms: " + "; ".join(parts) + "."


def table_checks(table, runs: pd.DataFrame, profile: str, results_dir: str | Path) -> pd.DataFrame:
    """:func:`mechanism_checks` of an ablation ``table`` (:class:`sodlib.studies.tables.Table`) from its runs
    frame (:func:`sodlib.studies.runner.runs_frame`); SPR is paired with the profile's baseline run of each
    seed."""
    from sodlib.studies.runner import main_kind, on_kind, run_folder
    from sodlib.studies.tables import ablation_config
    from sodlib.training.runs import run_dir

    rows = []
    for row in table.rows:
        loss = ablation_config(profile, *row.overrides(profile)).loss
        done = runs[(runs["row"] == row.label) & (runs["run"] != "")]
        by_seed = {
            int(r.seed): m
            for r in done.itertuples()
            if (m := read_mechanisms(run_folder(results_dir, r.run))) is not None
        }
        rows.append((row.label, {"spr": loss.spr, "sr": loss.sr, "st": loss.st}, by_seed))
    seeds = sorted({s for _, _, by_seed in rows for s in by_seed})
    done = runs[runs["run"] != ""]
    kind = {  # the kind each seed's runs are read on (runs_frame reads a seed's runs on one kind)
        int(s): main_kind([run_folder(results_dir, r) for r in group["run"]])
        for s, group in done.groupby("seed")
    }
    baseline = {
        s: m
        for s in seeds
        if (
            m := read_mechanisms(
                on_kind(run_dir(ablation_config(profile, seed=s), results_dir), kind[s], results_dir)
            )
        )
        is not None
    }
    return mechanism_checks(table.name, rows, baseline)


def mechanisms_long(tables, runs: Mapping[str, pd.DataFrame], results_dir: str | Path) -> pd.DataFrame:
    """``table,metric,row,seed,value`` for every trained run of ``tables``
    (``runs``: table name → runs frame)."""
    from sodlib.studies.runner import run_folder

    out = []
    for table in tables:
        for r in runs[table.name].itertuples():
            m = read_mechanisms(run_folder(results_dir, r.run)) if r.run else None
            out += [
                {"table": table.name, "metric": k, "row": r.row, "seed": r.seed, "value": v}
                for k, v in (m or {}).items()
            ]
    return pd.DataFrame(out, columns=["table", "metric", "row", "seed", "value"])

"""How paper A's main effect moves with the training budget: Table 3's baseline and ST+SR+SPR at
1000, 2000 and 4000 iterations, on paired seeds, each run a complete cosine schedule at its budget.

The ablation tables compare at one fixed budget (:data:`sodlib.config.ABLATION_ITERS`); this table says
whether their main difference grows, shrinks or holds when both rows train longer. Per budget: both rows' AP
and APS (×100, mean over seeds), the paired ``dAP`` (ST+SR+SPR − baseline) with its 95% t-interval and p; the
verdict compares the per-seed dAP at the longest budget with the shortest, again paired, with its interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sodlib.config import RunConfig
from sodlib.io import write_table
from sodlib.studies.stats import paired_difference

BUDGETS = (1000, 2000, 4000)
SEEDS = 3
ROWS = ("baseline", "ST+SR+SPR")


def trend_configs(
    profile: str = "ablation", budgets: Sequence[int] = BUDGETS, seeds: int = SEEDS
) -> list[tuple[str, int, int, RunConfig]]:
    """``(row, budget, seed, config)`` of every run: Table 3's baseline and full rows with
    ``train.max_iters``."""
    from sodlib.studies.tables import ABLATION_TABLES, ablation_config

    rows = {r.label: r for r in ABLATION_TABLES[0].rows}
    return [
        (
            label,
            n,
            s,
            ablation_config(profile, *rows[label].overrides(profile), f"train.max_iters={n}", seed=s),
        )
        for n in budgets
        for s in range(seeds)
        for label in ROWS
    ]


def trend_folders(plan: Sequence[tuple[str, int, int, RunConfig]], results_dir) -> list[Path | None]:
    """The run folder of each finished run of :func:`trend_configs`' ``plan`` (None where not trained), each
    baseline read on the kind of machine that trained the ST+SR+SPR run of its budget and seed, where a whole
    retrain on that kind exists (:func:`sodlib.studies.runner.on_kind`): a pair differs by the method, not
    by the machine."""
    from sodlib.studies.drift import run_kind
    from sodlib.studies.runner import on_kind
    from sodlib.training.runs import finished, run_dir

    method = {(n, s): run_dir(c, results_dir) for r, n, s, c in plan if r == ROWS[1]}
    out = []
    for r, n, s, c in plan:
        folder = run_dir(c, results_dir)
        other = method.get((n, s))
        if r == ROWS[0] and finished(folder) and other is not None and finished(other):
            folder = on_kind(folder, run_kind(other), results_dir)
        out.append(folder if finished(folder) else None)
    return out


def on_the_methods_kind(
    plan: Sequence[tuple[str, int, int, RunConfig]], metrics: Sequence[dict | None], results_dir
) -> list[dict | None]:
    """``metrics`` of :func:`trend_configs`' ``plan``, each baseline's read from its folder of
    :func:`trend_folders` (the kind of its paired ST+SR+SPR run)."""
    from sodlib.training.runs import read_metrics

    return [
        read_metrics(folder) if m and folder is not None else m
        for m, folder in zip(metrics, trend_folders(plan, results_dir))
    ]


def mechanism_lines(plan: Sequence[tuple[str, int, int, RunConfig]], folders) -> pd.DataFrame:
    """``table,metric,row,seed,value`` of every trained run of ``plan`` (``folders`` from
    :func:`trend_folders`), table ``budget_trend`` and row ``"<row> <budget> it"``, as ``mechanisms.csv``
    holds them for the ablation tables."""
    from sodlib.studies.mechanism_checks import read_mechanisms

    out = [
        {"table": "budget_trend", "metric": k, "row": f"{r} {n} it", "seed": s, "value": v}
        for (r, n, s, _), folder in zip(plan, folders)
        if folder is not None
        for k, v in (read_mechanisms(folder) or {}).items()
    ]
    return pd.DataFrame(out, columns=["table", "metric", "row", "seed", "value"])


def mechanism_table(plan: Sequence[tuple[str, int, int, RunConfig]], folders) -> pd.DataFrame:
    """Per budget, whether SPR, SR and ST act on the ST+SR+SPR runs
    (:func:`sodlib.studies.mechanism_checks.mechanism_checks`, table ``budget_trend``, row
    ``"ST+SR+SPR <budget> it"``), SPR paired with the baseline run of the same budget and seed."""
    from sodlib.studies.mechanism_checks import mechanism_checks, read_mechanisms

    by = {(r, n, s): read_mechanisms(f) for (r, n, s, _), f in zip(plan, folders) if f is not None}
    by = {k: m for k, m in by.items() if m is not None}
    frames = []
    for n in sorted({n for _, n, _, _ in plan}):
        loss = next(c.loss for r, b, _, c in plan if r == ROWS[1] and b == n)
        method = {s: m for (r, b, s), m in by.items() if r == ROWS[1] and b == n}
        baseline = {s: m for (r, b, s), m in by.items() if r == ROWS[0] and b == n}
        switches = {"spr": loss.spr, "sr": loss.sr, "st": loss.st}
        frames.append(mechanism_checks("budget_trend", [(f"{ROWS[1]} {n} it", switches, method)], baseline))
    return pd.concat(frames, ignore_index=True)


def trend_frame(metrics: Sequence[tuple[str, int, int, dict | None]]) -> pd.DataFrame:
    """One line per budget from ``(row, budget, seed, metrics or None)``: AP and APS of both rows (×100, mean
    over the seeds both trained), ``seeds``, ``dAP``, ``ci95_low``, ``ci95_high``, ``p``."""
    out = []
    for n in sorted({n for _, n, _, _ in metrics}):
        by, seeds = _paired(metrics, n)
        line = {"iterations": n, "seeds": len(seeds)}
        for row in ROWS:
            for k in ("AP", "APS"):
                line[f"{row} {k}"] = (
                    100 * float(np.mean([by[(row, n, s)][k] for s in seeds])) if seeds else math.nan
                )
        if seeds:
            d = paired_difference(
                [100 * by[(ROWS[1], n, s)]["AP"] for s in seeds],
                [100 * by[(ROWS[0], n, s)]["AP"] for s in seeds],
            )
            line.update({"dAP": d["diff"], "ci95_low": d["ci_low"], "ci95_high": d["ci_high"], "p": d["p"]})
        out.append(line)
    frame = pd.DataFrame(out)
    for col in ("dAP", "ci95_low", "ci95_high", "p"):
        if col not in frame:
            frame[col] = math.nan
    return frame


def _paired(metrics, n: int) -> tuple[dict, list[int]]:
    """The trained runs by ``(row, budget, seed)``, and the seeds both rows trained at budget ``n``."""
    by = {(row, b, s): m for row, b, s, m in metrics if m}
    return by, sorted(s for (row, b, s) in by if row == ROWS[0] and b == n and (ROWS[1], n, s) in by)


def _per_seed_gap(metrics, n: int) -> dict[int, float]:
    by, seeds = _paired(metrics, n)
    return {s: 100 * (by[(ROWS[1], n, s)]["AP"] - by[(ROWS[0], n, s)]["AP"]) for s in seeds}


def trend_verdict(frame: pd.DataFrame, metrics: Sequence[tuple[str, int, int, dict | None]]) -> str:
    """Plain words: dAP at each budget with its interval, and how it moves from the shortest budget to the
    longest trained one (paired over the seeds both budgets have)."""
    done = frame[frame["seeds"] > 0]
    if done.empty:
        return "Budget trend: no budget has both rows trained yet."
    parts = []
    for r in done.itertuples():
        ci = (
            f"[{r.ci95_low:+.2f}, {r.ci95_high:+.2f}]"
            if np.isfinite(r.ci95_low)
            else "(one seed: no interval)"
        )
        parts.append(f"{r.iterations} iterations: dAP {r.dAP:+.2f} {ci} over {r.seeds} seeds")
    text = f"Budget trend (ST+SR+SPR − baseline, AP points): {'; '.join(parts)}."
    first, last = int(done["iterations"].min()), int(done["iterations"].max())
    if first == last:
        return text + " Only one budget is trained: no trend yet."
    a, b = _per_seed_gap(metrics, first), _per_seed_gap(metrics, last)
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return (
            text
            + f" {first} and {last} iterations share {len(common)} seed(s): the trend has no interval yet."
        )
    move = paired_difference([b[s] for s in common], [a[s] for s in common])
    ci = f"[{move['ci_low']:+.2f}, {move['ci_high']:+.2f}]"
    if move["ci_low"] > 0:
        word = "moves toward ST+SR+SPR"
    elif move["ci_high"] < 0:
        word = "moves toward the baseline"
    else:
        word = "holds (the interval includes no change)"
    return text + (
        f" From {first} to {last} iterations dAP changes by {move['diff']:+.2f} {ci} over {len(common)} "
        f"paired seeds: the gap {word}."
    )


def write_trend(
    metrics: Sequence[tuple[str, int, int, dict | None]],
    tables_dir: str | Path,
    stem: str = "budget_trend",
    mechanisms: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, str]:
    """``tables_dir/<stem>.{csv,md}`` and the verdict beside it as ``<stem>_verdict.md``; with
    ``mechanisms`` (:func:`mechanism_table`) also ``<stem>_mechanisms.{csv,md}``, its verdict appended."""
    from sodlib.io import atomic_write_text
    from sodlib.studies.mechanism_checks import mechanism_verdict

    frame = trend_frame(metrics)
    verdict = trend_verdict(frame, metrics)
    if mechanisms is not None:
        write_table(mechanisms, Path(tables_dir) / f"{stem}_mechanisms", float_format="%.4f")
        verdict += " " + mechanism_verdict(mechanisms)
    write_table(frame, Path(tables_dir) / stem, float_format="%.3f")
    atomic_write_text(Path(tables_dir) / f"{stem}_verdict.md", f"# {stem}\n\n{verdict}\n")
    return frame, verdict

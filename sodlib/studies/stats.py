"""Paired statistics and verdicts of the ablation tables: per-seed differences, t-intervals, Holm's
correction.

Every row of an ablation table is trained on the same seeds (same initialisation and data order), so a
row is compared with its reference through the per-seed differences d_s = row_s − ref_s: their mean, a
Student-t interval and a two-sided one-sample t-test against 0. Holm's step-down procedure corrects the
p-values of all comparisons of one table together. :func:`resolvable_difference` is the half-width of
the 95% interval for a given spread of the differences: the smallest mean difference whose interval
excludes 0 (before the multiple-comparison correction). With ``m`` comparisons in a table, Holm's first step
tests at α/m: :func:`holm_resolvable_difference` is the smallest mean difference it rejects, and
:func:`detectable_difference` the true difference it finds with a given power (80% by default).

:func:`paired_comparison` applies them to a table's runs (each row against the row it is measured with),
:func:`paired_verdict` says the result in plain words with the smallest difference the table resolves, and
:func:`write_summaries` writes both under ``results/tables/``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sodlib.config import RunConfig
from sodlib.io import write_table
from sodlib.studies.tables import METRICS, Table, table_stem
from sodlib.training.runs import run_dir

__all__ = [
    "detectable_difference",
    "holm",
    "holm_resolvable_difference",
    "paired_comparison",
    "paired_difference",
    "paired_verdict",
    "pairs_frame",
    "resolution_line",
    "resolvable_difference",
    "seed_table",
    "write_summaries",
]


def paired_difference(
    row: Sequence[float], ref: Sequence[float], confidence: float = 0.95
) -> dict[str, float]:
    """Mean of ``row - ref`` (paired by position), its t-interval and two-sided p-value.

    Returns ``n``, ``diff``, ``sd`` (of the differences), ``ci_low``, ``ci_high``, ``p``. With one pair
    the spread is unknown: sd, the interval and p are NaN. Identical differences (sd 0) give a
    zero-width interval and p = 0 unless the difference is 0 (p = 1).
    """
    from scipy import stats

    d = np.asarray(row, dtype=float) - np.asarray(ref, dtype=float)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError(
            f"paired_difference needs two equal-length, non-empty sequences, got {len(row)} and {len(ref)}"
        )
    n, mean = len(d), float(d.mean())
    if n < 2:
        return {"n": n, "diff": mean, "sd": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p": math.nan}
    sd = float(d.std(ddof=1))
    half = resolvable_difference(sd, n, confidence)
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    return {"n": n, "diff": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half, "p": p}


def resolvable_difference(sd: float, n: int, confidence: float = 0.95) -> float:
    """Half-width t_{(1+confidence)/2, n-1} · sd / sqrt(n) of the paired interval (NaN for n < 2)."""
    from scipy import stats

    if n < 2 or not math.isfinite(sd):
        return math.nan
    return float(stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1), in the input order; NaN stays NaN and
    does not count as a comparison."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), math.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    running = 0.0
    for rank, i in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def holm_resolvable_difference(sd: float, n: int, m: int, alpha: float = 0.05) -> float:
    """The smallest |mean difference| that Holm's first step resolves among ``m`` comparisons: the half-width
    t_{1-α/(2m), n-1} · sd / sqrt(n) of the paired two-sided test at level α/m (NaN for n < 2)."""
    if m < 1:
        raise ValueError(f"need at least one comparison, got m={m}")
    return resolvable_difference(sd, n, 1 - alpha / m)


def detectable_difference(sd: float, n: int, m: int = 1, alpha: float = 0.05, power: float = 0.8) -> float:
    """The true mean difference that the paired two-sided t-test at Holm's first-step level α/m finds with
    probability ``power``, for ``n`` pairs whose differences have standard deviation ``sd`` (noncentral t;
    NaN for n < 2)."""
    from scipy import optimize, stats

    if n < 2 or not math.isfinite(sd):
        return math.nan
    if not 0 < power < 1:
        raise ValueError(f"power must lie in (0, 1), got {power}")
    if sd == 0:
        return 0.0
    df, level = n - 1, alpha / max(m, 1)
    crit = stats.t.ppf(1 - level / 2, df)

    def shortfall(effect: float) -> float:  # effect = difference / (sd / sqrt(n)), the noncentrality
        far_tail = stats.nct.cdf(-crit, df, effect)  # rejections of the wrong sign: ~0, NaN far out in scipy
        return stats.nct.sf(crit, df, effect) + (far_tail if math.isfinite(far_tail) else 0.0) - power

    high = crit + 1.0
    while shortfall(high) < 0:
        high *= 2
    effect = optimize.brentq(shortfall, 0.0, high)
    return float(effect * sd / math.sqrt(n))


# ---------------------------------------------------------------- paired comparisons of table rows


def paired_comparison(table: Table, runs: pd.DataFrame, metric: str = "AP") -> pd.DataFrame:
    """Every row's mean ± std (×100) beside the paper's numbers, and its paired comparison with the row it
    is measured against (:meth:`Table.base_of`): ``dAP`` (mean per-seed difference, points), ``ci95_low``,
    ``ci95_high`` (t-interval), ``p`` and ``p_holm`` (Holm over the table's comparisons), ``pairs``.

    Pairs are the seeds both rows ran on one kind of machine: where ``runs`` has a ``kind`` column (the
    machine that trained each run), a seed whose two runs were trained on different kinds is left out of the
    pair and counted in ``pairs_other_kind``, so a difference never mixes a method with a machine. A row with
    one pair gets NaN for the interval and p-values.
    """
    by_row = {label: g.set_index("seed") for label, g in runs.groupby("row", sort=False)}
    out = []
    for row in table.rows:
        g = by_row[row.label]
        r = {"row": row.label, "seeds": int(g[metric].notna().sum())}  # seeds trained
        for k in METRICS:
            values = 100 * g[k].dropna()
            r[k] = values.mean() if len(values) else np.nan
            r[f"{k} std"] = values.std() if len(values) > 1 else np.nan
        for k in METRICS:
            r[f"paper {k}"] = row.paper.get(k, np.nan)
        base = table.base_of(row.label)
        r["vs"] = base
        base_paper = next(x.paper for x in table.rows if x.label == base)
        r["dAP paper"] = row.paper.get("AP", np.nan) - base_paper.get("AP", np.nan)
        if "code" in g:
            r["code"] = " ".join(sorted({c for c in g["code"] if c}))
        both = sorted(
            s
            for s in set(g.index) & set(by_row[base].index)
            if np.isfinite(g.loc[s, metric]) and np.isfinite(by_row[base].loc[s, metric])
        )
        paired = [s for s in both if "kind" not in g or g.loc[s, "kind"] == by_row[base].loc[s, "kind"]]
        r["pairs_other_kind"] = len(both) - len(paired) if row.label != base else 0
        if row.label != base and paired:
            pd_ = paired_difference(
                100 * g.loc[paired, metric].to_numpy(), 100 * by_row[base].loc[paired, metric].to_numpy()
            )
            r.update(
                {
                    "pairs": pd_["n"],
                    "dAP": pd_["diff"],
                    "sd_diff": pd_["sd"],
                    "ci95_low": pd_["ci_low"],
                    "ci95_high": pd_["ci_high"],
                    "p": pd_["p"],
                }
            )
        out.append(r)
    df = pd.DataFrame(out)
    for col in ("pairs", "dAP", "sd_diff", "ci95_low", "ci95_high", "p"):
        if col not in df:
            df[col] = np.nan
    df["p_holm"] = holm(df["p"].tolist())
    return df


def resolution_line(summary: pd.DataFrame, alpha: float = 0.05, power: float = 0.8) -> str:
    """One line: the smallest |dAP| Holm's first step resolves over this table's comparisons, and the
    difference found with ``power``, from the pooled spread of its paired differences
    (and the uncorrected half-width)."""
    d = summary.dropna(subset=["sd_diff"])
    if d.empty:
        return "Resolution: no comparison has two paired seeds, so this table resolves no difference."
    n, m = int(d["pairs"].min()), len(d)
    sd = math.sqrt((d["sd_diff"] ** 2).mean())
    return (
        f"Resolution: with {n} paired seeds and a pooled per-seed sd of the differences "
        f"of {sd:.2f} AP points, "
        f"Holm's first step over {m} comparisons (level {alpha}/{m}) resolves |dAP| ≥ "
        f"{holm_resolvable_difference(sd, n, m, alpha):.2f} AP points, and a true difference of "
        f"{detectable_difference(sd, n, m, alpha, power):.2f} is found with {int(100 * power)}% power "
        f"(uncorrected {int(100 * (1 - alpha))}% half-width ±{resolvable_difference(sd, n, 1 - alpha):.2f})."
    )


def paired_verdict(table: Table, summary: pd.DataFrame, alpha: float = 0.05) -> str:
    """Plain words per comparison: our paired dAP with its interval, its sign against the paper's, and
    whether it is resolved (Holm-corrected p < ``alpha``)."""
    parts, agree, total, resolved = [], 0, 0, 0
    for r in summary.to_dict("records"):
        if r["row"] == r["vs"]:
            continue
        crossed = int(r.get("pairs_other_kind", 0) or 0)
        other = f"{crossed} seed(s) trained on another kind of machine than {r['vs']}'s"
        if not np.isfinite(r["dAP"]):
            parts.append(f"{r['row']}: no pair on one kind of machine ({other})" if crossed else
                         f"{r['row']}: not run")  # fmt: skip
            continue
        is_resolved = bool(np.isfinite(r["p_holm"]) and r["p_holm"] < alpha)
        resolved += is_resolved
        ci = (
            f"[{r['ci95_low']:+.2f}, {r['ci95_high']:+.2f}]"
            if np.isfinite(r["ci95_low"])
            else "[no interval: one seed]"
        )
        text = f"{r['row']} vs {r['vs']}: dAP {r['dAP']:+.2f} {ci}, p_holm {r['p_holm']:.3f}"
        if np.isfinite(r["dAP paper"]):
            same = np.sign(r["dAP"]) == np.sign(r["dAP paper"])
            agree += bool(same and is_resolved)
            total += 1
            text += f" (paper {r['dAP paper']:+.1f}: {'same' if same else 'opposite'} sign)"
        text += f"; {other} left out" if crossed else ""
        parts.append(text + ("; resolved" if is_resolved else "; not resolved"))
    head = (
        f"{table.title}: {resolved} of {len(parts)} comparisons are resolved (Holm-corrected p < {alpha}); "
        f"{agree} of {total} with a paper number agree with the paper in sign and are resolved. "
    )
    return head + "; ".join(parts) + ". " + resolution_line(summary)


def write_summaries(
    tables: Sequence[Table],
    runs: dict[str, pd.DataFrame],
    profile: str,
    tables_dir: str | os.PathLike,
    device: str = "",
) -> dict[str, tuple[pd.DataFrame, str]]:
    """Each table's paired summary (:func:`paired_comparison`) and plain-words verdict
    (:func:`paired_verdict`), keyed by title; written as ``tables_dir/<stem>.{csv,md}`` (columns that are
    empty everywhere left out) beside its runs as ``<stem>_runs`` (``stem`` from :func:`table_stem`)."""
    out = {}
    for table in tables:
        summary = paired_comparison(table, runs[table.name])
        stem = table_stem(table.name, profile, device)
        write_table(summary.dropna(axis=1, how="all"), Path(tables_dir) / stem, float_format="%.3f")
        write_table(runs[table.name], Path(tables_dir) / f"{stem}_runs")
        out[table.title] = summary, paired_verdict(table, summary)
    return out


def pairs_frame(
    runs: pd.DataFrame,
    pairs: Sequence[tuple[str, str]],
    key: str = "variant",
    metrics: Sequence[str] = ("AP", "AP50"),
    scale: float = 100.0,
) -> pd.DataFrame:
    """Paired differences between the runs of ``runs`` (one line per ``key`` value and ``seed``): for each
    ``(a, b)`` of ``pairs`` and metric, ``a − b`` over the seeds both have (×``scale``): ``pairs``, ``diff``,
    ``ci95_low``, ``ci95_high``, ``p`` (:func:`paired_difference`; NaN interval with one pair)."""
    by = {label: g.set_index("seed") for label, g in runs.groupby(key, sort=False)}
    out = []
    for a, b in pairs:
        seeds = sorted(set(by[a].index) & set(by[b].index)) if a in by and b in by else []
        for k in metrics:
            line = {key: a, "vs": b, "metric": k, "pairs": len(seeds)}
            if seeds:
                d = paired_difference(
                    scale * by[a].loc[seeds, k].to_numpy(), scale * by[b].loc[seeds, k].to_numpy()
                )
                line |= {"diff": d["diff"], "ci95_low": d["ci_low"], "ci95_high": d["ci_high"], "p": d["p"]}
            out.append(line)
    return pd.DataFrame(out, columns=[key, "vs", "metric", "pairs", "diff", "ci95_low", "ci95_high", "p"])


def seed_table(
    entries: Sequence[tuple[str, int, RunConfig]],
    metrics: Sequence[dict],
    results_dir: str | os.PathLike,
    columns: Sequence[str] = METRICS,
    folders: Sequence[str | os.PathLike] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``entries`` (label, seed, config) and their final ``metrics`` as two frames: one row per run
    (``model``, ``seed``, ``columns``, ``iterations``, ``train_seconds``, ``run`` folder name) and one per
    model (``seeds``, the mean of each column, ``AP std`` over seeds when there are two or more,
    ``iterations``, ``runs`` by their config hash, the ``kind`` of machine that trained them). ``folders``:
    where each run was read (e.g. from :func:`sodlib.studies.runner.on_one_kind`); in the per-run frame a
    folder outside ``results_dir/runs`` is named by its path under ``results_dir``
    (``machines/<kind>/runs/<run>``)."""
    from sodlib.studies.drift import run_kind
    from sodlib.studies.runner import run_name

    paths = [
        Path(f) if f is not None else run_dir(cfg, results_dir)
        for (_, _, cfg), f in zip(entries, folders or [None] * len(entries), strict=True)
    ]
    names = [run_name(f, results_dir) for f in paths]
    runs = pd.DataFrame(
        [
            {
                "model": label,
                "seed": seed,
                **{k: m[k] for k in columns},
                "iterations": m["iterations"],
                "train_seconds": m["train_seconds"],
                "run": name,
                "kind": run_kind(f),
            }
            for (label, seed, _), m, name, f in zip(entries, metrics, names, paths, strict=True)
        ]
    )
    by_model = runs.groupby("model", sort=False)
    table = by_model.agg(
        seeds=("seed", "count"),
        **{k: (k, "mean") for k in columns},
        iterations=("iterations", "first"),
        runs=("run", lambda r: ", ".join(Path(n).name for n in r)),
        kind=("kind", lambda k: "; ".join(dict.fromkeys(k))),
    )
    if table["seeds"].max() > 1:
        table.insert(2, "AP std", by_model["AP"].std())
    return runs, table.reset_index()

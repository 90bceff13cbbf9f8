"""Paired comparisons for ablation tables: per-seed differences, t-intervals, Holm's correction.

Every row of an ablation table is trained on the same seeds (same initialisation and data order), so a
row is compared with its reference through the per-seed differences d_s = row_s − ref_s: their mean, a
Student-t interval and a two-sided one-sample t-test against 0. Holm's step-down procedure corrects the
p-values of all comparisons of one table together. :func:`resolvable_difference` is the half-width of
the 95% interval for a given spread of the differences: the smallest mean difference whose interval
excludes 0 (before the multiple-comparison correction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["holm", "paired_difference", "resolvable_difference"]


def paired_difference(row: Sequence[float], ref: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean of ``row - ref`` (paired by position), its t-interval and two-sided p-value.

    Returns ``n``, ``diff``, ``sd`` (of the differences), ``ci_low``, ``ci_high``, ``p``. With one pair
    the spread is unknown: sd, the interval and p are NaN. Identical differences (sd 0) give a
    zero-width interval and p = 0 unless the difference is 0 (p = 1).
    """
    from scipy import stats

    d = np.asarray(row, dtype=float) - np.asarray(ref, dtype=float)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError(f"paired_difference needs two equal-length, non-empty sequences, got {len(row)} and {len(ref)}")
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

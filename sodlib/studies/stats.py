"""Paired comparisons for ablation tables: per-seed differences, t-intervals, Holm's correction.

Every row of an ablation table is trained on the same seeds (same initialisation and data order), so a
row is compared with its reference through the per-seed differences d_s = row_s − ref_s: their mean, a
Student-t interval and a two-sided one-sample t-test against 0. Holm's step-down procedure corrects the
p-values of all comparisons of one table together. :func:`resolvable_difference` is the half-width of
the 95% interval for a given spread of the differences: the smallest mean difference whose interval
excludes 0 (before the multiple-comparison correction). With ``m`` comparisons in a table, Holm's first step
tests at α/m: :func:`holm_resolvable_difference` is the smallest mean difference it rejects, and
:func:`detectable_difference` the true difference it finds with a given power (80% by default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "detectable_difference",
    "holm",
    "holm_resolvable_difference",
    "paired_difference",
    "resolvable_difference",
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

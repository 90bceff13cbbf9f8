"""Paired statistics of the ablation tables, against hand-computed values."""

import math

import pandas as pd
import pytest

from sodlib.studies import stats as A
from sodlib.studies.stats import (
    detectable_difference,
    holm,
    holm_resolvable_difference,
    paired_difference,
    resolvable_difference,
)
from sodlib.studies.tables import METRICS, Row, Table


def test_paired_difference_hand_computed():
    # d = (2, 3, 3): mean 8/3, sd sqrt(1/3), t = 8 with 2 dof; t_0.975,2 = 4.302653
    r = paired_difference([3, 4, 5], [1, 1, 2])
    assert r["n"] == 3
    assert r["diff"] == pytest.approx(8 / 3)
    assert r["sd"] == pytest.approx(math.sqrt(1 / 3))
    half = 4.302653 * math.sqrt(1 / 3) / math.sqrt(3)
    assert r["ci_low"] == pytest.approx(8 / 3 - half, abs=1e-5)
    assert r["ci_high"] == pytest.approx(8 / 3 + half, abs=1e-5)
    assert r["p"] == pytest.approx(0.015268, abs=1e-5)


def test_paired_difference_degenerate_cases():
    one = paired_difference([2.0], [1.0])
    assert one["diff"] == 1.0 and math.isnan(one["ci_low"]) and math.isnan(one["p"])
    same = paired_difference([2.0, 3.0], [1.0, 2.0])  # identical differences: sd 0
    assert same["ci_low"] == same["ci_high"] == 1.0 and same["p"] == 0.0
    assert paired_difference([1.0, 2.0], [1.0, 2.0])["p"] == 1.0
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference([], [])


def test_holm_order_and_monotonicity():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, 2*0.03, max(0.06, 1*0.04): back in input order
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = holm([float("nan"), 0.02, 0.5])  # NaN is not a comparison: m = 2
    assert math.isnan(out[0]) and out[1:] == pytest.approx([0.04, 0.5])
    assert holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_resolvable_difference_and_table_line():
    assert resolvable_difference(1.0, 5) == pytest.approx(2.776445 / math.sqrt(5), abs=1e-6)
    assert math.isnan(resolvable_difference(1.0, 1))
    summary = pd.DataFrame({"sd_diff": [1.0, 2.0, float("nan")], "pairs": [5, 5, 1]})
    line = A.resolution_line(summary)
    # pooled sd sqrt((1 + 4) / 2) = 1.5811; Holm's first step over 2: t_{1-0.05/4, 4} = 3.4954 -> 2.4716;
    # uncorrected t_0.975,4 = 2.776445 -> 1.9632
    assert "5 paired seeds" in line and "1.58" in line and "2 comparisons (level 0.05/2)" in line
    assert "resolves |dAP| ≥ 2.47 AP points" in line and "half-width ±1.96)" in line
    power = detectable_difference(math.sqrt(2.5), 5, 2)
    assert f"a true difference of {power:.2f} is found with 80% power" in line and power > 2.47


def _runs(values: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for label, aps in values.items():
        for seed, ap in enumerate(aps):
            rows.append({"row": label, "seed": seed, **{k: ap for k in METRICS}})
    return pd.DataFrame(rows)


def test_compare_pairs_rows_by_seed_and_corrects_over_the_table():
    table = Table(
        "t",
        "T",
        (Row("base", (), {"AP": 30.0}), Row("a", (), {"AP": 31.0}), Row("b", (), {"AP": 29.0})),
        seeds=3,
    )
    runs = _runs({"base": [0.10, 0.10, 0.20], "a": [0.12, 0.13, 0.23], "b": [0.10, 0.11, 0.19]})
    s = A.paired_comparison(table, runs).set_index("row")
    assert s.loc["a", "dAP"] == pytest.approx(8 / 3)  # per-seed differences (2, 3, 3) points
    assert s.loc["a", "p"] == pytest.approx(0.015268, abs=1e-5)
    assert s.loc["b", "dAP"] == pytest.approx(0.0, abs=1e-9)
    assert s.loc["a", "p_holm"] == pytest.approx(min(1.0, 2 * s.loc["a", "p"]))
    assert s.loc["a", "dAP paper"] == 1.0 and s.loc["a", "pairs"] == 3
    assert math.isnan(s.loc["base", "dAP"]) and s.loc["base", "AP"] == pytest.approx(40 / 3)
    text = A.paired_verdict(table, s.reset_index())
    assert "a vs base: dAP +2.67" in text and "same sign" in text and "Resolution:" in text


def test_write_summaries_writes_each_table_and_its_runs(tmp_path):
    table = Table("table9", "T9", (Row("base", (), {"AP": 30.0}), Row("a", (), {"AP": 31.0})), seeds=3)
    runs = _runs({"base": [0.10, 0.10, 0.20], "a": [0.12, 0.13, 0.23]})
    out = A.write_summaries([table], {"table9": runs}, "ablation", tmp_path)
    summary, verdict = out["T9"]
    assert summary.set_index("row").loc["a", "dAP"] == pytest.approx(2.6667, abs=1e-4)
    assert verdict.startswith("T9: 1 of 1 comparisons")
    written = pd.read_csv(tmp_path / "table9.csv")
    assert list(written["row"]) == ["base", "a"] and written["dAP"].iloc[1] == pytest.approx(2.667, abs=1e-3)
    assert len(pd.read_csv(tmp_path / "table9_runs.csv")) == 6 and (tmp_path / "table9.md").is_file()
    A.write_summaries([table], {"table9": runs}, "smoke", tmp_path, device="cuda:1")  # the GPU set beside it
    assert (tmp_path / "table9_smoke_cuda.csv").is_file()


def test_holm_first_step_resolves_the_half_width_at_alpha_over_m():
    # t_{1-0.05/(2*5), 2} = t_{0.995, 2} = 9.9248 (tables): 9.9248 * 1 / sqrt(3) = 5.7301
    assert holm_resolvable_difference(1.0, 3, 5) == pytest.approx(5.7301, abs=1e-3)
    assert holm_resolvable_difference(1.0, 3, 1) == pytest.approx(
        resolvable_difference(1.0, 3)
    )  # m = 1: plain
    assert math.isnan(holm_resolvable_difference(1.0, 1, 5))
    with pytest.raises(ValueError, match="m=0"):
        holm_resolvable_difference(1.0, 3, 0)


def test_detectable_difference_has_the_asked_power():
    from scipy import stats

    d = detectable_difference(1.0, 3, 5)
    crit, nc = stats.t.ppf(0.995, 2), d * math.sqrt(3)
    assert stats.nct.sf(crit, 2, nc) + stats.nct.cdf(-crit, 2, nc) == pytest.approx(0.8, abs=1e-6)
    assert d > holm_resolvable_difference(1.0, 3, 5)  # 80% power needs more than the critical value
    # many pairs: the normal approximation (z_{0.975} + z_{0.8}) sd / sqrt(n) = 2.8016 / sqrt(200) = 0.1981
    assert detectable_difference(1.0, 200) == pytest.approx(0.1981, abs=2e-3)
    assert detectable_difference(2.0, 5, 5) == pytest.approx(
        2 * detectable_difference(1.0, 5, 5)
    )  # scales with sd
    assert math.isnan(detectable_difference(1.0, 1)) and detectable_difference(0.0, 3) == 0.0


def test_pairs_frame_pairs_by_seed_with_hand_computed_intervals():

    runs = pd.DataFrame(
        {
            "variant": ["base", "base", "base", "a", "a", "b"],
            "seed": [0, 1, 2, 0, 1, 0],
            "AP": [0.40, 0.42, 0.41, 0.41, 0.44, 0.39],
        }
    )
    frame = A.pairs_frame(runs, [("a", "base"), ("b", "base"), ("a", "nothing")], metrics=("AP",))
    a, b, none = frame.to_dict("records")
    # a − base over seeds 0, 1: 1 and 2 points; mean 1.5, sd √0.5, t(1) 12.706 · √0.5 / √2 = 6.353
    assert (a["pairs"], a["diff"]) == (2, pytest.approx(1.5))
    assert a["ci95_low"] == pytest.approx(1.5 - 12.7062 * math.sqrt(0.5) / math.sqrt(2), abs=1e-3)
    assert (b["pairs"], b["diff"]) == (1, pytest.approx(-1.0)) and math.isnan(b["ci95_low"])
    assert none["pairs"] == 0 and math.isnan(none["diff"])

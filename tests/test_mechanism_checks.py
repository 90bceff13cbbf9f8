"""Paper A's mechanisms judged per row, with intervals: SPR against the paired baseline, SR's sign, ST's
gap."""

import json
import math

import pandas as pd
import pytest

from sodlib.studies import runner, tables
from sodlib.studies.mechanism_checks import mechanism_checks, mechanism_verdict, mechanisms_long, table_checks
from sodlib.training.runs import run_dir


def _m(outside_last=0.2, spearman=None, gap=0.0):
    m = {
        "spr_outside_share_l0": 0.01,
        "spr_outside_share_l1": 0.05,
        "spr_outside_share_l2": outside_last,
        "st_gap_eS": gap,
        "st_gap_rS": gap,
        "st_gap_gS": gap,
        "st_gap_N": gap,
        "spr_loss_share": 0.0,
    }
    if spearman is not None:
        m["sr_difficulty_spearman"] = spearman
    return m


def test_each_mechanism_is_judged_by_what_it_changes():
    baseline = {0: _m(0.20), 1: _m(0.18), 2: _m(0.22)}
    rows = [
        ("SPR", {"spr": True}, {0: _m(0.02), 1: _m(0.03), 2: _m(0.01)}),
        ("SR", {"sr": True}, {0: _m(spearman=0.5), 1: _m(spearman=0.6), 2: _m(spearman=0.55)}),
        ("ST (no gap)", {"st": True}, {0: _m(gap=0.0), 1: _m(gap=0.0)}),
        ("SR one seed", {"sr": True}, {0: _m(spearman=0.4)}),
        ("plain", {}, {0: _m()}),
    ]
    checks = mechanism_checks("t", rows, baseline)
    assert list(checks["row"]) == ["SPR", "SR", "ST (no gap)", "SR one seed"]
    spr = checks.iloc[0]
    # differences -0.18, -0.15, -0.21: mean -0.18, sd 0.03, t_{0.975,2} 4.3027 * 0.03 / sqrt(3) = 0.0745
    assert spr["mean"] == pytest.approx(-0.18) and spr["ci95_high"] == pytest.approx(-0.18 + 0.0745, abs=1e-4)
    assert spr["acts"] == "yes" and spr["seeds"] == 3
    assert checks.iloc[1]["acts"] == "yes" and checks.iloc[1]["mean"] == pytest.approx(0.55)
    assert checks.iloc[2]["acts"] == "no"  # the target never left the IoU
    assert checks.iloc[3]["acts"] == "one seed" and math.isnan(checks.iloc[3]["ci95_low"])
    text = mechanism_verdict(checks)
    assert "SPR on SPR: last-layer outside share - baseline's -0.180 [-0.255, -0.105], acts" in text
    assert "ST on ST (no gap): mean st_gap over size buckets +0.000 [+0.000, +0.000], did NOT act" in text
    assert "SR on SR one seed: sr_difficulty_spearman +0.400 (one seed), not judged" in text
    assert mechanism_verdict(checks.iloc[:0]).startswith("Mechanisms: no row")
    waiting = mechanism_checks("t", [("new", {"spr": True, "sr": True}, {})], baseline)
    assert mechanism_verdict(waiting) == "Mechanisms: not run yet: new."


def test_a_table_reads_its_runs_and_pairs_spr_with_the_baseline(tmp_path):
    table = tables.ABLATION_TABLES[0]  # Table 3 on the ablation profile
    entries = [e for e in table.configs("ablation") if e[1] < 2]
    for row, seed, cfg in entries:
        folder = run_dir(cfg, tmp_path)
        folder.mkdir(parents=True)
        outside = 0.2 if not cfg.loss.spr else 0.02 + 0.01 * seed
        (folder / "mechanisms.json").write_text(
            json.dumps(
                _m(
                    outside,
                    0.5 + 0.1 * seed if cfg.loss.sr else None,
                    0.05 * (seed + 1) if cfg.loss.st else 0.0,
                )
            )
        )
    runs = runner.runs_frame(table, entries, [{"AP": 0.4}] * len(entries), tmp_path)
    checks = table_checks(table, runs, "ablation", tmp_path).set_index(["row", "mechanism"])
    assert (
        checks.loc[("SPR", "SPR"), "mean"] == pytest.approx(-0.175)
        and checks.loc[("SPR", "SPR"), "seeds"] == 2
    )
    assert checks.loc[("ST+SR+SPR", "ST"), "mean"] == pytest.approx(0.075)
    assert ("baseline", "SPR") not in checks.index and ("SR", "SPR") not in checks.index
    long = mechanisms_long([table], {"table3": runs}, tmp_path)
    assert len(long) == len(entries) * 8 + 4 * 2  # 8 metrics each, and SR's Spearman on 4 SR rows x 2 seeds
    assert set(long.columns) == {"table", "metric", "row", "seed", "value"}
    assert isinstance(long, pd.DataFrame) and set(long["table"]) == {"table3"}


def test_spr_pairs_with_the_baseline_on_its_seeds_kind(tmp_path, put_run):
    from sodlib.hardware import machine_slug
    from sodlib.training.runs import read_metrics

    table = tables.ABLATION_TABLES[0]
    entries = [e for e in table.configs("ablation") if e[1] < 2 and e[0].label in ("baseline", "SPR")]
    for row, seed, cfg in entries:  # seed 0 trained on "old"; seed 1 on "new", but its baseline on "old"
        folder = run_dir(cfg, tmp_path)
        put_run(folder, cfg, "new" if seed == 1 and cfg.loss.spr else "old", 0.4)
        (folder / "mechanisms.json").write_text(json.dumps(_m(0.2 if not cfg.loss.spr else 0.02, None, 0.0)))
    base1 = next(cfg for row, seed, cfg in entries if seed == 1 and not cfg.loss.spr)
    copy = tmp_path / "machines" / machine_slug("new") / "runs" / run_dir(base1).name
    put_run(copy, base1, "new", 0.41)  # the seed-1 baseline retrained whole on "new"
    (copy / "mechanisms.json").write_text(json.dumps(_m(0.3, None, 0.0)))
    metrics = [read_metrics(run_dir(cfg, tmp_path)) for *_, cfg in entries]
    runs = runner.runs_frame(table, entries, metrics, tmp_path)
    assert runs.set_index(["row", "seed"])["kind"].to_dict() == {
        ("baseline", 0): "old", ("SPR", 0): "old", ("baseline", 1): "new", ("SPR", 1): "new"
    }  # fmt: skip
    checks = table_checks(table, runs, "ablation", tmp_path).set_index(["row", "mechanism"])
    assert checks.loc[("SPR", "SPR"), "mean"] == pytest.approx(((0.02 - 0.2) + (0.02 - 0.3)) / 2)

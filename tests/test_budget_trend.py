"""The budget trend: Table 3's main comparison at several budgets, paired seeds, and whether the gap moves."""

import math

import pytest

from sodlib.studies import budget_trend as bt
from sodlib.studies import tables
from sodlib.studies.experiments import PLATEAU_ITERS
from sodlib.training.runs import config_hash


def _m(ap, aps=None):
    return {"AP": ap, "APS": ap - 0.1 if aps is None else aps}


def test_runs_are_table3s_and_the_plateau_ladders():
    plan = {(r, n, s): c for r, n, s, c in bt.trend_configs()}
    assert len(plan) == 2 * 3 * 3 and all(c.train.max_iters == n for (_, n, _), c in plan.items())
    table3 = {(row.label, s): c for row, s, c in tables.ABLATION_TABLES[0].configs("ablation")}
    assert config_hash(plan[("ST+SR+SPR", 1000, 2)]) == config_hash(table3[("ST+SR+SPR", 2)])
    assert config_hash(plan[("baseline", 1000, 0)]) == config_hash(table3[("baseline", 0)])
    ladder = tables.ablation_config("ablation", f"train.max_iters={PLATEAU_ITERS[1]}", seed=1)
    assert config_hash(plan[("baseline", PLATEAU_ITERS[1], 1)]) == config_hash(ladder)


def test_frame_and_verdict_from_hand_made_metrics():
    base = {1000: [0.40, 0.42, 0.41], 4000: [0.50, 0.52, 0.51]}
    full = {1000: [0.41, 0.44, 0.42], 4000: [0.55, 0.58, 0.57]}  # gaps 1, 2, 1 then 5, 6, 6
    metrics = [
        (row, n, s, _m(v[n][s]))
        for row, v in (("baseline", base), ("ST+SR+SPR", full))
        for n in (1000, 4000)
        for s in range(3)
    ]
    metrics.append(("ST+SR+SPR", 2000, 0, None))  # a budget not trained yet
    frame = bt.trend_frame(metrics).set_index("iterations")
    assert frame.loc[1000, "dAP"] == pytest.approx(4 / 3) and frame.loc[4000, "dAP"] == pytest.approx(17 / 3)
    assert frame.loc[1000, "baseline AP"] == pytest.approx(41.0) and frame.loc[
        4000, "ST+SR+SPR APS"
    ] == pytest.approx(46.667, abs=1e-3)
    # gaps 1, 2, 1: sd 0.57735, t_{0.975,2} 4.3027 -> half-width 1.4342
    assert frame.loc[1000, "ci95_high"] == pytest.approx(4 / 3 + 1.4342, abs=1e-3)
    assert frame.loc[2000, "seeds"] == 0 and math.isnan(frame.loc[2000, "dAP"])
    text = bt.trend_verdict(frame.reset_index(), metrics)
    # per-seed change 4, 4, 5: mean 4.33, sd 0.57735 -> [2.90, 5.77]
    assert "From 1000 to 4000 iterations dAP changes by +4.33 [+2.90, +5.77] over 3 paired seeds" in text
    assert text.endswith("the gap moves toward ST+SR+SPR.")
    assert "1000 iterations: dAP +1.33 [-0.10, +2.77] over 3 seeds" in text


def test_verdict_without_enough_runs():
    assert bt.trend_verdict(bt.trend_frame([("baseline", 1000, 0, None)]), []) == (
        "Budget trend: no budget has both rows trained yet."
    )
    one = [("baseline", 1000, 0, _m(0.4)), ("ST+SR+SPR", 1000, 0, _m(0.41))]
    assert bt.trend_verdict(bt.trend_frame(one), one).endswith("Only one budget is trained: no trend yet.")
    same = [
        (r, n, s, _m(0.4 + 0.01 * s + (0.02 if r != "baseline" else 0) + (0.02 * s if n == 2000 else 0)))
        for r in ("baseline", "ST+SR+SPR")
        for n in (1000, 2000)
        for s in range(3)
    ]
    assert "the gap holds" in bt.trend_verdict(bt.trend_frame(same), same)


def test_reproduce_step_writes_the_table_at_the_smoke_profile(tmp_path):
    from sodlib.studies.reproduce import step_budget_trend

    frame = step_budget_trend("smoke", tmp_path)
    assert list(frame["seeds"]) == [2, 2] and frame["dAP"].notna().all()
    assert (tmp_path / "tables" / "budget_trend_smoke.csv").is_file()
    assert (
        (tmp_path / "tables" / "budget_trend_smoke_verdict.md").read_text().startswith("# budget_trend_smoke")
    )


def test_each_baseline_is_read_on_the_kind_of_its_paired_method_run(tmp_path, put_run):

    from sodlib.hardware import machine_slug
    from sodlib.training.runs import read_metrics, run_dir

    plan = bt.trend_configs("smoke", (8,), 1)  # (baseline, 8, 0), (ST+SR+SPR, 8, 0)

    put = put_run

    (_, _, _, base), (_, _, _, full) = plan
    put(run_dir(base, tmp_path), base, "old", 0.30)
    put(run_dir(full, tmp_path), full, "new", 0.33)
    metrics = [read_metrics(run_dir(c, tmp_path)) for *_, c in plan]
    assert [m["AP"] for m in bt.on_the_methods_kind(plan, metrics, tmp_path)] == [0.30, 0.33]  # no retrain
    put(
        tmp_path / "machines" / machine_slug("new") / "runs" / run_dir(base, tmp_path).name, base, "new", 0.31
    )
    assert [m["AP"] for m in bt.on_the_methods_kind(plan, metrics, tmp_path)] == [0.31, 0.33]


def test_mechanisms_of_the_trend_runs_per_budget_paired_with_the_baseline_of_the_same_seed(tmp_path):
    import json

    from sodlib.training.runs import run_dir, write_run

    plan = bt.trend_configs("smoke", (8, 16), 2)
    outside = {("baseline", 0): 0.20, ("baseline", 1): 0.20, ("ST+SR+SPR", 0): 0.02, ("ST+SR+SPR", 1): 0.03}
    for r, n, s, cfg in plan:
        if n == 16 and r == "ST+SR+SPR":
            continue  # not trained: its budget reads "not run"
        folder = run_dir(cfg, tmp_path)
        write_run(folder, cfg, {"AP": 0.3, "APS": 0.2, "iterations": n})
        m = {
            "spr_outside_share_l0": 0.5,
            "spr_outside_share_l2": outside[(r, s)],
            "sr_difficulty_spearman": 0.4 + s / 10,
        }
        (folder / "mechanisms.json").write_text(json.dumps(m | {"st_gap_eS": 0.02 + s / 100}))
    folders = bt.trend_folders(plan, tmp_path)
    assert [f is None for f in folders] == [False, False, False, False, False, True, False, True]
    lines = bt.mechanism_lines(plan, folders)
    assert len(lines) == 6 * 4 and set(lines["table"]) == {"budget_trend"}
    assert set(lines["row"]) == {"baseline 8 it", "ST+SR+SPR 8 it", "baseline 16 it"}
    checks = bt.mechanism_table(plan, folders).set_index(["row", "mechanism"])
    spr = checks.loc[("ST+SR+SPR 8 it", "SPR")]
    assert spr["mean"] == pytest.approx(((0.02 - 0.20) + (0.03 - 0.20)) / 2) and spr["acts"] == "yes"
    assert checks.loc[("ST+SR+SPR 8 it", "SR"), "mean"] == pytest.approx(0.45)
    assert checks.loc[("ST+SR+SPR 8 it", "ST"), "mean"] == pytest.approx(0.025)
    assert set(checks.loc["ST+SR+SPR 16 it", "acts"]) == {"not run"}
    _, verdict = bt.write_trend(
        [(r, n, s, {"AP": 0.3, "APS": 0.2}) for r, n, s, _ in plan],
        tmp_path,
        "t",
        bt.mechanism_table(plan, folders),
    )
    assert "SPR on ST+SR+SPR 8 it: last-layer outside share - baseline's -0.175" in verdict
    assert (tmp_path / "t_mechanisms.csv").is_file()

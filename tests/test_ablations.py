"""Ablation tables: row specifications, the η mapping, the parallel runner over the run cache, noise and verdicts."""

import math

import numpy as np
import pandas as pd
import pytest

from sodlib.config import get_profile
from sodlib.studies import ablations
from sodlib.studies.ablations import Row, Table
from sodlib.training.runs import config_hash


def test_eta_schedule_maps_six_layers_onto_the_decoder():
    best = (1.5, 1.3, 1.2, 1.1, 1.05, 1.0)
    assert ablations.eta_schedule(best, 6) == best
    assert ablations.eta_schedule(best, 3) == (1.5, 1.2, 1.0)  # layers 0, 2, 5
    assert ablations.eta_schedule((2.0, 1.8, 1.6, 1.4, 1.2, 1.0), 3) == (2.0, 1.6, 1.0)
    assert ablations.eta_schedule(best, 2) == (1.5, 1.0)  # layers 0 and 5: the cpu profile's default
    assert ablations.eta_schedule(best, 1) == (1.0,)
    with pytest.raises(ValueError, match="6 values"):
        ablations.eta_schedule((1.5, 1.0), 3)
    assert get_profile("cpu").loss.eta_per_layer == ablations.eta_schedule(best, 2)


def test_ablation_config_applies_the_schedule_then_the_row():
    cfg = ablations.ablation_config("cpu", "loss.st=true", seed=2)
    assert (cfg.train.max_iters, cfg.train.threads, cfg.train.eval_every, cfg.train.seed) == (120, 1, 0, 2)
    assert cfg.loss.st and cfg.model == get_profile("cpu").model
    gpu = ablations.ablation_config("cpu", device="cuda")
    assert gpu.train.device == "cuda" and gpu.train.threads == get_profile("cpu").train.threads
    assert ablations.ablation_config("paper").train == get_profile("paper").train


def test_paper_a_tables_share_the_full_method_run():
    entries = {t.name: t.configs("cpu") for t in ablations.PAPER_A_TABLES}
    assert len(entries["table3"]) == 6 * 3 and {s for _, s, _ in entries["table3"]} == {0, 1, 2}
    assert all(len(entries[n]) == len(t.rows) for t in ablations.PAPER_A_TABLES[1:] for n in [t.name])
    full = config_hash(ablations.ablation_config("cpu", *ablations.FULL))
    shared = {name: [r.label for r, s, c in e if config_hash(c) == full] for name, e in entries.items()}
    # the cpu decoder has 2 layers: Table 7's schedules keep their first and last η, so (1.5, 1.4, …, 1) and
    # the paper's (1.5, 1.3, …, 1) become the same run, as do the two schedules starting at 2
    assert shared == {
        "table3": ["ST+SR+SPR"],
        "table4": ["β=0.73"],
        "table5": ["θ=6"],
        "table6": ["γ=1.5, α=0.5"],
        "table7": ["η=(1.5, 1.4, 1.3, 1.2, 1.1, 1)", "η=(1.5, 1.3, 1.2, 1.1, 1.05, 1)"],
        "table8": [],
    }
    hashes = {config_hash(c) for e in entries.values() for _, _, c in e}
    assert len(hashes) == 18 + 3 + 3 + 5 + 1 + 6
    t8 = {r.label: c for r, _, c in entries["table8"]}
    assert (
        t8["TAL +ST+SR"].loss.cls_loss == "tal" and t8["TAL +ST+SR"].loss.sr and not t8["TAL +ST+SR"].loss.spr
    )
    assert (t8["QFL +ST"].loss.alpha, t8["QFL +ST"].loss.gamma) == (0.75, 2.0)
    t3 = {r.label: c for r, s, c in entries["table3"] if s == 0}
    assert (t3["ST+SR"].loss.alpha, t3["SR"].loss.alpha) == (0.5, 0.75)


def test_multi_seed_tables_never_drop_below_two_seeds():
    assert {s for _, s, _ in ablations.TABLE3.configs("smoke", seeds=1)} == {0, 1}
    assert {s for _, s, _ in ablations.TABLE3.configs("smoke", seeds=5)} == set(range(5))
    assert {s for _, s, _ in ablations.TABLE4.configs("smoke", seeds=5)} == {0}


def test_table_base_rows():
    assert ablations.TABLE3.base_of("SPR") == "baseline"
    assert ablations.TABLE4.base_of("β=0.3") == "β=0.73"
    assert [ablations.TABLE8.base_of(r.label) for r in ablations.TABLE8.rows] == ["QFL (GFL)"] * 3 + [
        "TAL (TOOD)"
    ] * 3


def test_seed_std_pools_rows_by_hand():
    runs = pd.DataFrame({"row": ["a", "a", "a", "b", "b"], "AP": [0.1, 0.2, 0.3, 0.2, 0.4]})
    # squared deviations: a 0.01+0+0.01, b 0.01+0.01; dof 2 + 1
    assert ablations.seed_std(runs) == pytest.approx(math.sqrt(0.04 / 3))
    assert math.isnan(ablations.seed_std(pd.DataFrame({"row": ["a"], "AP": [0.1]})))


def _toy_table(trend="each"):
    return Table(
        "toy",
        "Toy",
        (Row("ref", (), {"AP": 30.0}), Row("up", (), {"AP": 31.0}), Row("down", (), {"AP": 29.0})),
        trend=trend,
    )


def _toy_runs(values: dict[str, list[float]]) -> pd.DataFrame:
    rows = [
        {"row": k, "seed": s, "AP": v, "AP50": v, "APS": v, "APM": v, "APL": np.nan}
        for k, vs in values.items()
        for s, v in enumerate(vs)
    ]
    return pd.DataFrame(rows)


def test_summarise_deltas_and_noise_by_hand():
    runs = _toy_runs({"ref": [0.20, 0.22], "up": [0.25, 0.27], "down": [0.20, 0.21]})
    s = ablations.summarise(_toy_table(), runs, noise=0.01).set_index("row")
    assert s.loc["up", "AP"] == pytest.approx(26.0) and s.loc["up", "AP std"] == pytest.approx(
        100 * math.sqrt(2e-4)
    )
    assert s.loc["up", "ΔAP ours"] == pytest.approx(5.0) and s.loc["up", "ΔAP paper"] == pytest.approx(1.0)
    # margin = 2 * 1 point * sqrt(1/2 + 1/2) = 2 points
    assert s.loc["up", "beyond noise"] == "yes" and s.loc["down", "beyond noise"] == "no"
    assert s.loc["up", "2 SE"] == pytest.approx(2.0) and math.isnan(s.loc["ref", "2 SE"])
    assert s.loc["ref", "beyond noise"] == "" and "APL" not in s.columns  # all-NaN columns dropped
    text = ablations.verdict(_toy_table(), s.reset_index(), 0.01)
    assert "agrees with the paper's on 2 of 2 comparisons; 1 of 2 differences exceed the noise" in text
    assert "up: ΔAP +5.00 vs ref (paper +1.0), same sign, beyond noise" in text
    assert "down: ΔAP -0.50 vs ref (paper -1.0), same sign, within noise" in text


def test_verdict_best_names_the_best_rows():
    runs = _toy_runs({"ref": [0.20], "up": [0.19], "down": [0.30]})
    table = _toy_table("best")
    s = ablations.summarise(table, runs, noise=0.01)
    text = ablations.verdict(table, s, 0.01)
    assert "our best row is down (paper: up), which differs from the paper" in text
    assert "some differences from ref exceed the noise" in text


def test_train_configs_trains_each_distinct_config_once_and_parallel_equals_sequential(tmp_path):
    a = ablations.ablation_config("smoke", "train.max_iters=3")
    b = ablations.ablation_config("smoke", "train.max_iters=3", seed=1)
    seq = ablations.train_configs([a, b, a], tmp_path / "seq", workers=1, verbose=False)
    assert seq[0] == seq[2] and len(list((tmp_path / "seq" / "runs").iterdir())) == 2
    par = ablations.train_configs([a, b], tmp_path / "par", workers=2, verbose=False)
    for s, p in zip(seq[:2], par):
        assert {k: s[k] for k in ablations.METRICS} == {k: p[k] for k in ablations.METRICS}
    again = ablations.train_configs([b], tmp_path / "par", workers=2, verbose=False)  # cached: no training
    assert again == [par[1]]


def test_train_configs_names_the_failing_run(tmp_path):
    bad = ablations.ablation_config("smoke", "train.batch_size=64", "train.max_iters=2")  # 16 train images
    with pytest.raises(
        RuntimeError, match=r"run .*runs/[0-9a-f]{12} \(the bad one\) failed: ValueError: .*fewer"
    ):
        ablations.train_configs([bad], tmp_path, workers=1, labels=["the bad one"], verbose=False)


def test_verdict_best_says_when_rows_are_tied():
    runs = _toy_runs({"ref": [0.2], "up": [0.2], "down": [0.2]})
    table = _toy_table("best")
    text = ablations.verdict(table, ablations.summarise(table, runs, noise=0.01), 0.01)
    assert "all our rows have the same AP (20.00)" in text and "nan" not in text


def test_default_workers():
    cpu = ablations.ablation_config("cpu")
    assert ablations.default_workers([cpu]) == max(1, (__import__("os").cpu_count() or 1) // 1)
    assert ablations.default_workers([ablations.ablation_config("smoke")]) == 1  # 8 iterations: in-process
    assert ablations.default_workers([ablations.ablation_config("cpu", device="cuda")]) == 1


def test_a_bad_row_fails_before_training_naming_table_row_and_key():
    table = Table("tbad", "T", (Row("fine", ()), Row("typo", ("loss.stt=true",))), seeds=2)
    with pytest.raises(ValueError, match=r"tbad, row 'typo': unknown config key 'loss.stt'"):
        table.configs("smoke")
    table = Table("tbad", "T", (Row("range", ("loss.beta=2",)),), seeds=2)
    with pytest.raises(ValueError, match=r"tbad, row 'range': loss.beta must be <= 1.0"):
        ablations.run_tables([table], "smoke", "/nonexistent")  # raised before any run folder is touched


def test_a_corrupt_metrics_json_is_reported_and_retrained(tmp_path, caplog):
    cfg = ablations.ablation_config("smoke", "train.max_iters=2")
    (first,) = ablations.train_configs([cfg], tmp_path, workers=1, verbose=False)
    path = ablations.run_dir(cfg, tmp_path) / "metrics.json"
    path.write_text('{"AP": 0.1')  # truncated
    with caplog.at_level("WARNING"):
        (again,) = ablations.train_configs([cfg], tmp_path, workers=1, verbose=False)
    assert str(path) in caplog.text and "corrupt" in caplog.text
    assert (path.parent / "metrics.json.corrupt").read_text() == '{"AP": 0.1'  # kept, not deleted
    assert {k: again[k] for k in ablations.METRICS} == {k: first[k] for k in ablations.METRICS}  # retrained


def test_table_stems_keep_gpu_sets_beside_cpu_tables():
    assert ablations.table_stem("table3", "ablation") == "table3"
    assert ablations.table_stem("table3", "cpu", "cpu") == "table3"
    assert ablations.table_stem("table3", "smoke") == "table3_smoke"
    assert ablations.table_stem("table3", "ablation", "cuda:1") == "table3_cuda"
    assert ablations.table_stem("", "ablation", "cuda") == "_cuda"


def test_mrqm_tables_share_runs_with_the_plateau_ladder_and_each_other():
    from sodlib.studies.reproduce import PLATEAU_ITERS

    t3, t4, t5 = ablations.mrqm_tables(ablations.MRQM_ITERS, table3_seeds=3, other_seeds=2)
    assert ablations.MRQM_ITERS in PLATEAU_ITERS
    c3 = {(r.label, s): c for r, s, c in t3.configs("ablation")}
    assert len(c3) == 9 * 3 and all(c.train.max_iters == ablations.MRQM_ITERS for c in c3.values())
    ladder = ablations.ablation_config("ablation", f"train.max_iters={ablations.MRQM_ITERS}", seed=1)
    assert config_hash(c3[("baseline", 1)]) == config_hash(ladder)  # the plateau ladder's run, reused
    iah = c3[("+IAH", 0)]
    assert iah.model.iah and iah.loss.weight_iah == 0.25 and iah.model.iah_reading == "norm_px2"
    assert c3[("+IAH, fixed T_b (k=0, ours)", 0)].model.iah_k == 0
    assert c3[("+IAH, unbalanced weights (ours)", 0)].loss.weight_iah == 1.0
    mrqm = c3[("+BiFPN/SAE +IAH (MRQM)", 0)]
    assert mrqm.model.encoder == "bifpn_sae" and mrqm.model.num_levels == 4 and mrqm.model.iah
    c4 = {(r.label, s): c for r, s, c in t4.configs("ablation")}
    assert len(c4) == 4 * 2 and config_hash(c4[("T_b=0.55", 1)]) == config_hash(c3[("+IAH", 1)])
    c5 = {(r.label, s): c for r, s, c in t5.configs("ablation")}
    assert config_hash(c5[("p=0.2", 0)]) == config_hash(iah) and c5[("p=0.3", 1)].model.iah_p == 0.3
    smoke = ablations.mrqm_tables(None)[0].configs("smoke")
    assert all(c.train.max_iters == get_profile("smoke").train.max_iters for _, _, c in smoke)


def test_select_tables_names_an_unknown_table_or_row():
    t = ablations.ABLATION_TABLES
    assert [x.name for x in ablations.select_tables(t)] == [x.name for x in t]
    chosen = ablations.select_tables(t, "table3,table8", "SR|QFL +ST")
    assert [(x.name, [r.label for r in x.rows]) for x in chosen] == [
        ("table3", ["SR"]),
        ("table8", ["QFL +ST"]),
    ]
    with pytest.raises(ValueError, match=r"unknown table 'table9'; tables: table3, table4"):
        ablations.select_tables(t, "table3,table9")
    with pytest.raises(ValueError, match=r"unknown row 'SPR' in table8; rows: QFL \(GFL\)"):
        ablations.select_tables(t, "table8", "SPR")


def test_reproduce_refuses_an_unknown_table_before_any_step(tmp_path, capsys):
    from sodlib import cli

    assert (
        cli.main(
            [
                "reproduce",
                "--only",
                "04",
                "--train-missing",
                "--tables",
                "table3,tabel7",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    err = capsys.readouterr()
    assert "unknown table 'tabel7'" in err.err and "[reproduce]" not in err.out
    assert not (tmp_path / "r").exists()


def test_a_row_can_name_the_row_it_is_compared_with():
    t3 = ablations.MRQM_ABLATION_TABLES[0]
    both = "MRQM + ST+SR+SPR (both papers, ours)"
    control = "MRQM + ST+SR+SPR vs MRQM at the same α/γ (ours)"
    assert t3.base_of(both) == "baseline" and t3.base_of(control) == ablations.MRQM_TUNED
    c3 = {(r.label, s): c for r, s, c in t3.configs("ablation")}
    assert config_hash(c3[(both, 0)]) == config_hash(c3[(control, 0)])  # one run, two comparisons
    tuned = c3[(ablations.MRQM_TUNED, 0)]
    assert (tuned.loss.alpha, tuned.loss.gamma) == (0.5, 1.5) and not (
        tuned.loss.st or tuned.loss.sr or tuned.loss.spr
    )
    runs = pd.DataFrame(
        [
            {"row": lbl, "seed": s, "AP": ap, "APS": ap, "APM": ap, "AP50": ap, "APL": float("nan")}
            for lbl, aps in (
                (both, [0.45, 0.46, 0.47]),
                (control, [0.45, 0.46, 0.47]),
                (ablations.MRQM_TUNED, [0.44, 0.44, 0.44]),
                *((r.label, [0.40, 0.41, 0.42]) for r in t3.rows[:-3]),
            )
            for s, ap in enumerate(aps)
        ]
    )
    summary = ablations.compare(t3, runs).set_index("row")
    assert summary.loc[control, "vs"] == ablations.MRQM_TUNED and summary.loc[
        control, "dAP"
    ] == pytest.approx(2.0)
    assert summary.loc[both, "dAP"] == pytest.approx(5.0)

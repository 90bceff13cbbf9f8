"""Ablation table specifications: rows, shared runs, the η mapping, table and row selection, file stems."""

import pandas as pd
import pytest

from sodlib.config import get_profile
from sodlib.studies import runner, stats, tables
from sodlib.studies.tables import Row, Table
from sodlib.training.runs import config_hash

TABLE3, TABLE4, _, _, _, TABLE8 = tables.ABLATION_TABLES


def test_eta_schedule_maps_six_layers_onto_the_decoder():
    best = (1.5, 1.3, 1.2, 1.1, 1.05, 1.0)
    assert tables.eta_schedule(best, 6) == best
    assert tables.eta_schedule(best, 3) == (1.5, 1.2, 1.0)  # layers 0, 2, 5
    assert tables.eta_schedule((2.0, 1.8, 1.6, 1.4, 1.2, 1.0), 3) == (2.0, 1.6, 1.0)
    assert tables.eta_schedule(best, 2) == (1.5, 1.0)  # layers 0 and 5: the cpu profile's default
    assert tables.eta_schedule(best, 1) == (1.0,)
    with pytest.raises(ValueError, match="6 values"):
        tables.eta_schedule((1.5, 1.0), 3)
    assert get_profile("cpu").loss.eta_per_layer == tables.eta_schedule(best, 2)


def test_ablation_config_applies_the_schedule_then_the_row():
    cfg = tables.ablation_config("smoke", "loss.st=true", seed=2)
    assert (cfg.train.threads, cfg.train.seed) == (1, 2) and cfg.loss.st
    assert (
        cfg.model == get_profile("smoke").model
        and cfg.train.max_iters == get_profile("smoke").train.max_iters
    )
    gpu = tables.ablation_config("smoke", device="cuda")
    assert gpu.train.device == "cuda" and gpu.train.threads == get_profile("smoke").train.threads
    assert tables.ablation_config("ablation").train == get_profile("ablation").train
    assert tables.ablation_config("paper").train == get_profile("paper").train


def test_paper_a_tables_share_the_full_method_run():
    entries = {t.name: t.configs("ablation") for t in tables.ABLATION_TABLES}
    assert {s for _, s, _ in entries["table3"]} == set(range(5)) and len(entries["table3"]) == 6 * 5
    assert all(len(entries[t.name]) == 3 * len(t.rows) for t in tables.ABLATION_TABLES[1:])
    full = {s: config_hash(tables.ablation_config("ablation", "loss.st=true", "loss.sr=true",
                                                  "loss.spr=true", seed=s))
            for s in range(5)}  # fmt: skip
    shared = {
        name: sorted({r.label for r, s, c in e if config_hash(c) == full[s]}) for name, e in entries.items()
    }
    # the ablation decoder has 3 layers: Table 7's four schedules stay distinct,
    # the paper's best is the default
    assert shared == {
        "table3": ["ST+SR+SPR"],
        "table4": ["β=0.73"],
        "table5": ["θ=6"],
        "table6": [],
        "table7": ["η=(1.5, 1.3, 1.2, 1.1, 1.05, 1)"],
        "table8": [],
    }
    hashes = {config_hash(c) for e in entries.values() for _, _, c in e}
    # Tables 4, 5 and 7 (12 runs each) reuse Table 3's full row at seeds 0-2
    assert len(hashes) == 30 + 3 * 12 + 18 + 18 - 3 * 3
    t8 = {r.label: c for r, _, c in entries["table8"]}
    assert (
        t8["TAL +ST+SR"].loss.cls_loss == "tal" and t8["TAL +ST+SR"].loss.sr and not t8["TAL +ST+SR"].loss.spr
    )
    assert (t8["QFL +ST"].loss.alpha, t8["QFL +ST"].loss.gamma) == (0.75, 2.0)
    t3 = {r.label: c for r, s, c in entries["table3"] if s == 0}
    assert (t3["ST+SR"].loss.alpha, t3["SR"].loss.alpha) == (0.75, 0.75)  # no α/γ confound between rows
    t6 = {r.label: c for r, s, c in entries["table6"] if s == 0}
    assert (t6["γ=1.75, α=0.25"].loss.gamma, t6["γ=1.75, α=0.25"].loss.alpha) == (1.75, 0.25)
    tuned = {t.name: t for t in tables.paper_a_tables(tables.ST_TUNED, 3, 1)}["table3"].configs("ablation")
    alphas = {r.label: c.loss.alpha for r, s, c in tuned if s == 0}
    assert alphas["ST+SR"] == 0.5 and alphas["SR"] == 0.75  # ``focal`` reaches the rows with ST only


def test_multi_seed_tables_never_drop_below_two_seeds():
    assert {s for _, s, _ in TABLE3.configs("smoke", seeds=1)} == {0, 1}
    assert {s for _, s, _ in TABLE3.configs("smoke", seeds=5)} == set(range(5))
    assert {s for _, s, _ in TABLE4.configs("smoke")} == {0, 1, 2}
    single = tables.paper_a_tables((), 3, 1)[1]  # a single-seed Table 4 stays single-seed
    assert {s for _, s, _ in single.configs("smoke", seeds=5)} == {0}


def test_table_base_rows():
    assert TABLE3.base_of("SPR") == "baseline"
    assert TABLE4.base_of("β=0.3") == "β=0.73"
    assert [TABLE8.base_of(r.label) for r in TABLE8.rows] == ["QFL (GFL)"] * 3 + ["TAL (TOOD)"] * 3


def test_a_bad_row_fails_before_training_naming_table_row_and_key():
    table = Table("tbad", "T", (Row("fine", ()), Row("typo", ("loss.stt=true",))), seeds=2)
    with pytest.raises(ValueError, match=r"tbad, row 'typo': unknown config key 'loss.stt'"):
        table.configs("smoke")
    table = Table("tbad", "T", (Row("range", ("loss.beta=2",)),), seeds=2)
    with pytest.raises(ValueError, match=r"tbad, row 'range': loss.beta must be <= 1.0"):
        runner.run_tables([table], "smoke", "/nonexistent")  # raised before any run folder is touched


def test_table_stems_keep_gpu_sets_beside_cpu_tables():
    assert tables.table_stem("table3", "ablation") == "table3"
    assert tables.table_stem("table3", "cpu", "cpu") == "table3"
    assert tables.table_stem("table3", "smoke") == "table3_smoke"
    assert tables.table_stem("table3", "ablation", "cuda:1") == "table3_cuda"
    assert tables.table_stem("", "ablation", "cuda") == "_cuda"


def test_mrqm_tables_share_runs_with_the_plateau_ladder_and_each_other():
    from sodlib.studies.experiments import PLATEAU_ITERS

    t3, t4, t5, ag = tables.mrqm_tables(tables.MRQM_ITERS, table3_seeds=3, other_seeds=2)
    assert tables.MRQM_ITERS in PLATEAU_ITERS
    c3 = {(r.label, s): c for r, s, c in t3.configs("ablation")}
    assert len(c3) == 7 * 3 and all(c.train.max_iters == tables.MRQM_ITERS for c in c3.values())
    ladder = tables.ablation_config("ablation", f"train.max_iters={tables.MRQM_ITERS}", seed=1)
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
    cag = {(r.label, s): c for r, s, c in ag.configs("ablation")}  # the α/γ table reuses Table 3's two runs
    for label in (tables.MRQM, tables.MRQM_BOTH):
        assert config_hash(cag[(label, 2)]) == config_hash(c3[(label, 2)])
    five = tables.mrqm_tables(table3_seeds=5)  # Table 3's extra seeds leave the α/γ table at 3
    assert (five[0].seeds, five[3].seeds) == (5, 3)
    smoke = tables.mrqm_tables(None)[0].configs("smoke")
    assert all(c.train.max_iters == get_profile("smoke").train.max_iters for _, _, c in smoke)


def test_select_tables_names_an_unknown_table_or_row():
    t = tables.ABLATION_TABLES
    assert [x.name for x in tables.select_tables(t)] == [x.name for x in t]
    chosen = tables.select_tables(t, "table3,table8", "SR|QFL +ST")
    assert [(x.name, [r.label for r in x.rows]) for x in chosen] == [
        ("table3", ["SR"]),
        ("table8", ["QFL +ST"]),
    ]
    with pytest.raises(ValueError, match=r"unknown table 'table9'; tables: table3, table4"):
        tables.select_tables(t, "table3,table9")
    with pytest.raises(ValueError, match=r"unknown row 'SPR' in table8; rows: QFL \(GFL\)"):
        tables.select_tables(t, "table8", "SPR")


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
    ag = tables.MRQM_ABLATION_TABLES[3]
    assert ag.name == "mrqm_alpha_gamma"
    assert ag.base_of(tables.MRQM_TUNED) == tables.MRQM and ag.base_of(tables.MRQM_BOTH) == tables.MRQM_TUNED
    c = {(r.label, s): c for r, s, c in ag.configs("ablation")}
    tuned, both = c[(tables.MRQM_TUNED, 0)], c[(tables.MRQM_BOTH, 0)]
    assert (tuned.loss.alpha, tuned.loss.gamma) == (both.loss.alpha, both.loss.gamma) == (0.5, 1.5)
    assert not (tuned.loss.st or tuned.loss.sr or tuned.loss.spr) and both.loss.st and both.loss.sr
    runs = pd.DataFrame(
        [
            {"row": lbl, "seed": s, "AP": ap, "APS": ap, "APM": ap, "AP50": ap, "APL": float("nan")}
            for lbl, aps in (
                (tables.MRQM, [0.40, 0.41, 0.42]),
                (tables.MRQM_TUNED, [0.44, 0.44, 0.44]),
                (tables.MRQM_BOTH, [0.45, 0.46, 0.47]),
            )
            for s, ap in enumerate(aps)
        ]
    )
    summary = stats.paired_comparison(ag, runs).set_index("row")
    assert summary.loc[tables.MRQM_BOTH, "vs"] == tables.MRQM_TUNED
    assert summary.loc[tables.MRQM_BOTH, "dAP"] == pytest.approx(2.0)
    assert summary.loc[tables.MRQM_TUNED, "dAP"] == pytest.approx(3.0)


def test_pairs_never_cross_kinds_of_machine():
    """A seed whose two runs were trained on different kinds of machine is left out of the pair, counted and
    named in the verdict; a row with no pair on one kind says so instead of "not run"."""
    ag = tables.MRQM_ABLATION_TABLES[3]
    aps = {tables.MRQM: [0.40, 0.41, 0.42], tables.MRQM_TUNED: [0.44, 0.44, 0.45],
           tables.MRQM_BOTH: [0.45, 0.46, 0.48]}  # fmt: skip

    def frame(kinds):
        return pd.DataFrame(
            [
                {"row": lbl, "seed": s, "AP": aps[lbl][s], "kind": kinds[lbl][s]}
                | {"APS": 0.3, "APM": 0.5, "AP50": 0.6, "APL": float("nan")}
                for lbl in aps
                for s in range(3)
            ]
        )

    kinds = {tables.MRQM: ["amd"] * 3, tables.MRQM_TUNED: ["intel", "intel", "amd"],
             tables.MRQM_BOTH: ["intel", "amd", "amd"]}  # fmt: skip
    summary = stats.paired_comparison(ag, frame(kinds)).set_index("row")
    tuned, both = summary.loc[tables.MRQM_TUNED], summary.loc[tables.MRQM_BOTH]
    assert tuned["pairs"] == 1 and tuned["pairs_other_kind"] == 2 and tuned["dAP"] == pytest.approx(3.0)
    assert both["pairs"] == 2 and both["pairs_other_kind"] == 1  # seeds 0 (intel) and 2 (amd)
    assert both["dAP"] == pytest.approx(((0.45 - 0.44) + (0.48 - 0.45)) / 2 * 100)
    verdict = stats.paired_verdict(ag, summary.reset_index())
    assert f"2 seed(s) trained on another kind of machine than {tables.MRQM}'s left out" in verdict

    kinds = {tables.MRQM: ["amd"] * 3, tables.MRQM_TUNED: ["intel"] * 3, tables.MRQM_BOTH: ["amd"] * 3}
    summary = stats.paired_comparison(ag, frame(kinds))
    assert summary["pairs_other_kind"].tolist() == [0, 3, 3]
    verdict = stats.paired_verdict(ag, summary)
    assert f"{tables.MRQM_BOTH}: no pair on one kind of machine (3 seed(s)" in verdict
    assert "not run" not in verdict

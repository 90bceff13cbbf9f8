"""The runner: each distinct configuration trains once, in parallel or not with the same result; failures
named."""

import os

import pytest

from sodlib.config import get_profile
from sodlib.studies import runner, stats
from sodlib.studies.tables import METRICS, ablation_config
from sodlib.training.runs import run_dir


def test_train_configs_trains_each_distinct_config_once_and_parallel_equals_sequential(tmp_path):
    a = ablation_config("smoke", "train.max_iters=3")
    b = ablation_config("smoke", "train.max_iters=3", seed=1)
    seq = runner.train_configs([a, b, a], tmp_path / "seq", workers=1, verbose=False)
    assert seq[0] == seq[2] and len(list((tmp_path / "seq" / "runs").iterdir())) == 2
    par = runner.train_configs([a, b], tmp_path / "par", workers=2, verbose=False)
    for s, p in zip(seq[:2], par):
        assert {k: s[k] for k in METRICS} == {k: p[k] for k in METRICS}
    again = runner.train_configs([b], tmp_path / "par", workers=2, verbose=False)  # cached: no training
    assert again == [par[1]]


def test_train_configs_names_the_failing_run(tmp_path):
    bad = ablation_config("smoke", "train.batch_size=64", "train.max_iters=2")  # 16 train images
    with pytest.raises(
        RuntimeError, match=r"run .*runs/[0-9a-f]{12} \(the bad one\) failed: ValueError: .*fewer"
    ):
        runner.train_configs([bad], tmp_path, workers=1, labels=["the bad one"], verbose=False)


def test_default_workers():
    one_thread = ablation_config("ablation")
    assert runner.default_workers([one_thread]) == max(1, os.cpu_count() or 1)
    assert runner.default_workers([get_profile("cpu")]) == max(
        1, (os.cpu_count() or 1) // 2
    )  # 2 threads each
    assert runner.default_workers([ablation_config("smoke")]) == 1  # 8 iterations: in-process
    assert runner.default_workers([ablation_config("ablation", device="cuda")]) == 1


def test_a_corrupt_metrics_json_is_reported_and_retrained(tmp_path, caplog):
    cfg = ablation_config("smoke", "train.max_iters=2")
    (first,) = runner.train_configs([cfg], tmp_path, workers=1, verbose=False)
    path = run_dir(cfg, tmp_path) / "metrics.json"
    path.write_text('{"AP": 0.1')  # truncated
    with caplog.at_level("WARNING"):
        (again,) = runner.train_configs([cfg], tmp_path, workers=1, verbose=False)
    assert str(path) in caplog.text and "corrupt" in caplog.text
    assert (path.parent / "metrics.json.corrupt").read_text() == '{"AP": 0.1'  # kept, not deleted
    assert {k: again[k] for k in METRICS} == {k: first[k] for k in METRICS}  # retrained


def test_runs_frame_reads_every_run_on_the_kind_that_trained_most_of_the_table(tmp_path, put_run):

    from sodlib.hardware import machine_slug
    from sodlib.studies.tables import Row, Table
    from sodlib.training.runs import read_metrics

    table = Table("t", "T", (Row("ref", ()), Row("a", ("loss.sr=true",))), seeds=2)
    entries = table.configs("smoke")

    put = put_run

    for (row, seed, cfg), ap in zip(entries, (0.30, 0.32, 0.35, 0.36)):
        put(run_dir(cfg, tmp_path), cfg, "old" if (row.label, seed) == ("ref", 0) else "new", ap)
    metrics = [read_metrics(run_dir(c, tmp_path)) for *_, c in entries]
    before = runner.runs_frame(table, entries, metrics, tmp_path)
    assert before["AP"].tolist() == [0.30, 0.32, 0.35, 0.36]  # no retrain on "new" yet: the committed run
    assert before["kind"].tolist() == ["old", "new", "new", "new"]  # so the seed-0 pair is left out
    assert stats.paired_comparison(table, before).set_index("row").loc[
        "a", ["pairs", "pairs_other_kind"]
    ].tolist() == [1, 1]
    ref0 = entries[0][2]
    copy = tmp_path / "machines" / machine_slug("new") / "runs" / run_dir(ref0, tmp_path).name
    put(copy, ref0, "new", 0.31)
    frame = runner.runs_frame(table, entries, metrics, tmp_path)
    assert frame["AP"].tolist() == [0.31, 0.32, 0.35, 0.36]  # ref s0 read as retrained on the table's kind
    assert set(frame["kind"]) == {"new"}
    assert (
        runner.run_folder(tmp_path, frame["run"][0]) == copy
        and frame["run"][1] == run_dir(entries[1][2]).name
    )
    assert runner.main_kind([run_dir(c, tmp_path) for *_, c in entries]) == "new"
    assert runner.on_kind(run_dir(ref0, tmp_path), None, tmp_path) == run_dir(ref0, tmp_path)


def test_tables_are_read_on_the_kind_where_most_of_their_runs_exist_counting_whole_retrains(
    tmp_path, put_run
):

    from sodlib.hardware import machine_slug
    from sodlib.studies.tables import Row, Table
    from sodlib.training.runs import read_metrics

    table = Table("t", "T", (Row("ref", ()), Row("a", ("loss.sr=true",))), seeds=2)
    entries = table.configs("smoke")

    put = put_run

    kinds = ("old", "old", "old", "new")  # ref s0, ref s1, a s0 trained on "old"; a s1 on "new"
    for (_, _, cfg), kind, ap in zip(entries, kinds, (0.30, 0.32, 0.35, 0.36)):
        put(run_dir(cfg, tmp_path), cfg, kind, ap)
    folders = [run_dir(c, tmp_path) for *_, c in entries]
    assert runner.main_kind(folders, tmp_path) == "old"
    for (_, _, cfg), ap in zip(entries[:2], (0.31, 0.33)):  # two of the three "old" runs retrained on "new"
        put(tmp_path / "machines" / machine_slug("new") / "runs" / run_dir(cfg).name, cfg, "new", ap)
    assert runner.main_kind(folders) == "old" and runner.main_kind(folders, tmp_path) == "old"  # tied 3 to 3
    put(tmp_path / "machines" / machine_slug("new") / "runs" / folders[2].name, entries[2][2], "new", 0.34)
    assert runner.main_kind(folders, tmp_path) == "new"  # 4 on "new", 3 on "old"
    metrics = [read_metrics(f) for f in folders]
    frame = runner.runs_frame(table, entries, metrics, tmp_path)
    assert frame["AP"].tolist() == [0.31, 0.33, 0.34, 0.36]


def test_a_tie_between_an_unrecorded_kind_and_a_recorded_one_goes_to_the_recorded_kind(tmp_path, put_run):
    from sodlib.hardware import machine_slug
    from sodlib.studies.drift import UNRECORDED
    from sodlib.studies.tables import Row, Table

    table = Table("t", "T", (Row("ref", ()), Row("a", ("loss.sr=true",))), seeds=1)
    entries = table.configs("smoke")
    folders = [run_dir(c, tmp_path) for *_, c in entries]
    for f, (_, _, cfg) in zip(folders, entries):
        put_run(f, cfg, None, 0.30)  # provenance without a machine kind: trained on an unrecorded kind
    assert runner.main_kind(folders, tmp_path) == UNRECORDED
    for f, (_, _, cfg) in zip(folders, entries):  # every run retrained whole on "new": tied 2 to 2
        put_run(tmp_path / "machines" / machine_slug("new") / "runs" / f.name, cfg, "new", 0.31)
    assert runner.main_kind(folders) == UNRECORDED and runner.main_kind(folders, tmp_path) == "new"


def test_a_seed_whose_runs_are_not_all_on_the_tables_kind_is_read_on_its_own(tmp_path, put_run):
    from sodlib.hardware import machine_slug
    from sodlib.studies.tables import Row, Table
    from sodlib.training.runs import read_metrics

    table = Table("t", "T", (Row("ref", ()), Row("a", ("loss.sr=true",))), seeds=3)
    entries = table.configs("smoke")  # ref s0..s2, a s0..s2
    kinds = ("old", "old", "old", "old", "old", "new")  # a s2 trained on "new" only
    for (_, _, cfg), kind, ap in zip(entries, kinds, (0.30, 0.31, 0.32, 0.35, 0.36, 0.37)):
        put_run(run_dir(cfg, tmp_path), cfg, kind, ap)
    metrics = [read_metrics(run_dir(c, tmp_path)) for *_, c in entries]
    frame = runner.runs_frame(table, entries, metrics, tmp_path)
    assert frame["kind"].tolist() == ["old"] * 5 + ["new"]  # ref s2 exists on "old" only: seed 2 crosses
    summary = stats.paired_comparison(table, frame).set_index("row")
    assert summary.loc["a", ["pairs", "pairs_other_kind"]].tolist() == [2, 1]
    ref2 = entries[2][2]
    put_run(tmp_path / "machines" / machine_slug("new") / "runs" / run_dir(ref2).name, ref2, "new", 0.33)
    frame = runner.runs_frame(table, entries, metrics, tmp_path)  # the table stays on "old", seed 2 on "new"
    assert frame["kind"].tolist() == ["old", "old", "new", "old", "old", "new"]
    assert frame["AP"].tolist() == [0.30, 0.31, 0.33, 0.35, 0.36, 0.37]
    summary = stats.paired_comparison(table, frame).set_index("row")
    assert summary.loc["a", ["pairs", "pairs_other_kind"]].tolist() == [3, 0]
    assert summary.loc["a", "dAP"] == pytest.approx((5 + 5 + 4) / 3)
